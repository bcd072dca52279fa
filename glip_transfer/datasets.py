"""Datasets by name: the ODinW zips of the hub repo ``GLIPModel/GLIP``, fetched, checked and
extracted into the data root in the official layout (``DATASET/odinw/<Name>/...``).

A recipe's files (``recipes/odinw35/*.yaml``: ``odinw/Aquarium/Aquarium Combined.../train/...``)
say which zip holds them: ``odinw_35/<Name>.zip`` of the hub repo, which extracts to ``<Name>/``
(the official ``odinw/download.py`` unzips it into ``DATASET/odinw``). A zip is downloaded with
``huggingface_hub.hf_hub_download`` into a folder beside its destination, refused when a member
would land outside the data root (absolute path, ``..``, a symlink) or fails its CRC check while
being extracted, extracted into a hidden temporary folder, checked for every file the recipes
name, and only then renamed into place: a half-extracted dataset never looks complete. A dataset
whose files are all there is skipped. The zip is deleted afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError
from .hub import HUB_REPO, bytes_progress, download_file
from .recipes import Recipe, RecipeError, list_recipes, load_recipe

DEFAULT_DATA_ROOT = "DATASET"
ODINW_PREFIX = "odinw"  # recipe paths: odinw/<Name>/...
ODINW_ZIPS = "odinw_35"  # hub repo folder of the zips
GROUPS = ("odinw13", "odinw35")
# the datasets of the official odinw/download.py (each one zip: odinw_35/<Name>.zip)
ODINW_DATASETS: tuple[str, ...] = (
    "AerialMaritimeDrone", "AmericanSignLanguageLetters", "Aquarium", "BCCD", "ChessPieces", "CottontailRabbits",
    "DroneControl", "EgoHands", "HardHatWorkers", "MaskWearing", "MountainDewCommercial", "NorthAmericaMushrooms",
    "OxfordPets", "PKLot", "Packages", "PascalVOC", "Raccoon", "ShellfishOpenImages", "ThermalCheetah", "UnoCards",
    "VehiclesOpenImages", "WildfireSmoke", "boggleBoards", "brackishUnderwater", "dice", "openPoetryVision", "pistols",
    "plantdoc", "pothole", "selfdrivingCar", "thermalDogsAndPeople", "vector", "websiteScreenshots",
)  # fmt: skip


class DatasetError(DataError):
    """A dataset archive is unsafe, corrupt or incomplete, or its folder is in the way."""


def default_data_root() -> Path:
    """``$GLIP_DATA``, else ``./DATASET`` (the official layout's folder)."""
    return Path(os.environ.get("GLIP_DATA") or DEFAULT_DATA_ROOT)


# --------------------------------------------------------------------------- recipes -> files


def used_splits(recipe: Recipe) -> list[str]:
    """The splits the commands read: train / val / test, the evaluation split and the tuning's
    validation and test splits (a config may register more, e.g. brackishUnderwater's
    ``minival_3shot_3seed`` under ``odinw/original/``, which no zip holds)."""
    wanted = ["train", "val", "test", recipe.evaluation.split]
    if recipe.tuning is not None:
        wanted += [recipe.tuning.val_split, recipe.tuning.test_split]
    return [s for s in dict.fromkeys(wanted) if s in recipe.splits]


def recipe_files(recipe: Recipe) -> list[str]:
    """The files and folders of a recipe's :func:`used_splits` (relative to the data root)."""
    out: list[str] = []
    for split in used_splits(recipe):
        files = recipe.splits[split]
        for p in (files.ann_file, files.img_dir):
            if p not in out:
                out.append(p)
    return out


def few_shot_files(recipe: Recipe) -> list[str]:
    fs = recipe.few_shot
    if fs is None:
        return []
    return [fs.ann_file(split, shot, seed) for split in fs.splits for shot in fs.shots for seed in fs.seeds]


def recipe_dataset(recipe: Recipe) -> str | None:
    """The ODinW zip (``<Name>``) that holds a recipe's files, or None when no download exists."""
    names = set()
    for p in recipe_files(recipe):
        parts = Path(p).parts
        if len(parts) < 2 or parts[0] != ODINW_PREFIX or Path(p).is_absolute():
            return None
        names.add(parts[1])
    if len(names) == 1 and (name := names.pop()) in ODINW_DATASETS:
        return name
    return None


def missing_files(recipe: Recipe, data_root: str | os.PathLike) -> list[Path]:
    root = Path(data_root)
    return [root / p for p in recipe_files(recipe) if not (root / p).exists()]


def download_command(recipe: Recipe, data_root: str | os.PathLike | None = None) -> str | None:
    """The ``glip data download`` command that fetches a recipe's files, or None."""
    if recipe_dataset(recipe) is None:
        return None
    root = "" if data_root is None or Path(data_root) == default_data_root() else f" --data-root {data_root}"
    return f"glip data download {(recipe.aliases or [recipe.name])[0]}{root}"


def download_hint(recipe: Recipe, data_root: str | os.PathLike | None = None) -> str:
    """``"; fetch it with: glip data download ..."`` for a downloadable recipe, else ``""``."""
    command = download_command(recipe, data_root)
    return f"; fetch it with: {command}" if command else ""


def select_recipes(target: str) -> list[Recipe]:
    """``odinw13`` / ``odinw35`` (every recipe of the group) or one recipe name / alias / path."""
    key = target.strip().lower().rstrip("/")
    if key in GROUPS:
        return [r for r in list_recipes() if r.name.lower().startswith(key + "/")]
    return [load_recipe(target)]


@dataclass
class DatasetPlan:
    """One zip and the recipes it serves."""

    name: str
    recipes: list[Recipe] = field(default_factory=list)

    @property
    def required(self) -> list[str]:
        seen: list[str] = []
        for r in self.recipes:
            seen.extend(p for p in recipe_files(r) if p not in seen)
        return seen


def plan_downloads(target: str) -> list[DatasetPlan]:
    """The zips ``target`` needs, in recipe order; a recipe without a download is an error."""
    plans: dict[str, DatasetPlan] = {}
    for recipe in select_recipes(target):
        name = recipe_dataset(recipe)
        if name is None and recipe.synthetic is not None:
            raise RecipeError(
                f"recipe {recipe.name}: its data is synthetic, rendered on first use (or: glip data synth "
                f"--split {recipe.synthetic.split} --out DATA_ROOT/{recipe.synthetic.folder}); "
                "there is nothing to download"
            )
        if name is None:
            raise RecipeError(
                f"recipe {recipe.name}: its files ({recipe_files(recipe)[0]}, ...) "
                "are not an ODinW dataset of the hub; "
                "get them from the dataset's own site and pass --data-root"
            )
        plans.setdefault(name, DatasetPlan(name)).recipes.append(recipe)
    return list(plans.values())


# --------------------------------------------------------------------------- fetching


def fetch_dataset(plan: DatasetPlan, data_root: str | os.PathLike, force: bool = False) -> str:
    """Download, check and extract one ODinW zip into ``data_root/odinw/<Name>``; returns
    ``"present"`` (nothing to do) or ``"extracted"``."""
    root = Path(data_root)
    parent = root / ODINW_PREFIX
    dest = parent / plan.name
    if dest.exists() and not force:
        missing = [p for p in plan.required if not (root / p).exists()]
        if not missing:
            return "present"
        raise DatasetError(
            f"{dest} exists but lacks {root / missing[0]}: pass --force to download it again and replace the folder"
        )
    parent.mkdir(parents=True, exist_ok=True)
    download_dir = parent / f".download-{plan.name}"
    zip_path = download_file(HUB_REPO, f"{ODINW_ZIPS}/{plan.name}.zip", local_dir=download_dir,
                             manual=f"unzip it into {parent}")  # fmt: skip
    relative = [str(Path(p).relative_to(ODINW_PREFIX)) for p in plan.required]
    try:
        extract_dataset(zip_path, parent, plan.name, relative)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)  # a refused zip is never reused
    shots = [p for r in plan.recipes for p in few_shot_files(r) if not (root / p).exists()]
    if shots:
        warnings.warn(f"{plan.name}: {len(shots)} prepared few-shot file(s) the recipes name are not in the archive "
                      f"(e.g. {root / shots[0]}); only --set train.few_shot_prepared=true reads them")  # fmt: skip
    return "extracted"


def unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member could write outside the extraction folder, or None."""
    name = info.filename
    parts = re.split(r"[\\/]+", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in parts:
        return "a '..' path"
    if "\x00" in name:
        return "a NUL byte in its name"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def extract_dataset(zip_path: str | os.PathLike, parent: str | os.PathLike, name: str, required: list[str]) -> Path:
    """Extract ``<name>/`` of a zip into ``parent/<name>`` atomically: into a hidden temporary
    sibling first, every member's CRC checked as it is read, the ``required`` paths (relative to
    ``parent``) checked, then renamed into place (an existing folder is replaced). Refuses unsafe
    members, corrupt archives and archives without the required files, leaving nothing behind."""
    zip_path, parent = Path(zip_path), Path(parent)
    dest = parent / name
    for stale in parent.glob(f".{name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)  # an earlier run's, interrupted
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f"{zip_path}: not a readable zip ({e}); download it again") from None
    with archive:
        members = archive.infolist()
        for info in members:
            why = unsafe_member(info)
            if why is not None:
                raise DatasetError(
                    f"{zip_path}: refused: member {info.filename!r} is {why} (would write outside {parent})"
                )
        total = sum(i.file_size for i in members)
        free = shutil.disk_usage(parent).free
        if total > free:
            raise DatasetError(
                f"{parent}: {total / 1e9:.1f} GB needed to extract {zip_path.name}, {free / 1e9:.1f} GB free"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
        try:
            with bytes_progress() as bar:
                task = bar.add_task(f"extract {zip_path.name}", total=total)
                for info in members:
                    try:
                        archive.extract(info, tmp)
                    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
                        raise DatasetError(
                            f"{zip_path}: corrupt member {info.filename!r} ({e}); download it again"
                        ) from None
                    except OSError as e:
                        raise DatasetError(
                            f"cannot extract {zip_path.name} into {parent} ({e.strerror or e})"
                        ) from None
                    bar.advance(task, info.file_size)
            if not (tmp / name).is_dir():
                raise DatasetError(f"{zip_path}: holds no {name}/ folder (the official layout): not an ODinW archive")
            missing = [p for p in required if not (tmp / p).exists()]
            if missing:
                raise DatasetError(
                    f"{zip_path}: lacks {missing[0]}, which the recipe names ({len(missing)} missing): "
                    "not the expected archive"
                )
            if dest.exists():
                os.rename(dest, tmp / ".replaced")
            os.rename(tmp / name, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- listing


def data_table(data_root: str | os.PathLike) -> list[dict]:
    """Every recipe's dataset and whether its files are under ``data_root``:
    ``[{"recipe", "dataset", "present", "missing", "download", "synthetic"}]`` (``synthetic``: the
    recipe's data is rendered on first use)."""
    rows = []
    for recipe in list_recipes():
        missing = missing_files(recipe, data_root)
        rows.append({
            "recipe": recipe.name,
            "dataset": recipe_dataset(recipe),
            "present": not missing,
            "missing": [str(p) for p in missing],
            "download": download_command(recipe, data_root) if missing else None,
            "synthetic": recipe.synthetic is not None,
        })  # fmt: skip
    return rows
