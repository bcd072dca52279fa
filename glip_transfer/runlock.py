"""An exclusive lock on a run folder (``glip finetune``, ``glip pretrain``, ``glip zeroshot eval``):
two runs writing into the same ``--out`` would interleave their logs and overwrite each other's
checkpoints and results.

The lock is the file ``.glip.lock`` in the folder, holding ``{"pid", "host", "command", "since"}``
of its owner, and an ``flock`` on it while the owner runs. The kernel drops the ``flock`` when the
owner dies however it dies (``kill -9`` too), so a lock file left behind by a dead run is stale
and simply taken over (with a note naming the dead process). Where the file system has no
``flock`` (some network mounts), the PID decides: a lock of a process that no longer runs on this
host is stale; one from another host is refused (delete the file if that run is over).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: the PID alone decides
    fcntl = None

LOCK_FILE = ".glip.lock"


class RunLocked(RuntimeError):
    """Another run holds the folder; the message names it in one line."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _owner(info: dict) -> str:
    pid, host = info.get("pid", "?"), info.get("host", "?")
    since = f", since {info['since']}" if info.get("since") else ""
    command = f" ({info['command']})" if info.get("command") else ""
    return f"process {pid} on {host}{command}{since}"


class RunLock:
    """``with RunLock(folder): ...`` holds ``folder`` (created if needed) exclusively; a second
    holder gets :class:`RunLocked`. ``notice`` says what was taken over (a stale lock), if
    anything. A folder the lock created and that is still empty when it is released is removed."""

    def __init__(self, folder: str | os.PathLike, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]])
        self.notice: str | None = None
        self._fd: int | None = None
        self._created_folder = False

    # ------------------------------------------------------------------ acquire / release

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # bounded: only a concurrent release can make us retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                held = self._flock(fd)
                previous = _read(self.path)
                if held is False:
                    raise RunLocked(self._locked_message(previous))
                # the file we locked must still be the one at the path (its owner may have removed it)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                if held is None and previous and self._pid_owner_alive(previous):
                    raise RunLocked(self._locked_message(previous))
                if previous.get("pid") not in (None, os.getpid()):
                    self.notice = f"took over the lock of {_owner(previous)}, which is no longer running"
                self._write(fd)
                self._fd = fd
                return self
            except BaseException:
                if self._fd != fd:
                    os.close(fd)
                self._remove_created_folder()
                raise
        raise RunLocked(f"{self.folder}: cannot take the run lock {self.path} (it keeps changing); try again")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: nobody locks the old file in between
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created_folder()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ details

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: held by another process; None: no flock here (the PID decides)."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            return None  # ENOLCK / EOPNOTSUPP: a file system without flock

    @staticmethod
    def _pid_owner_alive(info: dict) -> bool:
        if info.get("host") != socket.gethostname():
            return True  # cannot tell: another machine's run
        pid = info.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)

    def _locked_message(self, info: dict) -> str:
        owner = _owner(info) if info else "another process"
        return (
            f"{self.folder} is in use by another glip run ({owner}): wait for it to finish or choose another --out"
            f" (if no such run exists, delete {self.path})"
        )

    def _write(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def _remove_created_folder(self) -> None:
        if self._created_folder:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass
            self._created_folder = False
