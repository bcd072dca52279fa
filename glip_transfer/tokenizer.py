"""The BERT tokenizer: which one to use (:func:`default_tokenizer`) and loading it
(:func:`load_tokenizer`) from a folder, a ``vocab.txt`` or the Hugging Face hub.

GLIP's BERT weights come from the GLIP checkpoint; only the tokenizer is external. Loading it
never waits on an unreachable hub: the local cache is tried first, then a quick DNS look-up
decides whether the hub is worth asking.
"""

from __future__ import annotations

import functools
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

from .prompts import PromptError

DEFAULT_TOKENIZER = "bert-base-uncased"
BERT_VOCAB_SIZE = 30522
TOKENIZER_ENV = "GLIP_TOKENIZER"


def default_tokenizer(given: str | None = None, fallback: str = DEFAULT_TOKENIZER) -> str:
    """The tokenizer to use: ``given`` (``--tokenizer``), else ``$GLIP_TOKENIZER``, else the
    model's own (``fallback``)."""
    return given or os.environ.get(TOKENIZER_ENV) or fallback


def _tokenizer_fix(name: str) -> str:
    return (
        f"pass --tokenizer DIR (a folder with bert-base-uncased's vocab.txt) or set {TOKENIZER_ENV}=DIR"
        if name == DEFAULT_TOKENIZER
        else "pass --tokenizer DIR with a vocab.txt (bert-base-uncased's), or a Hugging Face hub id"
    )


def _hub_reachable() -> bool:
    """A quick DNS look-up of the hub, so that an offline machine fails at once instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_dir: str):
    """A fast BERT tokenizer: a local folder with ``vocab.txt`` (or ``tokenizer.json``), a path to
    such a ``vocab.txt``, or a Hugging Face hub id (``bert-base-uncased``, from the local cache
    first). Raises :class:`~glip_transfer.prompts.PromptError` (one line naming the tokenizer and
    the fix) when it cannot be loaded. The result is cached per argument; treat it as read-only.
    """
    # transformers costs about a second to import: only when a tokenizer is really loaded
    from transformers import AutoTokenizer, BertTokenizerFast

    from .text_encoders import is_packaged, packaged_dir

    name = str(name_or_dir)
    path = Path(name).expanduser()
    if is_packaged(name):  # an installed encoder package's folder (glip-nano's MiniLM)
        path = packaged_dir(name)
    tokenizer = None
    if path.is_file():
        if path.name != "vocab.txt":
            raise PromptError(f"tokenizer {name!r} is a file but not a vocab.txt: {_tokenizer_fix(name)}")
        path = path.parent
    if path.is_dir():
        if not ((path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file()):
            raise PromptError(f"tokenizer folder {name!r} has no vocab.txt: {_tokenizer_fix(name)}")
        try:
            # transformers 5: BertTokenizer(vocab_file=...) ignores the file; from_pretrained reads it
            tokenizer = BertTokenizerFast.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
            raise PromptError(
                f"tokenizer folder {name!r} could not be read ({_first_line(e)}): {_tokenizer_fix(name)}"
            ) from None
    elif name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.altsep and os.altsep in name):
        raise PromptError(f"tokenizer folder {name!r} does not exist: {_tokenizer_fix(name)}")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the local cache: try the hub if it can be reached
            if not _hub_reachable():
                raise PromptError(
                    f"tokenizer {name!r} is not a folder here nor in the local Hugging Face cache, "
                    f"and the hub cannot be reached: {_tokenizer_fix(name)}"
                ) from None
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except Exception as e:  # noqa: BLE001
                raise PromptError(
                    f"tokenizer {name!r} could not be loaded ({_first_line(e)}): {_tokenizer_fix(name)}"
                ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise PromptError(
            f"tokenizer {name!r} is not a fast tokenizer (char_to_token needs one): {_tokenizer_fix(name)}"
        )
    size = len(tokenizer)
    if size < 1000:
        raise PromptError(f"tokenizer {name!r} has only {size} tokens, not BERT's vocabulary: {_tokenizer_fix(name)}")
    if size != BERT_VOCAB_SIZE:
        warnings.warn(
            f"tokenizer {name!r} has {size} tokens, GLIP's BERT has {BERT_VOCAB_SIZE}: "
            "token ids may not match the checkpoint",
            stacklevel=2,
        )
    return tokenizer
