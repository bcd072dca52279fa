"""Keep the memory a forward frees for the next forward (glibc malloc).

A CPU forward of GLIP-T at 800x800 allocates and frees a few GB of activations, most in blocks of
megabytes. With glibc's defaults, big blocks are mapped fresh from the kernel and returned when
freed, and the heap is trimmed: every forward page-faults its activations in again (~160 000 faults,
~9 % of its CPU time, measured by ``benchmarks/cpu_hotspots.py --malloc default``). Raising the
mmap and trim thresholds keeps that memory in the process, ready for the next batch. The ``glip``
command does it at start; the price is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30, top_pad: int = 256 << 20) -> bool:
    """Set glibc's malloc to keep freed memory (blocks up to ``mmap_threshold`` from the heap, which
    is trimmed only above ``trim_threshold`` free bytes and grows ``top_pad`` at a time). Returns
    whether it was applied: not on other C libraries, and not when the environment already tunes
    malloc (``MALLOC_*`` or ``GLIBC_TUNABLES``), which then wins."""
    if "GLIBC_TUNABLES" in os.environ or any(key.startswith("MALLOC_") for key in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return False
    done = [libc.mallopt(param, value) for param, value in
            ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))]  # fmt: skip
    return all(done)
