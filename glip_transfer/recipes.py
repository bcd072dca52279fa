"""Dataset recipes: where a benchmark's files are, its categories, how it is evaluated and tuned.

A recipe is one YAML file in the repository's ``recipes/`` folder (``odinw35/<official config
name>``, ``odinw13/<...>``, ``coco``, ``lvis-minival``, ``lvis-val``), or any YAML path. The
schema is :class:`Recipe`; ``recipes/README.md`` documents it. Paths in a recipe are relative to
a data root (``--data-root``). Names resolve in :func:`recipes_dir`: ``$GLIP_RECIPES_DIR``, else
the ``recipes/`` folder next to the package (a source or editable install), else a copy shipped
inside the package (``glip_transfer/_recipes``). Prompt files resolve likewise in
:func:`prompts_dir` (``$GLIP_PROMPTS_DIR``, ``prompts/``, ``glip_transfer/_prompts``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, apply_overrides, explain_override, from_dict, load_yaml, size_problem, to_dict
from .prompts import (
    DetectionPrompt,
    PromptError,
    as_categories,
    build_caption,
    build_detection_prompt,
    drop_background,
    is_background,
    load_prompt_file,
    sort_categories,
)

FROM_ANNOTATIONS = "from_annotations"
METRICS = ("coco", "lvis_fixed_ap", "lvis")
TRAINS = ("all", "prompt", "head_predictors")
PACKAGE_DIR = Path(__file__).resolve().parent


class RecipeError(ConfigError):
    """A recipe is missing, malformed or inconsistent; the message names the file, the field and the fix."""


# --------------------------------------------------------------------------- schema


@dataclass
class SplitFiles:
    """One split: the COCO annotation JSON and the image folder, relative to the data root."""

    ann_file: str
    img_dir: str


@dataclass
class FewShotFiles:
    """The official prepared few-shot subsets: ``{shot}`` / ``{seed}`` are filled in; images are
    in the split's own ``img_dir``."""

    shots: tuple[int, ...] = (1, 3, 5, 10)
    seeds: tuple[int, ...] = (3, 30, 300)
    train_ann_file: str | None = None
    val_ann_file: str | None = None
    minival_ann_file: str | None = None

    def ann_file(self, split: str, shot: int, seed: int) -> str:
        pattern = getattr(self, f"{split}_ann_file", None)
        if pattern is None:
            raise RecipeError(
                f"few_shot: no prepared {split} subsets (splits with them: {', '.join(self.splits) or 'none'})"
            )
        return pattern.format(shot=shot, seed=seed)

    @property
    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "minival") if getattr(self, f"{s}_ann_file") is not None]


@dataclass
class Category:
    id: int
    name: str


@dataclass
class EvaluationConfig:
    """How a model is evaluated on a dataset: the one set of settings that ``glip zeroshot eval``
    and validation / test in ``glip finetune`` share (a recipe's ``evaluation:`` section, then
    ``--set evaluation.KEY=VALUE``). Thresholds (``model.postprocess.*``) are the model's; both
    commands record the settings in force in their provenance."""

    split: str = "val"
    min_size: int = 800  # INPUT.MIN_SIZE_TEST
    max_size: int = 1333  # INPUT.MAX_SIZE_TEST
    detections_per_img: int = 100
    chunk_size: int | None = None  # TEST.CHUNKED_EVALUATION; None = one caption (chunked only if too long)
    metric: str = "coco"  # coco | lvis_fixed_ap | lvis
    batch_size: int | None = None  # images per forward: None = 1 on a CPU, 4 on CUDA (results do not depend on it)
    amp: bool = False  # CUDA mixed precision (bf16 where supported, else fp16); a CPU stays float32

    def batch_size_on(self, device) -> int:
        """The batch size in force on ``device`` (a ``torch.device`` or its name)."""
        if self.batch_size is not None:
            return self.batch_size
        return 4 if str(getattr(device, "type", device)).startswith("cuda") else 1

    def model_overrides(self) -> list[str]:
        """The model settings (``--set model.*`` form, prefix removed) that evaluate as this says:
        the test resize and the detections kept per image."""
        return [
            f"input.min_size={self.min_size}",
            f"input.max_size={self.max_size}",
            f"postprocess.detections_per_img={self.detections_per_img}",
        ]


Evaluation = EvaluationConfig
"""The earlier name of :class:`EvaluationConfig`."""


@dataclass
class TuningMode:
    """Optimiser settings of one transfer mode."""

    lr: float
    weight_decay: float
    language_lr: float | None = None  # lr of the BERT text encoder (None: the same as lr / frozen)
    freeze_backbone_at: int | None = None  # Swin: 0 patch embed, k >= 2 also stages 1..k-1; None: n/a
    trains: str = "all"  # all | prompt | head_predictors


@dataclass
class AllDataTuning:
    copies: int = 1
    lr_patience: int = 2
    early_stop_patience: int = 4


def _official_modes() -> dict[str, TuningMode]:
    return {
        "full": TuningMode(lr=1e-4, weight_decay=0.05, language_lr=1e-5, freeze_backbone_at=2, trains="all"),
        "prompt": TuningMode(lr=0.05, weight_decay=0.25, trains="prompt"),
        "linear_probe": TuningMode(lr=1e-4, weight_decay=0.05, trains="head_predictors"),
    }


@dataclass
class Tuning:
    """The official ODinW transfer protocol; defaults are the official values (see recipes/README.md)."""

    optimizer: str = "adamw"
    batch_size: int = 4
    max_epochs: int = 200
    warmup_iters: int = 0
    use_amp: bool = True
    grad_clip_norm: float = 1.0
    bias_lr_factor: float = 2.0
    bias_weight_decay: float = 0.0
    lr_decay_factor: float = 0.1
    lr_patience: int = 3
    min_lr: float = 1e-6
    early_stop_patience: int = 8
    eval_every_epochs: float = 1.0
    model_ema: float = 0.0
    seed: int = 10
    shuffle_seed: int = 3
    val_split: str = "val"
    test_split: str = "test"
    few_shot_copies: dict = field(default_factory=lambda: {1: 8, 3: 4, 5: 2, 10: 1})
    all_data: AllDataTuning = field(default_factory=AllDataTuning)
    modes: dict = field(default_factory=_official_modes)

    def mode(self, name: str) -> TuningMode:
        if name not in self.modes:
            raise RecipeError(f"tuning mode {name!r} is not in this recipe (modes: {', '.join(self.modes)})")
        return self.modes[name]


@dataclass
class Synthetic:
    """Data the package renders itself (:mod:`glip_transfer.synth`): split ``split`` with
    ``seed`` (``images``: training images, None = the split's default), written into ``folder``
    under the data root the first time a command needs it."""

    split: str
    folder: str
    seed: int = 0
    images: int | None = None


@dataclass
class Pretraining:
    """How ``glip pretrain`` trains on this recipe: the model to start from when the command line
    names none (``variant``: random vision weights; a variant with a packaged language encoder
    gets it), and training settings (:class:`glip_transfer.training.config.TrainConfig` fields)
    that replace the GLIP-T pretraining defaults; ``--set train.*`` still overrides them."""

    variant: str | None = None
    train: dict = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    splits: dict
    categories: Any  # list[Category] or "from_annotations"
    description: str = ""
    source: str = ""
    aliases: list[str] = field(default_factory=list)
    few_shot: FewShotFiles | None = None
    prompts: str | None = None  # prompt file: a path, or a name in prompts_dir()
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tuning: Tuning | None = None
    weights: str | None = None  # default --weights of the commands (a file or a weights name, e.g. glip-nano)
    synthetic: Synthetic | None = None
    pretraining: Pretraining | None = None
    path: str | None = None  # where it was read from (set by load_recipe)

    @property
    def categories_from_annotations(self) -> bool:
        return self.categories == FROM_ANNOTATIONS

    def split(self, name: str | None = None) -> SplitFiles:
        """The files of split ``name`` (default: the evaluation split)."""
        name = name or self.evaluation.split
        if name not in self.splits:
            raise RecipeError(f"recipe {self.name}: no split {name!r} (splits: {', '.join(self.splits)})")
        return self.splits[name]

    def category_list(self) -> list[tuple[int, str]]:
        if self.categories_from_annotations:
            raise RecipeError(
                f"recipe {self.name} takes its categories from the annotation file: "
                "read them from the split's ann_file (resolve_categories(recipe, annotation_categories))"
            )
        return [(c.id, c.name) for c in self.categories]


# --------------------------------------------------------------------------- folders


def _env_dir(variable: str) -> Path | None:
    value = os.environ.get(variable)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise RecipeError(f"${variable}={value!r} is not a folder: point it at a folder of recipe YAMLs or unset it")
    return path


def recipes_dir() -> Path:
    """The folder that recipe names resolve in: ``$GLIP_RECIPES_DIR``, else ``recipes/`` beside
    the package (source / editable install), else ``glip_transfer/_recipes`` (packaged copy)."""
    env = _env_dir("GLIP_RECIPES_DIR")
    if env is not None:
        return env
    for candidate in (PACKAGE_DIR.parent / "recipes", PACKAGE_DIR / "_recipes"):
        if candidate.is_dir():
            return candidate
    raise RecipeError("no recipes folder found: set GLIP_RECIPES_DIR to the repository's recipes/ folder")


def prompts_dir() -> Path:
    """Where prompt-file names resolve: ``$GLIP_PROMPTS_DIR``, else ``prompts/`` beside the
    recipes folder, else ``glip_transfer/_prompts``."""
    env = _env_dir("GLIP_PROMPTS_DIR")
    if env is not None:
        return env
    candidates = [PACKAGE_DIR.parent / "prompts", PACKAGE_DIR / "_prompts"]
    try:
        candidates.insert(0, recipes_dir().parent / "prompts")
    except RecipeError:
        pass
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise RecipeError("no prompts folder found: set GLIP_PROMPTS_DIR to the repository's prompts/ folder")


# --------------------------------------------------------------------------- loading and validation


def parse_recipe(data: dict, where: str = "recipe", path: str | None = None) -> Recipe:
    """A recipe from its YAML mapping, validated; errors are one line naming ``where`` and the
    field. ``path``: the file it came from (relative prompt files resolve beside it)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    for key in ("name", "splits", "categories"):
        if key not in data:
            hint = {
                "name": "add name: <folder>/<file name without .yaml>",
                "splits": "add splits: {val: {ann_file: ..., img_dir: ...}}",
                "categories": "add categories: [{id: 1, name: ...}] or categories: from_annotations",
            }[key]
            raise RecipeError(f"{where}: missing '{key}' ({hint})")
    if data.get("path") is not None:
        raise RecipeError(f"{where}: 'path' is set by the loader; remove it from the file")
    raw_categories = data.get("categories")
    if isinstance(raw_categories, str):
        if raw_categories != FROM_ANNOTATIONS:
            raise RecipeError(
                f"{where}: categories: {raw_categories!r} is not a list; write a list of {{id, name}} or "
                f"'{FROM_ANNOTATIONS}'"
            )
        categories: Any = FROM_ANNOTATIONS
    elif isinstance(raw_categories, list):
        categories = []
        for i, entry in enumerate(raw_categories):
            at = f"{where}: categories[{i}]"
            if not isinstance(entry, dict):
                raise RecipeError(f"{at}: expected {{id: N, name: TEXT}}, got {entry!r}")
            if "id" not in entry or "name" not in entry:
                raise RecipeError(f"{at}: needs both 'id' and 'name' (name in quotes keeps spaces), got {entry!r}")
            try:
                categories.append(from_dict(Category, entry, at))
            except ConfigError as e:
                raise RecipeError(str(e)) from None
        seen: dict[int, int] = {}
        for i, cat in enumerate(categories):
            if cat.id in seen:
                raise RecipeError(
                    f"{where}: categories[{i}]: id {cat.id} repeats categories[{seen[cat.id]}]; ids must be unique"
                )
            seen[cat.id] = i
        if not categories:
            raise RecipeError(
                f"{where}: categories is empty; list the dataset's categories or write '{FROM_ANNOTATIONS}'"
            )
    else:
        raise RecipeError(
            f"{where}: categories: expected a list of {{id, name}} or '{FROM_ANNOTATIONS}', got {raw_categories!r}"
        )
    data["categories"] = []
    splits = data.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise RecipeError(f"{where}: splits: expected a mapping like {{val: {{ann_file: ..., img_dir: ...}}}}")
    parsed_splits = {}
    for split, entry in splits.items():
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: splits.{split}: expected {{ann_file: ..., img_dir: ...}}, got {entry!r}")
        try:
            parsed_splits[str(split)] = from_dict(SplitFiles, entry, f"{where}: splits.{split}")
        except (ConfigError, TypeError) as e:
            if isinstance(e, TypeError):
                raise RecipeError(f"{where}: splits.{split}: needs both 'ann_file' and 'img_dir'") from None
            raise RecipeError(str(e)) from None
    data["splits"] = {}
    tuning_raw = data.pop("tuning", None)
    try:
        recipe = from_dict(Recipe, data, where)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}") from None
    except ConfigError as e:
        raise RecipeError(_tidy(str(e), where)) from None
    recipe.categories = categories
    recipe.splits = parsed_splits
    recipe.path = path
    if tuning_raw is not None:
        recipe.tuning = _parse_tuning(tuning_raw, f"{where}: tuning")
    _validate(recipe, where)
    return recipe


def _tidy(message: str, where: str) -> str:
    """``from_dict`` writes ``where.key``; make it ``where: key``."""
    return message.replace(f"{where}.", f"{where}: ", 1) if message.startswith(f"{where}.") else message


def _parse_tuning(raw: Any, where: str) -> Tuning:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of tuning settings, got {raw!r}")
    raw = dict(raw)
    modes_raw = raw.pop("modes", None)
    try:
        tuning = from_dict(Tuning, raw, where)
    except ConfigError as e:
        raise RecipeError(_tidy(str(e), where)) from None
    if modes_raw is not None:
        if not isinstance(modes_raw, dict):
            raise RecipeError(f"{where}: modes: expected {{full: {{...}}, prompt: {{...}}, linear_probe: {{...}}}}")
        modes = {}
        for name, entry in modes_raw.items():
            if not isinstance(entry, dict):
                raise RecipeError(f"{where}: modes.{name}: expected {{lr: ..., weight_decay: ...}}")
            for key in ("lr", "weight_decay"):
                if key not in entry:
                    raise RecipeError(f"{where}: modes.{name}: missing '{key}'")
            try:
                modes[str(name)] = from_dict(TuningMode, entry, f"{where}: modes.{name}")
            except ConfigError as e:
                raise RecipeError(str(e)) from None
        tuning.modes = modes
    if not isinstance(tuning.few_shot_copies, dict):
        raise RecipeError(f"{where}: few_shot_copies: expected {{shots: copies}}, e.g. {{1: 8, 3: 4, 5: 2, 10: 1}}")
    copies = {}
    for shot, n in tuning.few_shot_copies.items():
        if isinstance(shot, str) and shot.strip().isdigit():  # keys of a JSON round trip
            shot = int(shot)
        if (
            isinstance(shot, bool)
            or not isinstance(shot, int)
            or isinstance(n, bool)
            or not isinstance(n, int)
            or shot < 1
            or n < 1
        ):
            raise RecipeError(
                f"{where}: few_shot_copies: expected {{shots: copies}} of whole numbers >= 1, got {shot!r}: {n!r}"
            )
        copies[shot] = n
    tuning.few_shot_copies = copies
    return tuning


def _validate(recipe: Recipe, where: str) -> None:
    ev = recipe.evaluation
    if ev.split not in recipe.splits:
        raise RecipeError(
            f"{where}: evaluation.split {ev.split!r} is not in splits ({', '.join(recipe.splits)}); add it or pick "
            "one of them"
        )
    problem = size_problem(ev.min_size, ev.max_size)
    if problem:
        raise RecipeError(f"{where}: evaluation: {problem}")
    if ev.detections_per_img < 1:
        raise RecipeError(f"{where}: evaluation.detections_per_img must be >= 1, got {ev.detections_per_img}")
    if ev.batch_size is not None and ev.batch_size < 1:
        raise RecipeError(
            f"{where}: evaluation.batch_size must be >= 1 or null (1 on a CPU, 4 on CUDA), got {ev.batch_size}"
        )
    if ev.chunk_size is not None and ev.chunk_size < 1:
        raise RecipeError(f"{where}: evaluation.chunk_size must be >= 1 or null, got {ev.chunk_size}")
    if ev.metric not in METRICS:
        raise RecipeError(f"{where}: evaluation.metric {ev.metric!r}: choose one of {', '.join(METRICS)}")
    for alias in recipe.aliases:
        if not isinstance(alias, str) or not alias:
            raise RecipeError(f"{where}: aliases: expected names, got {alias!r}")
    tuning = recipe.tuning
    if tuning is not None:
        for split in (tuning.val_split, tuning.test_split):
            if split not in recipe.splits:
                raise RecipeError(f"{where}: tuning: split {split!r} is not in splits ({', '.join(recipe.splits)})")
        for name, mode in tuning.modes.items():
            if mode.trains not in TRAINS:
                raise RecipeError(
                    f"{where}: tuning.modes.{name}.trains {mode.trains!r}: choose one of {', '.join(TRAINS)}"
                )
            if mode.lr <= 0 or mode.weight_decay < 0:
                raise RecipeError(f"{where}: tuning.modes.{name}: lr must be > 0 and weight_decay >= 0")
        if tuning.batch_size < 1 or tuning.max_epochs < 1:
            raise RecipeError(f"{where}: tuning: batch_size and max_epochs must be >= 1")
    if recipe.few_shot is not None:
        for split in recipe.few_shot.splits:
            pattern = getattr(recipe.few_shot, f"{split}_ann_file")
            if "{shot}" not in pattern or "{seed}" not in pattern:
                raise RecipeError(
                    f"{where}: few_shot.{split}_ann_file needs {{shot}} and {{seed}} in it, got {pattern!r}"
                )
            if split not in recipe.splits:
                raise RecipeError(f"{where}: few_shot.{split}_ann_file: split {split!r} is not in splits")
    if recipe.prompts is not None:
        resolve_prompt_file(recipe)
    if recipe.synthetic is not None:
        from .synth import SPLITS

        syn = recipe.synthetic
        if syn.split not in SPLITS:
            raise RecipeError(f"{where}: synthetic.split {syn.split!r}: choose one of {', '.join(SPLITS)}")
        folder = syn.folder.rstrip("/") + "/"
        for name, files in recipe.splits.items():
            for path in (files.ann_file, files.img_dir):
                if not (path + "/").startswith(folder):
                    raise RecipeError(f"{where}: splits.{name}: {path!r} is not under synthetic.folder {syn.folder!r}")
    if recipe.pretraining is not None and recipe.pretraining.train:
        from .training.config import TrainConfig

        try:
            from_dict(TrainConfig, recipe.pretraining.train, f"{where}: pretraining.train")
        except ConfigError as e:
            raise RecipeError(str(e)) from None


def _read_yaml(path: str | os.PathLike) -> dict:
    """:func:`~glip_transfer.config.load_yaml` (same checks and one-line errors), with libyaml's
    safe loader when available: listing every recipe stays fast."""
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
            if isinstance(data, dict):
                return data
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            pass
    try:
        return load_yaml(path)
    except ConfigError as e:
        raise RecipeError(str(e)) from None


def read_recipe_file(path: str | os.PathLike) -> Recipe:
    """Load and validate one recipe YAML file."""
    data = _read_yaml(path)
    return parse_recipe(data, str(path), str(path))


def _recipe_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*.yaml")
        if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
    )


@functools.lru_cache(maxsize=4)
def _index(folder: str, stamp: float) -> dict[str, str]:
    """name / alias (lower case) -> file, for a recipes folder (``stamp``: its mtime, to refresh)."""
    index: dict[str, str] = {}
    for path in _recipe_files(Path(folder)):
        name = path.relative_to(folder).with_suffix("").as_posix()
        index.setdefault(name.lower(), str(path))
        try:
            data = _read_yaml(path)
        except ConfigError:
            continue
        for alias in data.get("aliases") or []:
            if isinstance(alias, str):
                index.setdefault(alias.lower(), str(path))
        if isinstance(data.get("name"), str):
            index.setdefault(data["name"].lower(), str(path))
    return index


def find_recipe(name_or_path: str) -> Path:
    """The file of a recipe name, alias (case-insensitive) or path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    folder = recipes_dir()
    direct = folder / f"{text}.yaml"
    if direct.is_file():
        return direct
    index = _index(str(folder), max((p.stat().st_mtime for p in [folder, *folder.iterdir()]), default=0.0))
    hit = index.get(text.lower().removesuffix(".yaml"))
    if hit is not None:
        return Path(hit)
    if text.endswith((".yaml", ".yml")):
        raise RecipeError(f"recipe file {text!r} not found: check the path, or give a recipe name (glip recipes list)")
    close = difflib.get_close_matches(text.lower(), list(index), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(
        f"unknown recipe {text!r}: `glip recipes list` shows the names (or pass a recipe YAML path){hint}"
    )


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (``odinw35/Aquarium_Aquarium_Combined.v2-raw-1024.coco``), alias
    (``odinw35/aquarium``, case-insensitive) or YAML path, validated."""
    return read_recipe_file(find_recipe(name_or_path))


def list_recipes() -> list[Recipe]:
    """Every recipe in :func:`recipes_dir`, sorted by name."""
    folder = recipes_dir()
    return sorted((read_recipe_file(p) for p in _recipe_files(folder)), key=lambda r: (r.name.lower(), r.name))


# --------------------------------------------------------------------------- prompts and captions


def resolve_prompt_file(recipe: Recipe) -> Path | None:
    """The recipe's prompt file: an absolute path, a path relative to the recipe file, or a name
    in :func:`prompts_dir`."""
    if recipe.prompts is None:
        return None
    where = recipe.path or recipe.name
    given = Path(recipe.prompts).expanduser()
    candidates = [given] if given.is_absolute() else []
    if not given.is_absolute():
        if recipe.path:
            candidates.append(Path(recipe.path).parent / given)
        try:
            candidates.append(prompts_dir() / given)
        except RecipeError:
            pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"{where}: prompts: file {recipe.prompts!r} not found (looked in "
        f"{', '.join(str(c.parent) for c in candidates)}); fix the name or set GLIP_PROMPTS_DIR"
    )


def recipe_prompts(recipe: Recipe) -> dict:
    """``{category id: CategoryPrompt}`` of the recipe's prompt file ({} without one)."""
    path = resolve_prompt_file(recipe)
    if path is None:
        return {}
    try:
        return load_prompt_file(path)
    except PromptError as e:
        raise RecipeError(str(e)) from None


def resolve_categories(recipe: Recipe, annotation_categories: Any = None) -> list[tuple[int, str]]:
    """The categories to prompt with: the recipe's own list (official ``OVERRIDE_CATEGORY``), or,
    for ``categories: from_annotations``, the annotation file's. With both, every recipe id must be
    in the annotation file (raises otherwise); annotation categories missing from the recipe are
    not prompted (as the official override) and are returned by :func:`categories_not_in_recipe`."""
    if recipe.categories_from_annotations:
        if annotation_categories is None:
            recipe.category_list()  # raises the explanatory error
        return as_categories(annotation_categories)
    cats = recipe.category_list()
    if annotation_categories is not None:
        known = {cid for cid, _ in as_categories(annotation_categories)}
        missing = [cid for cid, _ in cats if cid not in known]
        if missing:
            raise RecipeError(
                f"recipe {recipe.name}: category id {missing[0]!r} is not in the annotation file "
                f"({len(missing)} missing): check --data-root and the recipe's split files"
            )
    return cats


def categories_not_in_recipe(recipe: Recipe, annotation_categories: Any) -> list[tuple[Any, str]]:
    """Annotation categories that the recipe does not list (their boxes cannot be detected)."""
    if recipe.categories_from_annotations:
        return []
    ids = {c.id for c in recipe.categories}
    return [
        (cid, name)
        for cid, name in as_categories(annotation_categories)
        if cid not in ids and not is_background(cid, name)
    ]


def evaluation_prompt(
    recipe: Recipe, tokenizer, annotation_categories: Any = None, warn: bool = True
) -> DetectionPrompt:
    """The exact evaluation prompt(s) of a recipe: a :class:`~glip_transfer.prompts.DetectionPrompt`
    (its ``caption_or_captions`` is the caption, or the list of captions when chunked)."""
    categories = resolve_categories(recipe, annotation_categories)
    try:
        return build_detection_prompt(
            tokenizer, categories, recipe_prompts(recipe), chunk_size=recipe.evaluation.chunk_size, warn=warn
        )
    except PromptError as e:
        raise RecipeError(f"recipe {recipe.name}: {e}") from None


def evaluation_captions(recipe: Recipe, tokenizer, annotation_categories: Any = None) -> str | list[str]:
    """The exact evaluation caption of a recipe, or the list of captions when chunked."""
    return evaluation_prompt(recipe, tokenizer, annotation_categories).caption_or_captions


def untokenized_captions(recipe: Recipe, annotation_categories: Any = None) -> str | list[str]:
    """The evaluation caption(s) built without a tokenizer: equal to :func:`evaluation_captions`
    unless a caption would exceed 256 tokens (which only a tokenizer can tell)."""
    cats, _ = drop_background(sort_categories(as_categories(resolve_categories(recipe, annotation_categories))))
    prompts = recipe_prompts(recipe)
    size = recipe.evaluation.chunk_size
    groups = [cats[i : i + size] for i in range(0, len(cats), size)] if size else [cats]
    captions = [build_caption(g, prompts, sort=False).text for g in groups]
    return captions if len(captions) > 1 else captions[0]


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data (JSON-ready)."""
    data = to_dict(recipe)
    if recipe.categories_from_annotations:
        data["categories"] = FROM_ANNOTATIONS
    return data


def replace(recipe: Recipe, **changes) -> Recipe:
    """A copy with fields changed (``dataclasses.replace``)."""
    return dataclasses.replace(recipe, **changes)


# --------------------------------------------------------------------------- files under a data root


def ensure_data(recipe: Recipe, data_root: str | os.PathLike, notify=None) -> bool:
    """Render a synthetic recipe's data under ``data_root`` if it is not there yet (one line
    through ``notify`` and a progress bar); True when it was rendered. Other recipes: False."""
    syn = recipe.synthetic
    if syn is None:
        return False
    from .synth import SynthError, ensure, read_manifest

    out = Path(data_root) / syn.folder
    if read_manifest(out) is None:
        from rich.console import Console

        from .runtime import progress_bar

        notify = notify or (lambda text: Console(stderr=True).print(text, highlight=False, soft_wrap=True))
        with progress_bar(transient=True) as bar:
            task = bar.add_task(f"synth {syn.split}", total=None, info="")
            try:
                return ensure(out, syn.split, images=syn.images, seed=syn.seed, notify=notify,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))  # fmt: skip
            except SynthError as e:
                raise RecipeError(f"recipe {recipe.name}: {e}") from None
    try:
        return ensure(out, syn.split, images=syn.images, seed=syn.seed)
    except SynthError as e:
        raise RecipeError(f"recipe {recipe.name}: {e}") from None


def override_recipe(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with ``--set`` overrides of its own keys (``evaluation.min_size=600``) applied
    and validated again."""
    if not overrides:
        return recipe
    data = {k: v for k, v in recipe_to_dict(recipe).items() if k != "path"}
    try:
        return parse_recipe(apply_overrides(data, overrides), where=f"--set on {recipe.name}", path=recipe.path)
    except ConfigError as e:  # with the syntax the override's key expects
        raise RecipeError(explain_override(e, data, overrides)) from None


def adhoc_recipe(splits: dict[str, tuple[Path, Path]], eval_split: str = "val") -> Recipe:
    """A recipe for a COCO dataset given by files (``--ann`` / ``--images`` and friends):
    ``{split: (annotation file, image folder)}``, named after the first annotation file, its
    categories from the annotation file. Paths are made absolute, so ``--data-root`` never applies."""
    ann, _ = next(iter(splits.values()))
    data = {
        "name": ann.stem,
        "splits": {
            split: {"ann_file": str(a.resolve()), "img_dir": str(i.resolve())} for split, (a, i) in splits.items()
        },
        "categories": FROM_ANNOTATIONS,
        "evaluation": {"split": eval_split},
    }
    return parse_recipe(data, where=str(ann))


def split_paths(recipe: Recipe, split: str | None, data_root: str | os.PathLike, notify=None) -> tuple[Path, Path]:
    """The annotation file and image folder of ``split`` (default: the evaluation split): a
    recipe's relative paths are under ``data_root``, absolute ones are taken as they are; a
    synthetic recipe's data is rendered there first when missing (:func:`ensure_data`).
    ``FileNotFoundError`` (one line naming the path and ``--data-root``, and the download command
    of an ODinW recipe) when either is missing."""
    split = split or recipe.evaluation.split
    files = recipe.split(split)
    ensure_data(recipe, data_root, notify)
    data_root = Path(data_root)
    ann, images = data_root / files.ann_file, data_root / files.img_dir  # an absolute path replaces data_root
    for path, what, exists in ((ann, "annotation file", ann.is_file()), (images, "image folder", images.is_dir())):
        if not exists:
            from .datasets import download_hint  # datasets imports this module: only on the error path

            raise FileNotFoundError(
                f"{path}: {split} {what} of recipe {recipe.name} not found; check --data-root (now {data_root})"
                f"{download_hint(recipe, data_root)}"
            )
    return ann, images


SPLIT_NAMES = ("train", "val", "valid", "validation", "test", "minival", "test-dev", "testdev")
_GENERIC_NAMES = ("annotations", "annotation", "instances", "labels", "label", "coco")


def dataset_name(ann_file: str | os.PathLike, *, with_split: bool = True) -> str:
    """A folder name for the dataset of an annotation file given without a recipe (``--ann``),
    from the folders around it rather than the file's own name, which is often generic:
    ``trees/annotations.json`` -> ``trees``; Roboflow's ``aquarium/valid/_annotations.coco.json``
    -> ``aquarium_valid`` (``aquarium`` without the split); ``coco/annotations/instances_val2017.json``
    -> ``coco_instances_val2017``; ``my/val.json`` -> ``my_val``."""
    path = Path(ann_file).resolve()
    folder = path.parent
    stem = path.name[: -len(".json")] if path.name.lower().endswith(".json") else path.stem
    plain = stem.lower().lstrip("_").removesuffix(".coco")
    if folder.name.lower() in SPLIT_NAMES:
        parts = [folder.parent.name] + ([folder.name] if with_split else [])
    elif folder.name.lower() in _GENERIC_NAMES:
        parts = [folder.parent.name]
    else:
        parts = [folder.name]
    if plain not in _GENERIC_NAMES and (with_split or plain not in SPLIT_NAMES):
        parts.append(stem)
    return safe_name("_".join(p for p in parts if p))


def safe_name(name: str) -> str:
    """A recipe name as a folder name (run folders are named after recipes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"
