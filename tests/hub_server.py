"""A stand-in for the Hugging Face hub on 127.0.0.1 for the download tests (weights and datasets).

It answers ``HEAD`` / ``GET /<repo>/resolve/main/<file>`` with the headers huggingface_hub reads
(``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag`` = the sha256, ``Content-Length``,
``Accept-Ranges``; ``Range`` requests get ``206`` with ``Content-Range``), ``404`` with
``X-Error-Code: EntryNotFound`` for a file it does not have, and can misbehave on purpose: cut
the body short once (the client must resume with a ``Range`` request), name a wrong sha256, or
send fewer bytes than the ``HEAD`` announced. Every request is recorded. Use it as a context
manager; it serves from a thread and is shut down on exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    data: bytes
    etag: str | None = None  # default: the sha256 of data
    cut_once_at: int | None = None  # the first full GET stops after this many bytes
    short_by: int = 0  # GET sends this many bytes fewer than HEAD announced

    def __post_init__(self):
        if self.etag is None:
            self.etag = hashlib.sha256(self.data).hexdigest()


class FakeHub:
    def __init__(self, repo: str = "GLIPModel/GLIP"):
        self.repo = repo
        self.files: dict[str, Served] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, file, Range header
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, filename: str, data: bytes, **behaviour) -> Served:
        self.files[filename] = Served(data, **behaviour)
        return self.files[filename]

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, filename: str) -> list[str | None]:
        """The Range headers of the GETs of ``filename`` (None: a full GET)."""
        return [r for m, f, r in self.requests if m == "GET" and f == filename]

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _file(self) -> str | None:
                prefix = f"/{hub.repo}/resolve/main/"
                path = unquote(self.path.split("?")[0])
                return path[len(prefix):] if path.startswith(prefix) else None

            def _missing(self) -> None:
                body = json.dumps({"error": "Entry not found"}).encode()
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Error-Message", "Entry not found")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if self.command == "GET" else 0))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def _headers(self, served: Served, status: int, length: int, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{served.etag}"')
                self.send_header("X-Linked-Etag", f'"{served.etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                name = self._file()
                hub.requests.append(("HEAD", name or self.path, None))
                served = hub.files.get(name or "")
                if served is None:
                    return self._missing()
                self._headers(served, 200, len(served.data))

            def do_GET(self):
                name = self._file()
                rng = self.headers.get("Range")
                hub.requests.append(("GET", name or self.path, rng))
                served = hub.files.get(name or "")
                if served is None:
                    return self._missing()
                data = served.data
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    body = data[start:]
                    self._headers(served, 206, len(body), {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                    self.wfile.write(body)
                    return
                if served.short_by:
                    body = data[: len(data) - served.short_by]
                    self._headers(served, 200, len(body))
                    self.wfile.write(body)
                    return
                self._headers(served, 200, len(data))
                if served.cut_once_at is not None:
                    cut, served.cut_once_at = served.cut_once_at, None
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees a body shorter than Content-Length
                    return
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def hub_env(hf_home: Path, endpoint: str | None, **extra: str) -> dict[str, str]:
    """The environment of a ``glip`` subprocess that uses the fake hub and a private cache."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), GLIP_PROGRESS="0", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="10", HF_HUB_DISABLE_UPDATE_CHECK="1",
               PYTHONWARNINGS="ignore::DeprecationWarning")  # fmt: skip
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    env.pop("GLIP_DATA", None)
    env.update(extra)
    return env


def odinw_zip(recipe, name: str, *, images: int = 1, extra: dict[str, bytes] | None = None) -> bytes:
    """A small zip in the official ODinW layout for ``recipe`` (its split and few-shot files under
    ``<name>/``, as ``odinw_35/<name>.zip`` extracts), with ``extra`` members added verbatim."""
    import numpy as np
    from PIL import Image

    from glip_transfer.datasets import few_shot_files

    def rel(p: str) -> str:
        return str(Path(p).relative_to("odinw"))

    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image, format="JPEG")
    cats = [{"id": c.id, "name": c.name} for c in recipe.categories]
    members: dict[str, bytes] = {}
    for files in recipe.splits.values():
        imgs = [{"id": i + 1, "file_name": f"img{i}.jpg", "width": 64, "height": 48} for i in range(images)]
        anns = [{"id": i + 1, "image_id": i + 1, "category_id": cats[0]["id"], "bbox": [8, 8, 20, 16], "area": 320, "iscrowd": 0}
                for i in range(images)]  # fmt: skip
        members[rel(files.ann_file)] = json.dumps({"images": imgs, "annotations": anns, "categories": cats}).encode()
        for im in imgs:
            members[rel(files.img_dir).rstrip("/") + "/" + im["file_name"]] = image.getvalue()
    for p in few_shot_files(recipe):
        members[rel(p)] = members[rel(recipe.splits["train"].ann_file)]
    members.update(extra or {})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return buf.getvalue()


@contextlib.contextmanager
def hub_in_process(monkeypatch, endpoint: str, hf_home: Path, offline: bool = False):
    """Point this process's huggingface_hub at ``endpoint`` with the cache in ``hf_home``, as
    ``HF_ENDPOINT`` / ``HF_HOME`` / ``HF_HUB_OFFLINE`` do for a fresh process (huggingface_hub
    reads them once, at import, into ``huggingface_hub.constants``)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("GLIP_PROGRESS", "0")
    yield
