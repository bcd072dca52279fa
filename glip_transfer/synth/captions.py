"""Captions of synthetic scenes, with the character spans that link each phrase to its boxes
(the MDETR / GoldG ``tokens_positive`` layout).

Two styles, drawn per image:

* **descriptions** — "two small red circles left of a blue star on a striped background": the
  annotated objects grouped by (size word, colour, shape), counted, optionally one spatial
  relation that holds for every object of the two groups, optionally the background. A
  phrase's span runs from its adjective to its noun (the count word is left out).
* **category lists** — "red circle. star. blue square": the detection-prompt form (phrases
  joined by ``". "``, as evaluation captions are), the objects' descriptions (colour and shape,
  or the shape alone for every object of that shape) mixed with absent descriptions of the
  split's vocabulary as negatives, shuffled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..prompts import SEPARATOR
from .scene import PlacedObject
from .shapes import BACKGROUNDS, SHAPES, SIZE_WORDS

COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",), 4: ("four",), 5: ("five",), 6: ("six",), 7: ("seven",)}
RELATIONS = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"), "above": ("above",),
             "below": ("below", "under")}  # fmt: skip
PREFIXES = ("", "", "an image of ", "a picture of ", "a scene with ")


@dataclass(frozen=True)
class Vocabulary:
    """What a split may name: its (colour, shape) pairs; negatives are drawn from them."""

    pairs: tuple[tuple[str, str], ...]

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(sorted({s for _, s in self.pairs}))


@dataclass
class Caption:
    text: str
    spans: list[list[list[int]]]  # per object: [[start, end], ...]


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str, next_word: str) -> str:
    if word == "a" and next_word[:1] in "aeiou":
        return "an"
    return word


def describe(rng: np.random.Generator, objects: list[PlacedObject], size_words: list[str], background: str) -> Caption:
    """A description caption of ``objects`` (``size_words[i]``: 'small', 'large' or '')."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, (obj, size) in enumerate(zip(objects, size_words)):
        groups.setdefault((size, obj.colour, obj.shape), []).append(i)
    keys = list(groups)
    order = rng.permutation(len(keys))
    keys = [keys[int(i)] for i in order]

    def phrase(key) -> tuple[str, str]:
        """(count word, the phrase the span covers)."""
        size, colour, shape = key
        n = len(groups[key])
        adjective = _choice(rng, SIZE_WORDS[size]) + " " if size else ""
        noun = SHAPES[shape].name if n == 1 else SHAPES[shape].plural
        body = f"{adjective}{colour} {noun}"
        count = _choice(rng, COUNT_WORDS.get(n, ("several",)))
        return _article(count, body), body

    parts = [phrase(k) for k in keys]
    text = _choice(rng, PREFIXES)
    spans: list[list[list[int]]] = [[] for _ in objects]

    def add(i: int) -> None:
        nonlocal text
        count, body = parts[i]
        text += count + " "
        start = len(text)
        text += body
        for obj in groups[keys[i]]:
            spans[obj].append([start, len(text)])

    relation = _relation(objects, groups[keys[0]], groups[keys[1]]) if len(keys) >= 2 and rng.random() < 0.6 else None
    add(0)
    rest = list(range(1, len(keys)))
    if relation is not None:  # "A left of B, with C and D"
        text += " " + _choice(rng, RELATIONS[relation]) + " "
        add(1)
        rest = rest[1:]
        if rest:
            text += ", with "
            add(rest[0])
            rest = rest[1:]
    for j, i in enumerate(rest):  # "A, B and C"
        text += " and " if j == len(rest) - 1 else ", "
        add(i)
    if rng.random() < 0.5:
        words = BACKGROUNDS[background].words
        text += f" on a {_choice(rng, words)} background"
    return Caption(text, spans)


def _relation(objects: list[PlacedObject], first: list[int], second: list[int]) -> str | None:
    """'left' / 'right' / 'above' / 'below' when every object of ``first`` is on that side of
    every object of ``second`` (box edges, not only centres), else None."""
    a = [objects[i].box for i in first]
    b = [objects[i].box for i in second]
    if max(x + w for x, _, w, _ in a) <= min(x for x, _, _, _ in b):
        return "left"
    if min(x for x, _, _, _ in a) >= max(x + w for x, _, w, _ in b):
        return "right"
    if max(y + h for _, y, _, h in a) <= min(y for _, y, _, _ in b):
        return "above"
    if min(y for _, y, _, _ in a) >= max(y + h for _, y, _, h in b):
        return "below"
    return None


def category_list(
    rng: np.random.Generator, objects: list[PlacedObject], vocabulary: Vocabulary, max_negatives: int = 8
) -> Caption:
    """A detection-prompt caption: the objects' descriptions and absent ones, shuffled."""
    present_pairs = {(o.colour, o.shape) for o in objects}
    present_shapes = {o.shape for o in objects}
    shape_only = {s for s in sorted(present_shapes) if rng.random() < 0.3}
    phrases: dict[str, list[int]] = {}
    for i, o in enumerate(objects):
        text = o.shape if o.shape in shape_only else f"{o.colour} {o.shape}"
        phrases.setdefault(text, []).append(i)
    candidates = [f"{c} {s}" for c, s in vocabulary.pairs if (c, s) not in present_pairs and s not in shape_only]
    candidates += [s for s in vocabulary.shapes if s not in present_shapes]
    candidates = sorted(set(candidates))
    count = min(int(rng.integers(0, max_negatives + 1)), len(candidates))
    negatives = [candidates[int(i)] for i in rng.choice(len(candidates), size=count, replace=False)] if count else []
    names = sorted(phrases) + negatives
    names = [names[int(i)] for i in rng.permutation(len(names))]
    text, spans = "", [[] for _ in objects]
    for j, name in enumerate(names):
        start = len(text)
        text += name
        for obj in phrases.get(name, []):
            spans[obj].append([start, len(text)])
        if j != len(names) - 1:
            text += SEPARATOR
    return Caption(text, spans)
