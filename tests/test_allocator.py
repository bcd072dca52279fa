"""glibc malloc set to keep freed memory (``glip`` does it at start); the environment wins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from glip_transfer.allocator import keep_freed_memory; print(keep_freed_memory())"


def run(env: dict) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, "-c", CODE], env={**clean, **env}, capture_output=True, text=True, timeout=120).stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_on_glibc_unless_the_environment_tunes_malloc():
    assert run({}) == "True"
    assert run({"MALLOC_ARENA_MAX": "2"}) == "False"
    assert run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == "False"
