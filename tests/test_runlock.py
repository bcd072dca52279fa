"""The run-folder lock: one run per folder, stale locks of dead processes taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from glip_transfer.runlock import LOCK_FILE, RunLock, RunLocked

HOLDER = """
import sys
from glip_transfer.runlock import RunLock
lock = RunLock(sys.argv[1], command="holder").acquire()
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes stdin (or kills us)
lock.release()
"""


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path / "run"`` (it has said so before we go on)."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "locked"
    yield child
    if child.poll() is None:
        child.kill()
    child.wait()


def test_a_second_holder_is_refused_in_one_line(tmp_path):
    with RunLock(tmp_path / "run", command="glip finetune") as lock:
        info = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path / "run").acquire()
        message = str(refused.value)
        assert "\n" not in message and f"process {os.getpid()}" in message and "glip finetune" in message
        assert "choose another --out" in message
        assert lock.notice is None
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock(tmp_path / "run").acquire().release()


def test_another_process_holds_it_until_it_ends(tmp_path, holder):
    with pytest.raises(RunLocked, match=f"process {holder.pid} on"):
        RunLock(tmp_path / "run").acquire()
    holder.stdin.close()
    assert holder.wait() == 0
    with RunLock(tmp_path / "run") as lock:
        assert lock.notice is None


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()  # left behind
    with RunLock(tmp_path / "run") as lock:
        assert lock.notice.startswith(f"took over the lock of process {holder.pid} on {socket.gethostname()} (holder)")
        assert lock.notice.endswith("which is no longer running")


def test_a_stale_lock_file_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    pid = dead_pid()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with RunLock(folder) as lock:
        assert lock.notice is not None and f"process {pid}" in lock.notice and "no longer running" in lock.notice
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLock, "_flock", staticmethod(lambda fd: None))  # a file system without flock
    folder = tmp_path / "run"
    folder.mkdir()
    alive = os.getppid()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": alive, "host": socket.gethostname()}))
    with pytest.raises(RunLocked, match=f"process {alive}"):
        RunLock(folder).acquire()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": alive, "host": "elsewhere"}))
    with pytest.raises(RunLocked, match="on elsewhere"):
        RunLock(folder).acquire()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    with RunLock(folder) as lock:
        assert "no longer running" in lock.notice


def test_a_folder_made_only_for_the_lock_is_removed(tmp_path):
    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "result.json").write_text("{}")
    assert (tmp_path / "kept" / "result.json").exists() and not (tmp_path / "kept" / LOCK_FILE).exists()
