"""The one output writer (``glip_transfer.files``): atomic onto regular files and new paths,
in place onto devices and FIFOs, symlinks followed, the user's permissions, loud failures."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest

from glip_transfer import files
from glip_transfer.evaluation import atomic_write_text, write_results


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_files_get_the_users_permissions(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    paths = write_results(tmp_path / "out", [], {"AP": 0.5})
    for path in paths.values():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_a_replaced_file_keeps_its_mode(tmp_path, umask_022):
    target = tmp_path / "shared.json"
    target.write_text("old")
    os.chmod(target, 0o664)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(os.stat(target).st_mode) == 0o664


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "data" / "real.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "data" / "later.json")
    atomic_write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "data" / "later.json").read_text() == "made"


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waiting, as `cat pipe` would
    try:
        atomic_write_text(fifo, '{"ok": true}')
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert os.read(reader, 1000) == b'{"ok": true}'
    finally:
        os.close(reader)
    assert not [p for p in tmp_path.iterdir() if p.name != "pipe"]  # no temporary file left


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_device_fails_loudly():
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    with pytest.raises(files.OutputError, match="cannot write /dev/full: No space left on device") as info:
        files.write_text("/dev/full", "x" * 10000)
    assert info.value.errno == errno.ENOSPC
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_dash_is_standard_output(capsys):
    files.write_text("-", '{"a": 1}\n')
    assert capsys.readouterr().out == '{"a": 1}\n'
    with pytest.raises(files.OutputError, match="standard output"):
        files.write_file("-", lambda path: None)


def test_a_folder_in_the_way_is_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(files.OutputError, match="is a folder"):
        files.write_text(tmp_path / "taken", "x")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "w.bin"
    target.write_bytes(b"old")

    def fails(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(files.OutputError, match="No space left on device: free some space"):
        files.write_file(target, fails)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_safetensors_errors_become_one_line(tmp_path):
    class SafetensorError(Exception):  # what safetensors raises, named as it is
        pass

    def fails(path):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    with pytest.raises(files.OutputError, match=r"cannot write .*w.safetensors: No space left on device"):
        files.write_file(tmp_path / "w.safetensors", fails)


def test_real_write_failures_are_output_errors(tmp_path):
    """A real failing write (the file-size limit makes write(2) fail with EFBIG, as a full disk
    fails with ENOSPC) through the atomic path and the appender, in a child process."""
    script = f"""
import json, resource, signal
from glip_transfer import files
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
out = {{}}
try:
    files.write_text({str(tmp_path / "big.json")!r}, "x" * 10000)
except files.OutputError as e:
    out["atomic"] = str(e)
log = files.AppendLines({str(tmp_path / "log.jsonl")!r})
try:
    for i in range(100):
        log.write(json.dumps({{"i": i, "pad": "y" * 100}}))
except files.OutputError as e:
    out["append"] = str(e)
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["atomic"].startswith(f"cannot write {tmp_path / 'big.json'}: File too large")
    assert out["append"].startswith(f"cannot write {tmp_path / 'log.jsonl'}: File too large")
    assert not (tmp_path / "big.json").exists() and not list(tmp_path.glob(".big.json.*"))
