"""Prompts: captions, character spans, token positive maps and chunks, built as the official GLIP does.

Detection as phrase grounding: the category names of a dataset become one caption
(``"person. rocket. american flag"``) and every category is the set of caption tokens its name
covers (the *positive map*). This module reproduces the official evaluation
(``create_queries_and_maps`` in ``maskrcnn_benchmark/engine/inference.py``) exactly:

* categories sorted by id; each name cleaned by :func:`clean_name`; names joined by ``". "``
  with no trailing separator;
* per-category overrides as the official ``DATASETS.OVERRIDE_CATEGORY`` (a replacement name,
  cleaned like any name) and ``DATASETS.CAPTION_PROMPT`` (``prefix + name + suffix``; the
  character span covers only ``name``, which is *not* cleaned);
* char span -> tokens through the fast tokenizer's ``char_to_token`` with the official fallbacks
  (a start on no token tries ``start+1``, ``start+2``; an end on no token tries ``end-2``,
  ``end-3``);
* fixed-size chunks of consecutive categories (``TEST.CHUNKED_EVALUATION``, 40 for LVIS), each
  chunk's caption built the same way.

Beyond the reference: a caption never silently exceeds BERT's 256 tokens (automatic chunking,
or :class:`PromptError`), and a category that maps to no token is reported by name.

Everything here is a pure function of its arguments; the tokenizer itself is loaded by
:mod:`glip_transfer.tokenizer`.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch

from .config import MAX_QUERY_LEN, ConfigError, load_yaml

SEPARATOR = ". "
"""``DATASETS.SEPARATION_TOKENS`` of every released GLIP config."""


class PromptError(ValueError):
    """A prompt, phrase, prompt file or tokenizer problem; the message says what and how to fix it."""


# --------------------------------------------------------------------------- names and categories


def clean_name(name: str) -> str:
    """The official name clean-up: remove ``(...)`` (greedy, first ``(`` to last ``)``), ``_`` to
    space, then ONE pass of ``"  "`` -> ``" "`` (so four spaces become two, and a lone trailing
    space stays). ``"bolt_(fastener)"`` -> ``"bolt "``."""
    name = re.sub(r"\(.*\)", "", name)
    name = re.sub(r"_", " ", name)
    name = re.sub(r"  ", " ", name)
    return name


def is_background(category_id: Any, name: str) -> bool:
    """The official test for the background entry that detection evaluation skips: name
    ``__background__`` or id 0 (Roboflow exports put the dataset name there)."""
    return name == "__background__" or category_id == 0


def as_categories(categories: Any) -> list[tuple[Any, str]]:
    """Categories as ``[(id, name), ...]`` (input order kept). Accepts a mapping ``{id: name}``;
    a sequence of ``{"id", "name"}`` dicts (COCO ``categories``), of ``(id, name)`` pairs, or of
    objects with ``.id`` and ``.name``; or a sequence of plain names (ids 1..N)."""
    if isinstance(categories, Mapping):
        items = list(categories.items())
    elif isinstance(categories, (str, bytes)):
        raise PromptError("categories: expected a list of names or of {id, name} entries, got a single string")
    else:
        items = []
        for i, entry in enumerate(categories):
            if isinstance(entry, str):
                items.append((i + 1, entry))
            elif isinstance(entry, Mapping):
                if "id" not in entry or "name" not in entry:
                    raise PromptError(f"categories[{i}]: each category needs an 'id' and a 'name', got {dict(entry)!r}")
                items.append((entry["id"], entry["name"]))
            elif isinstance(entry, (tuple, list)) and len(entry) == 2:
                items.append((entry[0], entry[1]))
            elif hasattr(entry, "id") and hasattr(entry, "name"):
                items.append((entry.id, entry.name))
            else:
                raise PromptError(
                    f"categories[{i}]: expected a name, an (id, name) pair or an {{id, name}} entry, got {entry!r}"
                )
    for cid, name in items:
        if not isinstance(name, str):
            raise PromptError(f"category {cid!r}: the name must be text, got {name!r}")
    return items


def sort_categories(categories: Sequence[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """Sorted by id as the official evaluation orders them; duplicate ids are an error."""
    ids = [cid for cid, _ in categories]
    seen: set = set()
    for cid in ids:
        if cid in seen:
            raise PromptError(f"category id {cid!r} appears twice: category ids must be unique")
        seen.add(cid)
    try:
        return sorted(categories, key=lambda c: c[0])
    except TypeError:
        raise PromptError("category ids are not comparable (mixed types?): use whole numbers as ids") from None


def drop_background(categories: Sequence[tuple[Any, str]]) -> tuple[list[tuple[Any, str]], list[str]]:
    """``(kept, dropped_names)``: the official evaluation leaves out :func:`is_background` entries."""
    kept = [(cid, name) for cid, name in categories if not is_background(cid, name)]
    dropped = [name for cid, name in categories if is_background(cid, name)]
    return kept, dropped


# --------------------------------------------------------------------------- prompt files


@dataclass(frozen=True)
class CategoryPrompt:
    """How one category appears in the caption (one entry of a prompt file).

    ``override``: a replacement name (official ``OVERRIDE_CATEGORY``): shown in results, cleaned
    with :func:`clean_name` and written into the caption like any name.
    ``prefix``/``name``/``suffix``: a caption prompt (official ``CAPTION_PROMPT``): the caption gets
    ``prefix + name + suffix``; the category's span covers ``name`` only, which is used as
    written (not cleaned). Without ``name`` the (override or dataset) name is used, cleaned.
    """

    id: Any
    override: str | None = None
    prefix: str = ""
    name: str | None = None
    suffix: str = ""

    @property
    def is_caption_prompt(self) -> bool:
        return self.name is not None or bool(self.prefix) or bool(self.suffix)


PROMPT_ENTRY_KEYS = ("id", "override", "prefix", "name", "suffix", "note")


def parse_prompt_entries(data: Any, where: str = "prompts") -> dict[Any, CategoryPrompt]:
    """Prompt-file data (``{"categories": [...]}`` or the list itself) -> ``{id: CategoryPrompt}``.
    See ``prompts/README.md`` for the format. Raises :class:`PromptError` naming ``where``."""
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"categories", "description", "source"})
        if unknown:
            raise PromptError(
                f"{where}: unknown key {unknown[0]!r} (a prompt file has 'categories', 'description', 'source')"
            )
        entries = data.get("categories")
        if entries is None:
            raise PromptError(f"{where}: no 'categories' list (add categories: [{{id: 1, override: ...}}])")
    else:
        entries = data
    if not isinstance(entries, list):
        raise PromptError(f"{where}: 'categories' must be a list of {{id, override | prefix/name/suffix}} entries")
    out: dict[Any, CategoryPrompt] = {}
    for i, entry in enumerate(entries):
        at = f"{where}: categories[{i}]"
        if not isinstance(entry, Mapping):
            raise PromptError(f"{at}: expected a mapping like {{id: 1, override: name}}, got {entry!r}")
        unknown = sorted(set(entry) - set(PROMPT_ENTRY_KEYS))
        if unknown:
            raise PromptError(f"{at}: unknown key {unknown[0]!r} (known: {', '.join(PROMPT_ENTRY_KEYS)})")
        if "id" not in entry:
            raise PromptError(f"{at}: missing 'id' (the dataset category id this entry applies to)")
        cid = entry["id"]
        if isinstance(cid, bool) or not isinstance(cid, (int, str)):
            raise PromptError(f"{at}.id: expected a category id (a whole number), got {cid!r}")
        for key in ("override", "prefix", "name", "suffix", "note"):
            if key in entry and entry[key] is not None and not isinstance(entry[key], str):
                raise PromptError(f"{at}.{key}: expected text (quote it in YAML), got {entry[key]!r}")
        if cid in out:
            raise PromptError(f"{at}: category id {cid!r} has two entries; merge them into one")
        prompt = CategoryPrompt(
            id=cid,
            override=entry.get("override"),
            prefix=entry.get("prefix") or "",
            name=entry.get("name"),
            suffix=entry.get("suffix") or "",
        )
        if prompt.override is None and not prompt.is_caption_prompt:
            raise PromptError(f"{at}: the entry changes nothing; give 'override' or 'prefix'/'name'/'suffix'")
        out[cid] = prompt
    return out


def load_prompt_file(path: str | os.PathLike) -> dict[Any, CategoryPrompt]:
    """Read a prompt YAML (format in ``prompts/README.md``) -> ``{category id: CategoryPrompt}``."""
    try:
        data = load_yaml(path)
    except ConfigError as e:
        raise PromptError(str(e)) from None
    return parse_prompt_entries(data, str(path))


# --------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionCategory:
    """One category of a caption: dataset id, display name and its character spans ``[start, end)``."""

    category_id: Any
    name: str
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Caption:
    """A caption and, per label (1-based position), the category it grounds."""

    text: str
    categories: tuple[CaptionCategory, ...]

    @property
    def spans_per_label(self) -> list[list[tuple[int, int]]]:
        return [list(c.spans) for c in self.categories]

    @property
    def category_ids(self) -> list[Any]:
        return [c.category_id for c in self.categories]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def label_to_category_id(self) -> dict[int, Any]:
        """Label (row of the positive map + 1, as the model's detections carry it) -> category id."""
        return {i + 1: c.category_id for i, c in enumerate(self.categories)}


def build_caption(
    categories: Any,
    prompts: Mapping[Any, CategoryPrompt] | None = None,
    separator: str = SEPARATOR,
    sort: bool = True,
) -> Caption:
    """The detection caption of ``categories`` (see :func:`as_categories`), exactly as the official
    evaluation builds it: sorted by id (``sort``), each cleaned name, or its prompt-file form,
    joined by ``separator`` with no trailing separator. No tokenizer involved: the caption may be
    too long for BERT (use :func:`build_detection_prompt` for a checked, chunked prompt)."""
    cats = as_categories(categories)
    if sort:
        cats = sort_categories(cats)
    prompts = prompts or {}
    text = ""
    out = []
    for index, (cid, name) in enumerate(cats):
        prompt = prompts.get(cid)
        display = prompt.override if prompt is not None and prompt.override is not None else name
        if prompt is not None and prompt.is_caption_prompt:
            text += prompt.prefix
            start = len(text)
            text += prompt.name if prompt.name is not None else clean_name(display)
            end = len(text)
            text += prompt.suffix
        else:
            start = len(text)
            text += clean_name(display)
            end = len(text)
        out.append(CaptionCategory(cid, display, ((start, end),)))
        if index != len(cats) - 1:
            text += separator
    return Caption(text, tuple(out))


# --------------------------------------------------------------------------- tokens


def tokenize(tokenizer, captions: str | Sequence[str], max_len: int = MAX_QUERY_LEN):
    """``input_ids`` / ``attention_mask`` (``[B, max_len]`` int64), padded to ``max_len`` as GLIP's
    language backbone does (no ``token_type_ids``: BERT gets zeros). A caption longer than
    ``max_len`` tokens raises :class:`PromptError` instead of being cut (chunk the categories)."""
    texts = [captions] if isinstance(captions, str) else list(captions)
    if not texts:
        raise PromptError("no caption to tokenize")
    lengths = [len(ids) for ids in _encode(tokenizer, texts, add_special_tokens=True)["input_ids"]]
    for text, n in zip(texts, lengths):
        if n > max_len:
            raise PromptError(
                f"caption is {n} tokens, more than the {max_len} BERT takes ({text[:40]!r}...): "
                "split the categories into chunks (build_detection_prompt does) or shorten the prompt"
            )
    return tokenizer(
        texts,
        max_length=max_len,
        padding="max_length",
        truncation=True,
        return_token_type_ids=False,
        return_tensors="pt",
    )


@contextlib.contextmanager
def _no_length_warning():
    """Silence transformers' "sequence length is longer than the maximum" log line while counting
    tokens of captions that are too long on purpose (they are chunked, never fed whole)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _encode(tokenizer, text, **kwargs):
    with _no_length_warning():
        return tokenizer(text, truncation=False, **kwargs)


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` including ``[CLS]`` and ``[SEP]``."""
    return len(_encode(tokenizer, text, add_special_tokens=True)["input_ids"])


def _char_to_token(encoding, position: int) -> int | None:
    """``encoding.char_to_token`` that answers None where the official code's try/except does."""
    if position < 0:
        return None
    try:
        return encoding.char_to_token(position)
    except Exception:  # noqa: BLE001 - the official fallbacks swallow any error
        return None


def span_to_tokens(encoding, start: int, end: int) -> tuple[int, int] | None:
    """First and last token (inclusive) of the characters ``[start, end)``, with the official
    fallbacks; None when either end maps to no token."""
    first = _char_to_token(encoding, start)
    last = _char_to_token(encoding, end - 1)
    if first is None:
        first = _char_to_token(encoding, start + 1)
        if first is None:
            first = _char_to_token(encoding, start + 2)
    if last is None:
        last = _char_to_token(encoding, end - 2)
        if last is None:
            last = _char_to_token(encoding, end - 3)
    if first is None or last is None:
        return None
    return first, last


class PositiveMap(NamedTuple):
    """``matrix``: ``[num_labels, max_len]`` float32 0/1, row i = label i+1; ``undetectable``: the
    names (or ``"label N"``) of rows without any token."""

    matrix: torch.Tensor
    undetectable: list[str]


def positive_map(
    tokenized_encoding,
    spans_per_label: Sequence[Sequence[tuple[int, int]]],
    max_len: int = MAX_QUERY_LEN,
    names: Sequence[str] | None = None,
    warn: bool = True,
) -> PositiveMap:
    """Character spans -> the 0/1 token map ``[num_labels, max_len]`` (official
    ``create_positive_dict``): for each span, the tokens from the one of ``start`` to the one of
    ``end - 1`` (fallbacks in :func:`span_to_tokens`). ``tokenized_encoding``: the tokenizer's
    output for ONE caption (a ``BatchEncoding`` or a ``tokenizers.Encoding``). Rows without any
    token are returned by name in ``undetectable`` and, with ``warn``, reported by
    ``warnings.warn``; a token past ``max_len`` raises :class:`PromptError`."""
    encodings = getattr(tokenized_encoding, "encodings", None)
    if encodings is not None and len(encodings) != 1:
        raise PromptError(
            f"positive_map takes the encoding of one caption, got a batch of {len(encodings)}: pass encoding[i]"
        )
    matrix = torch.zeros((len(spans_per_label), max_len), dtype=torch.float32)
    for row, spans in enumerate(spans_per_label):
        for start, end in spans:
            found = span_to_tokens(tokenized_encoding, int(start), int(end))
            if found is None:
                continue
            first, last = found
            if last >= max_len:
                raise PromptError(
                    f"label {row + 1} lies at token {last}, past the {max_len} tokens BERT takes: chunk the categories"
                )
            matrix[row, first : last + 1] = 1.0
    empty = [row for row in range(matrix.shape[0]) if not bool(matrix[row].any())]
    undetectable = [names[row] if names is not None else f"label {row + 1}" for row in empty]
    if undetectable and warn:
        warnings.warn(undetectable_message(undetectable), stacklevel=2)
    return PositiveMap(matrix, undetectable)


def undetectable_message(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    what = "category maps" if len(names) == 1 else f"{len(names)} categories map"
    return f"{what} to no token of the caption and cannot be detected: {shown} (an empty or blank name; rename it)"


def label_to_tokens(matrix: torch.Tensor, plus: int = 1) -> dict[int, list[int]]:
    """``{label: [token positions]}`` from a positive map (official
    ``create_positive_map_label_to_token_from_positive_map``; ``plus=1`` as for GLIP's head)."""
    return {row + plus: torch.nonzero(matrix[row], as_tuple=True)[0].tolist() for row in range(matrix.shape[0])}


def labels_to_category_ids(labels: Iterable[int] | torch.Tensor, label_to_category_id: Mapping[int, Any]) -> list[Any]:
    """Detections' labels -> dataset category ids; an unknown label raises :class:`PromptError`."""
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    out = []
    for label in labels:
        if int(label) not in label_to_category_id:
            raise PromptError(f"label {label} is not in the prompt (labels 1..{len(label_to_category_id)})")
        out.append(label_to_category_id[int(label)])
    return out


# --------------------------------------------------------------------------- detection prompts and chunks


@dataclass(frozen=True)
class PromptChunk:
    """One forward pass worth of categories: caption, positive map ``[n, max_len]`` and the
    label (row + 1) -> category id mapping."""

    caption: Caption
    positive_map: torch.Tensor
    undetectable: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return self.caption.text

    @property
    def category_ids(self) -> list[Any]:
        return self.caption.category_ids

    @property
    def names(self) -> list[str]:
        return self.caption.names

    @property
    def label_to_category_id(self) -> dict[int, Any]:
        return self.caption.label_to_category_id

    @property
    def label_to_tokens(self) -> dict[int, list[int]]:
        return label_to_tokens(self.positive_map)


@dataclass(frozen=True)
class DetectionPrompt:
    """The prompt(s) of a set of categories: one chunk, or several when they do not fit in one
    caption. ``notices`` says what was done beyond the plain official caption (automatic
    chunking, background entries left out)."""

    chunks: tuple[PromptChunk, ...]
    notices: tuple[str, ...] = ()
    dropped_background: tuple[str, ...] = ()

    @property
    def captions(self) -> list[str]:
        return [c.text for c in self.chunks]

    @property
    def chunked(self) -> bool:
        return len(self.chunks) > 1

    @property
    def undetectable(self) -> list[str]:
        return [name for c in self.chunks for name in c.undetectable]

    @property
    def category_ids(self) -> list[Any]:
        return [cid for c in self.chunks for cid in c.category_ids]

    @property
    def caption_or_captions(self) -> str | list[str]:
        """The single caption, or the list of captions when chunked (as ``glip recipes show`` prints)."""
        return self.captions if self.chunked else self.captions[0]


def _fixed_chunks(items: list, size: int) -> list[list]:
    """Consecutive groups of ``size`` (official ``chunks``)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _piece(cid: Any, name: str, prompts: Mapping[Any, CategoryPrompt]) -> str:
    """The caption text of one category (what :func:`build_caption` writes for it)."""
    return build_caption([(cid, name)], prompts, sort=False).text


def split_to_fit(
    tokenizer,
    categories: Sequence[tuple[Any, str]],
    prompts: Mapping[Any, CategoryPrompt] | None = None,
    max_len: int = MAX_QUERY_LEN,
    separator: str = SEPARATOR,
) -> list[list[tuple[Any, str]]]:
    """Consecutive groups of ``categories`` (order kept) whose captions each fit in ``max_len``
    tokens, filled greedily; every group's caption is checked with the tokenizer."""
    prompts = prompts or {}
    cats = list(categories)
    if not cats:
        return []
    pieces = [_piece(cid, name, prompts) for cid, name in cats]
    piece_tokens = [len(ids) for ids in _encode(tokenizer, pieces, add_special_tokens=False)["input_ids"]]
    sep_tokens = len(_encode(tokenizer, separator, add_special_tokens=False)["input_ids"])
    specials = token_count(tokenizer, "")

    def fits(group: list[tuple[Any, str]]) -> bool:
        return token_count(tokenizer, build_caption(group, prompts, separator, sort=False).text) <= max_len

    groups: list[list[tuple[Any, str]]] = []
    start = 0
    while start < len(cats):
        used, end = specials + piece_tokens[start], start + 1
        while end < len(cats) and used + sep_tokens + piece_tokens[end] <= max_len:
            used += sep_tokens + piece_tokens[end]
            end += 1
        while end - start > 1 and not fits(cats[start:end]):
            end -= 1
        if not fits(cats[start:end]):
            cid, name = cats[start]
            raise PromptError(
                f"category {name!r} (id {cid!r}) alone is more than {max_len} tokens: shorten its name or caption "
                "prompt"
            )
        groups.append(cats[start:end])
        start = end
    return groups


def build_detection_prompt(
    tokenizer,
    categories: Any,
    prompts: Mapping[Any, CategoryPrompt] | None = None,
    chunk_size: int | None = None,
    max_len: int = MAX_QUERY_LEN,
    separator: str = SEPARATOR,
    drop_background_entries: bool = True,
    warn: bool = True,
) -> DetectionPrompt:
    """The evaluation prompt(s) of ``categories`` (see :func:`as_categories`).

    Sorted by id; background entries (:func:`is_background`) left out as the official evaluation
    does (``drop_background_entries``). ``chunk_size``: consecutive chunks of that many categories,
    each with its own caption built the same way (official ``TEST.CHUNKED_EVALUATION``). Without
    it, one caption, or, when that exceeds ``max_len`` tokens, the fewest greedy chunks that fit
    (said in ``notices``). A fixed-size chunk that is too long is split further (also noticed).
    Categories that map to no token are listed in each chunk's ``undetectable`` and, with
    ``warn``, reported once by ``warnings.warn``.
    """
    prompts = dict(prompts or {})
    cats = sort_categories(as_categories(categories))
    notices: list[str] = []
    dropped: list[str] = []
    if drop_background_entries:
        cats, dropped = drop_background(cats)
        if dropped:
            notices.append(
                f"left out {len(dropped)} background entr{'y' if len(dropped) == 1 else 'ies'} (name __background__ "
                f"or id 0): {', '.join(repr(d) for d in dropped)}"
            )
    if not cats:
        raise PromptError("no categories to build a prompt from")
    ids = {cid for cid, _ in cats}
    stray = [cid for cid in prompts if cid not in ids]
    if stray:
        raise PromptError(
            f"prompt entry for category id {stray[0]!r}, which is not a category here (ids: {_id_range(cats)}): fix "
            "the prompt file's ids"
        )
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise PromptError(f"chunk size must be a whole number >= 1, got {chunk_size!r}")
        planned = _fixed_chunks(cats, chunk_size)
    else:
        planned = [cats]

    groups: list[list[tuple[Any, str]]] = []
    for group in planned:
        text = build_caption(group, prompts, separator, sort=False).text
        n = token_count(tokenizer, text)
        if n <= max_len:
            groups.append(group)
            continue
        parts = split_to_fit(tokenizer, group, prompts, max_len, separator)
        groups.extend(parts)
        what = (
            "the categories" if chunk_size is None else f"a chunk of {len(group)} categories (ids {_id_range(group)})"
        )
        sizes = [len(p) for p in parts]
        sizes_text = ", ".join(map(str, sizes)) if len(sizes) <= 4 else f"{min(sizes)} to {max(sizes)}"
        notices.append(
            f"{what} need {n} tokens, more than the {max_len} BERT takes: split into {len(parts)} captions of "
            f"{sizes_text} categories (one forward pass each)"
        )

    chunks = []
    for group in groups:
        caption = build_caption(group, prompts, separator, sort=False)
        encoding = _encode(tokenizer, caption.text, add_special_tokens=True)
        pmap = positive_map(encoding, caption.spans_per_label, max_len, caption.names, warn=False)
        chunks.append(PromptChunk(caption, pmap.matrix, tuple(pmap.undetectable)))
    result = DetectionPrompt(tuple(chunks), tuple(notices), tuple(dropped))
    if warn and result.undetectable:
        warnings.warn(undetectable_message(result.undetectable), stacklevel=2)
    return result


def _id_range(cats: Sequence[tuple[Any, str]]) -> str:
    ids = [cid for cid, _ in cats]
    return f"{ids[0]!r}..{ids[-1]!r}" if len(ids) > 1 else repr(ids[0])


# --------------------------------------------------------------------------- free text


def phrase_caption(prompt: str, phrases: Sequence[str] | None = None) -> Caption:
    """A free-text prompt for ``glip predict --prompt TEXT [--phrase P ...]``.

    With ``phrases``: each phrase is grounded at its first occurrence in ``prompt`` (exact, else
    ignoring case); a phrase that does not occur raises :class:`PromptError`. Without: the
    prompt is split at periods and each stripped, non-empty part is a phrase. Labels are 1..N in
    phrase order, ``category_id`` = label, ``name`` = the phrase.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("--prompt is empty: give a sentence, e.g. --prompt 'a man riding a red bicycle'")
    out: list[CaptionCategory] = []
    if phrases:
        for i, phrase in enumerate(phrases):
            if not isinstance(phrase, str) or not phrase.strip():
                raise PromptError(f"--phrase number {i + 1} is empty: give a part of the prompt")
            start = prompt.find(phrase)
            if start < 0:
                match = re.search(re.escape(phrase), prompt, flags=re.IGNORECASE)
                if match is None:
                    raise PromptError(
                        f"--phrase {phrase!r} is not in the prompt {prompt!r}: each phrase must be a part of the prompt"
                    )
                start, end = match.start(), match.end()
            else:
                end = start + len(phrase)
            out.append(CaptionCategory(i + 1, phrase, ((start, end),)))
    else:
        for match in re.finditer(r"[^.]+", prompt):
            part = match.group()
            stripped = part.strip()
            if not stripped:
                continue
            start = match.start() + (len(part) - len(part.lstrip()))
            label = len(out) + 1
            out.append(CaptionCategory(label, stripped, ((start, start + len(stripped)),)))
        if not out:
            raise PromptError(f"--prompt {prompt!r} has no phrase: write words, e.g. 'cat. dog'")
    return Caption(prompt, tuple(out))


def phrase_prompt(
    tokenizer, prompt: str, phrases: Sequence[str] | None = None, max_len: int = MAX_QUERY_LEN, warn: bool = True
) -> PromptChunk:
    """:func:`phrase_caption` with its positive map, checked against ``max_len`` tokens."""
    caption = phrase_caption(prompt, phrases)
    n = token_count(tokenizer, caption.text)
    if n > max_len:
        raise PromptError(f"--prompt is {n} tokens, more than the {max_len} BERT takes: shorten it")
    encoding = tokenizer(caption.text, add_special_tokens=True, truncation=False)
    pmap = positive_map(encoding, caption.spans_per_label, max_len, caption.names, warn=warn)
    return PromptChunk(caption, pmap.matrix, tuple(pmap.undetectable))
