"""Weights by name: the official GLIP checkpoints on the Hugging Face hub, and the packaged glip-nano.

``--weights glip-t`` (or any name of :data:`WEIGHTS`) is fetched with
``huggingface_hub.hf_hub_download`` from the model repo ``GLIPModel/GLIP`` into the standard
Hugging Face cache, so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT`` (a mirror) and
``HF_HUB_OFFLINE`` apply as for any hub download. A name already in the cache is used without
asking the server (the released files never change). After a download the file's sha256 is
checked against the one the server names (huggingface_hub itself checks only the size).

The official GLIP-T file is 3.7 GB: the model plus ``model_ema`` and the optimizer state. The
first time a cached official file is loaded, its model weights are written next to it as a
model-only safetensors (``<name>.model.safetensors``, in the same snapshot folder, so
``hf cache delete`` removes it with the file); later runs memory-map that copy.

Errors are one line (:class:`HubError`) naming the file, the URL and the manual alternative.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError

HUB_REPO = "GLIPModel/GLIP"
DEFAULT_WEIGHTS = "glip-t"
PACKAGED_DIR = Path(__file__).resolve().parent / "weights"
CONVERTED_SUFFIX = ".model.safetensors"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# errors that mean "this folder cannot take the file": reported with the folder's name
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


class HubError(CheckpointError):
    """A file could not be fetched from the Hugging Face hub or stored in its cache; the message
    names the file, the URL and what to do instead."""


@dataclass(frozen=True)
class WeightsSpec:
    """A weights name: where its file is and which model it holds."""

    name: str
    file: str  # the file name in ``repo`` (or in the package's ``weights/`` folder)
    variant: str
    bytes: int | None  # the file's size where known
    about: str
    repo: str | None = HUB_REPO  # None: shipped inside the package

    @property
    def packaged(self) -> bool:
        return self.repo is None


WEIGHTS: tuple[WeightsSpec, ...] = (
    WeightsSpec("glip-t", "glip_tiny_model_o365_goldg.pth", "glip-t", 3_710_104_213, "GLIP-T (C): Swin-T, Objects365 + GoldG"),
    WeightsSpec("glip-t-o365", "glip_tiny_model_o365.pth", "glip-t", 3_710_104_213, "GLIP-T (B): Swin-T, Objects365"),
    WeightsSpec("glip-t-cc", "glip_tiny_model_o365_goldg_cc_sbu.pth", "glip-t", 3_710_104_213,
                "GLIP-T: Swin-T, Objects365 + GoldG + CC3M + SBU"),  # fmt: skip
    WeightsSpec("glip-t-a", "glip_a_tiny_o365.pth", "glip-t-a", None, "GLIP-T (A): Swin-T, Objects365, no deep fusion"),
    WeightsSpec("glip-l", "glip_large_model.pth", "glip-l", 6_896_153_761, "GLIP-L: Swin-L, FourODs + GoldG + CC3M+12M + SBU"),
    WeightsSpec("glip-nano", "glip-nano.safetensors", "glip-nano", None, "glip-nano: small, shipped in the package (offline)",
                repo=None),  # fmt: skip
)


def weights_names() -> list[str]:
    return [w.name for w in WEIGHTS]


def weights_spec(name: str) -> WeightsSpec | None:
    """The entry of a weights name (case-insensitive), or None."""
    key = name.strip().lower()
    return next((w for w in WEIGHTS if w.name == key), None)


def unknown_name_message(name: str) -> str:
    return f"{name}: not a weights name nor a file; names: {', '.join(weights_names())} (glip weights list), or pass a path"


def file_url(repo: str, filename: str) -> str:
    """The download URL of ``filename`` in ``repo`` (``HF_ENDPOINT`` applied)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename)


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder in use (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_file(repo: str, filename: str) -> Path | None:
    """The path of ``filename`` in the Hugging Face cache (revision ``main``), or None. No network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir())
    return Path(found) if isinstance(found, str) else None


def converted_name(filename: str) -> str:
    """``glip_tiny_model_o365_goldg.pth`` -> ``glip_tiny_model_o365_goldg.model.safetensors``."""
    return Path(filename).stem + CONVERTED_SUFFIX


def cached_blob_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 a Hugging Face cache file is stored under (``blobs/<sha256>``, the ETag of a
    large file), or None for a file outside the cache."""
    blob = Path(path).resolve()
    if blob.parent.name == "blobs" and _SHA256.fullmatch(blob.name):
        return blob.name
    return None


# --------------------------------------------------------------------------- resolving names


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or Path(text).suffix.lower() in {".pth", ".pt", ".bin", ".safetensors", ".ckpt"}


def resolve_weights(weights: str | os.PathLike | None, model_only: bool = True) -> Path:
    """The local file for ``--weights``.

    - a name of :data:`WEIGHTS` (None = :data:`DEFAULT_WEIGHTS`): the packaged file, or the
      cached hub file, downloaded on first use; with ``model_only`` its model-only safetensors
      copy (written on first use; the ``.pth`` itself where the cache folder is read-only);
    - anything else is a path, returned as is (``./glip-t`` is a file called ``glip-t``).
    """
    text = DEFAULT_WEIGHTS if weights is None else os.fspath(weights)
    spec = weights_spec(text) if not _looks_like_path(text) else None
    if spec is None:
        path = Path(text)
        if not path.exists() and not _looks_like_path(text):
            raise CheckpointError(unknown_name_message(text))
        if not path.exists():
            known = next((w for w in WEIGHTS if w.file == path.name and not w.packaged), None)
            if known is not None:
                raise CheckpointError(f"{path}: file not found; --weights {known.name} downloads {known.file} from the hub")
        return path
    if spec.packaged:
        path = PACKAGED_DIR / spec.file
        if not path.is_file():
            raise CheckpointError(f"{spec.name}: not in this installation ({path} is missing); it ships with the package, there is no download")
        return path
    assert spec.repo is not None
    if model_only:
        converted = cached_file(spec.repo, converted_name(spec.file))
        if converted is not None:
            return converted
    raw = cached_file(spec.repo, spec.file)
    if raw is None:
        raw = download_file(spec.repo, spec.file, expected_bytes=spec.bytes, manual=f"pass --weights PATH/{spec.file}")
    return model_only_copy(raw) if model_only else raw


def model_only_copy(raw: Path) -> Path:
    """The model-only safetensors next to a cached official file, written now if missing;
    ``raw`` itself (with a one-line warning) when that folder is not writable."""
    from .checkpoint import convert_checkpoint, file_sha256

    target = raw.with_name(converted_name(raw.name))
    if target.is_file():
        return target
    _note(f"{raw.name}: writing its model weights to {target.name} once (later runs memory-map that copy)")
    try:
        convert_checkpoint(raw, target, base_sha256=cached_blob_sha256(raw) or file_sha256(raw))
    except OSError as e:
        warnings.warn(
            f"cannot write {target} ({e.strerror or e}); loading {raw.name} itself (slower). "
            f"`glip weights convert {raw} OUT.safetensors` makes a copy elsewhere",
            stacklevel=2,
        )
        return raw
    return target


# --------------------------------------------------------------------------- downloading


def download_file(repo: str, filename: str, *, local_dir: str | os.PathLike | None = None,
                  expected_bytes: int | None = None, manual: str = "pass --weights PATH") -> Path:  # fmt: skip
    """``filename`` of ``repo`` through ``hf_hub_download`` (into the Hugging Face cache, or
    ``local_dir``) with a progress bar; a dropped connection is resumed where it stopped (a
    ``Range`` request, up to 5 times). The file's metadata is asked first (one ``HEAD``, no
    retries: offline or unreachable fails at once); after the download the size (checked by
    huggingface_hub) and, when the server's ETag is a sha256 (large files), the content must
    match, else the file is removed. Errors: :class:`HubError`, one line naming the file, the URL
    and ``manual``, what to do instead (after "download URL yourself and ...")."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download

    url = file_url(repo, filename)
    folder = Path(local_dir) if local_dir is not None else hub_cache_dir()
    alternative = f"download {url} yourself and {manual}"
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{filename} is not in {folder} and HF_HUB_OFFLINE is set: unset it to download, or {alternative}")
    try:
        meta = get_hf_file_metadata(url)
    except Exception as e:  # noqa: BLE001 - huggingface_hub / httpx raise many types; each becomes one line
        raise HubError(_download_error(e, filename, url, folder, alternative)) from None
    expected_sha256 = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
    _check_free_space(folder, meta.size or expected_bytes, filename, alternative)
    kwargs = {}
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = type("RichDownloadBar", (RichDownloadBar,), {"label": f"download {filename}"})
    try:
        path = Path(hf_hub_download(repo, filename, local_dir=local_dir, **kwargs))
    except Exception as e:  # noqa: BLE001
        raise HubError(_download_error(e, filename, url, folder, alternative)) from None
    if expected_sha256 is not None:
        _verify_sha256(path, expected_sha256, filename, url)
    return path


def _download_error(e: Exception, filename: str, url: str, folder: Path, alternative: str) -> str:
    from huggingface_hub import errors

    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        where = Path(e.filename).parent if e.filename else folder
        return f"cannot write {filename} to {where} ({e.strerror}): free space there or set HF_HOME to a writable folder, or {alternative}"
    if isinstance(e, getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)) and not isinstance(e, errors.LocalEntryNotFoundError):
        return f"{url}: no such file on the hub (HTTP 404)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"{url}: repository not found (HTTP {getattr(getattr(e, 'response', None), 'status_code', '?')}); check HF_ENDPOINT"
    if "Consistency check failed" in first:
        return f"download of {filename} refused: its size does not match the server's; the partial file was removed — run again ({url})"
    unreachable = isinstance(e, (ConnectionError, TimeoutError, errors.LocalEntryNotFoundError, errors.FileMetadataError))
    if unreachable or type(e).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}:
        return f"cannot download {filename}: the hub is unreachable ({type(e).__name__}); check the network or HF_ENDPOINT, or {alternative}"
    return f"download of {filename} failed ({type(e).__name__}: {first}); run again, or {alternative}"


def _check_free_space(folder: Path, needed: int | None, filename: str, alternative: str) -> None:
    if not needed:
        return
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < needed:
        raise HubError(f"not enough space for {filename} in {folder}: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free; "
                       f"free space or set HF_HOME elsewhere, or {alternative}")  # fmt: skip


def _verify_sha256(path: Path, expected: str, filename: str, url: str) -> None:
    """Hash a downloaded file; on a mismatch remove it (and, in the cache, its blob)."""
    blob = path.resolve()
    actual = _sha256_with_progress(blob, f"check {filename}")
    if actual != expected:
        for p in (path, blob):
            try:
                os.unlink(p)
            except OSError:
                pass
        raise HubError(f"download of {filename} refused: its sha256 {actual[:12]}... is not the server's {expected[:12]}...; "
                       f"the file was removed — run again ({url})")  # fmt: skip


def _sha256_with_progress(path: Path, what: str) -> str:
    h = hashlib.sha256()
    with bytes_progress() as bar, open(path, "rb") as f:
        task = bar.add_task(what, total=path.stat().st_size)
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            bar.advance(task, len(block))
    return h.hexdigest()


# --------------------------------------------------------------------------- progress


def _progress_enabled() -> bool:
    return os.environ.get("GLIP_PROGRESS", "") != "0"


def bytes_progress():
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False, disable=not _progress_enabled(),
    )  # fmt: skip


def _note(message: str) -> None:
    if _progress_enabled():
        from rich.console import Console

        Console(stderr=True).print(f"[cyan]note:[/] {message}", highlight=False, soft_wrap=True)


class RichDownloadBar:
    """The progress bar huggingface_hub drives during a download (its ``tqdm_class``: it calls
    ``update(n)`` and ``close()`` and uses it as a context manager), drawn with Rich; ``label``
    replaces the truncated URL huggingface_hub would show."""

    label: str | None = None

    def __init__(self, *args, total: int | None = None, initial: int = 0, desc: str | None = None, **kwargs):
        self._progress = bytes_progress()
        self._progress.start()
        self._task = self._progress.add_task(self.label or f"download {desc or ''}".strip(), total=total, completed=initial)

    def update(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    def close(self) -> None:
        self._progress.stop()

    def __enter__(self) -> "RichDownloadBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- listing


def weights_table() -> list[dict]:
    """Every name with its file, variant, size and whether (and where) it is on this machine:
    ``[{"name", "file", "variant", "bytes", "cached", "path"}]``. No network."""
    rows = []
    for w in WEIGHTS:
        path: Path | None
        if w.packaged:
            candidate = PACKAGED_DIR / w.file
            path = candidate if candidate.is_file() else None
        else:
            assert w.repo is not None
            path = cached_file(w.repo, converted_name(w.file)) or cached_file(w.repo, w.file)
        size = w.bytes
        if size is None and path is not None and w.packaged:
            size = path.stat().st_size
        rows.append({"name": w.name, "file": w.file, "variant": w.variant, "bytes": size, "cached": path is not None,
                     "path": str(path) if path is not None else None})  # fmt: skip
    return rows
