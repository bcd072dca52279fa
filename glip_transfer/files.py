"""Writing output files: the one writer every file ``glip`` writes goes through.

* A regular file, or a path that does not exist yet, is written **atomically**: into a
  temporary file in the same folder, flushed to disk, then renamed over the target, so a reader
  never sees half a file and a crash leaves the old one. A replaced file keeps its permission
  bits; a new file gets the user's normal ones (``0o666`` less the umask), not ``mkstemp``'s 0600.
* A **symlink** is followed: its target is replaced and the link stays a link.
* Anything else (a character device such as ``/dev/null`` or ``/dev/full``, a FIFO, a socket,
  ``/dev/stdout``, ``-`` for standard output) is written **directly**, never replaced by a file.
* Every failure of the write itself (a full disk, no permission, a read-only file system; an
  ``OSError`` or safetensors' ``SafetensorError``) becomes an :class:`OutputError`: one line
  naming the file and the reason, which the commands print without a traceback.

:class:`AppendLines` appends JSON-lines records (partial results, the training log) with the
same error handling.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable

STDOUT = "-"
"""The path that means standard output (``--json -``)."""

_DIRECT_ROOTS = ("/dev/", "/proc/")


class OutputError(OSError):
    """An output file cannot be written (full disk, permissions, a folder in the way); the message
    names the file and the reason in one line."""


def _reason(exc: BaseException) -> str:
    """The OS's words for a failed write: ``strerror`` of an ``OSError``, or the message inside a
    safetensors ``IoError(Os { ..., message: "No space left on device" })``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    found = re.search(r'message: "([^"]+)"', text)
    if found:
        return found.group(1)
    return text.splitlines()[0] if text else type(exc).__name__


def _is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def output_error(path: str | os.PathLike, exc: BaseException) -> OutputError:
    """The :class:`OutputError` for a failed write of ``path``."""
    if isinstance(exc, OutputError):
        return exc
    reason = _reason(exc)
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in reason or "StorageFull" in str(exc)
    hint = ": free some space (or write elsewhere) and run again" if full else ""
    error = OutputError(f"cannot write {path}: {reason}{hint}")
    error.errno = getattr(exc, "errno", None) or (errno.ENOSPC if full else None)
    return error


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_direct(path: str | os.PathLike) -> bool:
    """Whether ``path`` is written in place rather than replaced: standard output, an existing
    non-regular file (device, FIFO, socket), or anything under /dev and /proc."""
    text = os.fspath(path)
    if text == STDOUT:
        return True
    if os.path.abspath(text).startswith(_DIRECT_ROOTS):
        return True
    try:
        mode = os.stat(text).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file with ``write(file_path)`` (a function that creates the file it is given, e.g.
    ``safetensors.torch.save_file`` or ``PIL.Image.save``): atomically for a regular file or a new
    path (through a symlink onto its target), in place for a device or FIFO. Returns ``path``.

    Raises :class:`OutputError` when the write fails or ``path`` is a folder."""
    text = os.fspath(path)
    if text == STDOUT:
        raise OutputError("cannot write binary output to standard output ('-'): give a file path")
    if is_direct(text):
        try:
            write(text)
        except BaseException as exc:
            if _is_write_failure(exc):
                raise output_error(text, exc) from None
            raise
        return Path(text)
    target = Path(os.path.realpath(text))  # a symlink's target is replaced, the link kept
    if target.is_dir():
        raise OutputError(f"cannot write {text}: it is a folder, not a file; give a file path")
    try:
        existing = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        existing = None
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, existing if existing is not None else 0o666 & ~umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_folder(target.parent)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if _is_write_failure(exc):
            raise output_error(text, exc) from None
        raise
    return Path(text)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (best effort: not every system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` (``-``: standard output) as :func:`write_file` does."""
    if os.fspath(path) == STDOUT:
        try:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except OSError as exc:
            raise output_error("standard output", exc) from None
        return Path(STDOUT)

    def write(file: str) -> None:
        with open(file, "wb") as f:
            f.write(data)
            f.flush()

    return write_file(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` (``-``: standard output) as
    :func:`write_file` does."""
    if os.fspath(path) == STDOUT:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as exc:
            raise output_error("standard output", exc) from None
        return Path(STDOUT)
    return write_bytes(path, text.encode("utf-8"))


class AppendLines:
    """Lines appended to a file as they come (``partial_results.jsonl``, ``log.jsonl``), each
    flushed (and with ``durable``, fsynced) at once; a failed write is an :class:`OutputError`.
    The file is opened on the first line."""

    def __init__(self, path: str | os.PathLike, *, durable: bool = False):
        self.path = Path(path)
        self.durable = durable
        self._file = None

    def write(self, line: str) -> None:
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line if line.endswith("\n") else line + "\n")
            self._file.flush()
            if self.durable:
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise output_error(self.path, exc) from None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                raise output_error(self.path, exc) from None
            finally:
                self._file = None

    def __enter__(self) -> "AppendLines":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            try:
                self.close()
            except OutputError:
                if exc[0] is None:
                    raise
