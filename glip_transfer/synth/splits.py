"""The synthetic splits: the pretraining corpus and the demo targets, and what each holds out.

* ``pretrain`` — the corpus glip-nano is pretrained on: 8 shapes x 9 colours, minus the
  :data:`HELD_OUT_PAIRS`; the :data:`HELD_OUT_SHAPES` never appear (neither drawn nor named).
  Captions: descriptions and category lists (see :mod:`.captions`); annotations are categorised
  by shape.
* ``novel`` — known words, unseen combinations: the categories are the held-out pairs ("red
  star", ...), among distractor objects of seen pairs (not annotated); pretraining backgrounds
  and sizes.
* ``shifted`` — shape words never seen in pretraining ("heart", "crescent", "arrow",
  "pentagon") in any colour, among distractor objects of seen shapes, on other backgrounds
  (dots, grid, waves) and at larger sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .captions import Vocabulary
from .scene import SceneStyle
from .shapes import COLOURS

PRETRAIN_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring")
HELD_OUT_SHAPES = ("heart", "crescent", "arrow", "pentagon")
HELD_OUT_PAIRS = (
    ("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "square"),
    ("purple", "cross"), ("orange", "hexagon"), ("pink", "diamond"), ("white", "ring"),
)  # fmt: skip
SEEN_PAIRS = tuple((c, s) for s in PRETRAIN_SHAPES for c in COLOURS if (c, s) not in HELD_OUT_PAIRS)


@dataclass(frozen=True)
class SplitSpec:
    """How one synthetic split is drawn.

    ``targets`` are drawn and annotated, ``distractors`` drawn only; ``categories`` says how
    annotations are categorised (``shape``: one category per shape; ``pair``: one per
    colour-shape pair, named "red star"). ``subsets``: images per subset (``train`` is what
    ``--images`` sets). ``describe``: the share of description captions (the rest are category
    lists). Size words: ``small`` below ``small_below`` of the short side, ``large`` from
    ``large_from``."""

    name: str
    summary: str
    style: SceneStyle
    targets: tuple[tuple[str, str], ...]
    distractors: tuple[tuple[str, str], ...] = ()
    targets_per_image: tuple[int, int] = (2, 6)
    distractors_per_image: tuple[int, int] = (0, 0)
    repeat: float = 0.3  # chance that an object repeats the previous one's colour and shape
    categories: str = "shape"
    subsets: dict = field(default_factory=dict)
    describe: float = 0.5
    small_below: float = 0.14
    large_from: float = 0.26
    few_shot: bool = False

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.targets)

    def category_names(self) -> list[str]:
        """The categories in id order (ids from 1)."""
        if self.categories == "pair":
            return [f"{c} {s}" for c, s in self.targets]
        return list(dict.fromkeys(s for _, s in self.targets))

    def category_of(self, colour: str, shape: str) -> str:
        return f"{colour} {shape}" if self.categories == "pair" else shape


SPLITS: dict[str, SplitSpec] = {
    s.name: s
    for s in (
        SplitSpec(
            "pretrain",
            "glip-nano's pretraining corpus: 8 shapes x 9 colours without the held-out pairs",
            SceneStyle(),
            SEEN_PAIRS,
            subsets={"train": 12000, "val": 100},
        ),
        SplitSpec(
            "novel",
            "novel compositions: the held-out colour-shape pairs among seen ones",
            SceneStyle(),
            HELD_OUT_PAIRS,
            SEEN_PAIRS,
            targets_per_image=(1, 3),
            distractors_per_image=(1, 3),
            categories="pair",
            subsets={"train": 200, "val": 60, "test": 100},
            few_shot=True,
        ),
        SplitSpec(
            "shifted",
            "shifted domain: shape words never seen in pretraining, other backgrounds and scales",
            SceneStyle(extent=(0.16, 0.45), backgrounds=("dots", "grid", "waves")),
            tuple((c, s) for s in HELD_OUT_SHAPES for c in COLOURS),
            SEEN_PAIRS,
            targets_per_image=(1, 3),
            distractors_per_image=(0, 2),
            subsets={"train": 200, "val": 60, "test": 100},
            few_shot=True,
        ),
    )
}
