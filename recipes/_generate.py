"""Write the ODinW / COCO / LVIS recipes and the ODinW-35 prompt files from the official GLIP configs.

A one-off maintenance script; the YAML files it writes are committed and nothing at run time
needs it. Usage (the argument is an official GLIP checkout, or a bare git mirror of it):

    python recipes/_generate.py /path/to/GLIP            # checkout with configs/
    python recipes/_generate.py /work/.mirror/microsoft+GLIP/repo   # git dir: reads HEAD

The official configs carry categories and caption prompts as Python-literal strings
(``DATASETS.OVERRIDE_CATEGORY``, ``DATASETS.CAPTION_PROMPT``), which yacs turns into lists with
``ast.literal_eval``; this script does the same (never ``eval``). Every string is written
JSON-quoted (valid YAML) and every file is read back and compared with its source.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
PROMPTS = ROOT / "prompts"

SHOTS = (1, 3, 5, 10)
SEEDS = (3, 30, 300)

# COCO 2017 category ids -> names (instances_val2017.json); ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused
COCO = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}


def q(value) -> str:
    """A YAML scalar: strings JSON-quoted (exact, escapes included), numbers and null plain."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


class Source:
    """Reads official files from a checkout (``configs/`` present) or a git dir (``HEAD``)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.checkout = (self.path / "configs").is_dir()
        if self.checkout:
            self.commit = _git(self.path, "rev-parse", "HEAD", check=False) or "unknown"
        else:
            self.commit = _git(self.path, "rev-parse", "HEAD")

    def list(self, folder: str) -> list[str]:
        if self.checkout:
            return sorted(str(p.relative_to(self.path)) for p in (self.path / folder).glob("*.yaml"))
        names = _git(self.path, "ls-tree", "--name-only", "HEAD", folder + "/").splitlines()
        return sorted(n for n in names if n.endswith(".yaml"))

    def read(self, name: str) -> str:
        if self.checkout:
            return (self.path / name).read_text(encoding="utf-8")
        return _git(self.path, "show", f"HEAD:{name}")


def _git(path: Path, *args: str, check: bool = True) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        if check:
            raise
        return ""


def literal(text, what: str):
    """A yacs-style value: Python literal strings parsed with ast.literal_eval (never eval)."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise SystemExit(f"{what}: not a Python literal: {e}") from None


def alias_base(stem: str) -> str:
    return stem.split("_")[0].lower()


def c(text: str, comment: str) -> str:
    """A YAML line with an aligned trailing comment."""
    return f"{text:<32}  # {comment}"


def tuning_block(val_split: str) -> list[str]:
    """The official ODinW transfer settings (README "ODinW / Custom Dataset Fine-Tuning",
    tools/finetune.py, configs/pretrain/glip_Swin_T_O365_GoldG.yaml SOLVER, defaults.py)."""
    return [
        "tuning:",
        "  # official: README 'ODinW / Custom Dataset Fine-Tuning' + tools/finetune.py; see recipes/README.md",
        c("  optimizer: adamw", "SOLVER.OPTIMIZER ADAMW (pretrain config)"),
        c("  batch_size: 4", "SOLVER.IMS_PER_BATCH 4"),
        c("  max_epochs: 200", "--custom_shot_and_epoch_and_general_copy N_200_C (overrides MAX_EPOCH 12)"),
        c("  warmup_iters: 0", "SOLVER.WARMUP_ITERS 0 (dataset config)"),
        c("  use_amp: true", "SOLVER.USE_AMP True"),
        c("  grad_clip_norm: 1.0", "SOLVER.CLIP_GRADIENTS full_model, 1.0 (pretrain config)"),
        c("  bias_lr_factor: 2.0", "SOLVER.BIAS_LR_FACTOR (default): biases get 2x the lr"),
        c("  bias_weight_decay: 0.0", "SOLVER.WEIGHT_DECAY_BIAS (default)"),
        c("  lr_decay_factor: 0.1", "SOLVER.GAMMA; USE_AUTOSTEP: ReduceLROnPlateau(mode=max) on val AP"),
        c("  lr_patience: 3", "SOLVER.STEP_PATIENCE 3 (evaluations without improvement)"),
        c("  min_lr: 1.0e-06", "SOLVER.MIN_LR (default)"),
        c("  early_stop_patience: 8", "SOLVER.AUTO_TERMINATE_PATIENCE 8"),
        c("  eval_every_epochs: 1.0", "SOLVER.CHECKPOINT_PER_EPOCH 1.0, TEST_WITH_INFERENCE on val_split"),
        c("  model_ema: 0.0", "SOLVER.MODEL_EMA 0.0"),
        c("  seed: 10", "SOLVER.SEED 10"),
        c("  shuffle_seed: 3", "DATASETS.SHUFFLE_SEED 3 (few-shot sampling)"),
        c(f"  val_split: {q(val_split)}", "model selection: the config's DATASETS.TEST"),
        c('  test_split: "test"', "--evaluate_only_best_on_test"),
        c("  few_shot_copies: {1: 8, 3: 4, 5: 2, 10: 1}", "shots -> DATASETS.GENERAL_COPY ('1_200_8', ...)"),
        c("  all_data: {copies: 1, lr_patience: 2, early_stop_patience: 4}", "'0_200_1'"),
        "  modes:",
        c("    full:", "TUNING_HIGHLEVEL_OVERRIDE full"),
        c("      lr: 1.0e-04", "SOLVER.BASE_LR (pretrain config)"),
        c("      language_lr: 1.0e-05", "SOLVER.LANG_LR: parameters under language_backbone"),
        c("      weight_decay: 0.05", "SOLVER.WEIGHT_DECAY 0.05"),
        c("      freeze_backbone_at: 2", "FREEZE_CONV_BODY_AT 2: Swin patch embed + stage 1 frozen"),
        "      trains: all",
        c("    prompt:", "TUNING_HIGHLEVEL_OVERRIDE language_prompt_v2"),
        c("      lr: 0.05", "SOLVER.BASE_LR 0.05"),
        c("      weight_decay: 0.25", "SOLVER.WEIGHT_DECAY 0.25"),
        c("      trains: prompt", "only a linear layer added on the text features ('tunable_linear')"),
        c("    linear_probe:", "TUNING_HIGHLEVEL_OVERRIDE linear_prob"),
        c("      lr: 1.0e-04", "SOLVER.BASE_LR (unchanged)"),
        c("      weight_decay: 0.05", "SOLVER.WEIGHT_DECAY 0.05 (same command line)"),
        c("      trains: head_predictors", "bbox_pred, cls_logits, centerness, dot_product_projection_text, ..."),
    ]


def few_shot_block(register: dict, stem: str) -> list[str]:
    """The prepared few-shot files, checked to follow one pattern per split."""
    lines = ["few_shot:", f"  shots: {list(SHOTS)}", f"  seeds: {list(SEEDS)}"]
    splits = [s for s in ("train", "val", "minival") if s in register]
    for split in splits:
        base = register[split]
        pattern_dir = base["ann_file"].rsplit("/", 1)[0]
        pattern = f"{pattern_dir}/fewshot_{split}_shot{{shot}}_seed{{seed}}.json"
        found = {k for k in register if re.match(rf"^{split}_\d+_\d+$", k)}
        if found != {f"{split}_{n}_{k}" for n in SHOTS for k in SEEDS}:
            raise SystemExit(
                f"{stem}: few-shot entries of {split} are not shots {SHOTS} x seeds {SEEDS}: {sorted(found)}"
            )
        for shot in SHOTS:
            for seed in SEEDS:
                entry = register[f"{split}_{shot}_{seed}"]
                want = pattern.format(shot=shot, seed=seed)
                if entry["ann_file"] != want or entry["img_dir"] != base["img_dir"]:
                    raise SystemExit(f"{stem}: {split}_{shot}_{seed} does not follow {pattern!r}: {entry}")
        lines.append(f"  {split}_ann_file: {q(pattern)}")
    return lines


def extra_splits(register: dict) -> list[str]:
    """REGISTER entries beyond the standard splits and few-shot files (kept as named splits)."""
    standard = {"train", "val", "test", "minival"}
    pattern = re.compile(r"^(train|val|minival)_(\d+)_(\d+)$")
    return sorted(k for k in register if k not in standard and not pattern.match(k))


def odinw_recipe(source: Source, config_path: str, suite: str, aliases: dict[str, str]) -> tuple[str, str, dict]:
    """The head of one ODinW recipe (up to its categories) and what the caller needs to finish it."""
    stem = Path(config_path).stem
    cfg = yaml.safe_load(source.read(config_path))
    ds = cfg["DATASETS"]
    categories = literal(ds["OVERRIDE_CATEGORY"], f"{config_path} OVERRIDE_CATEGORY")
    caption_prompt = literal(ds.get("CAPTION_PROMPT"), f"{config_path} CAPTION_PROMPT")
    test = literal(ds["TEST"], f"{config_path} TEST")
    val_split = test[0]
    register = ds["REGISTER"]
    name = f"{suite}/{stem}"
    alias = f"{suite}/{aliases[stem]}"
    input_cfg = cfg.get("INPUT", {})
    prompt_entries = []
    if caption_prompt:
        if len(caption_prompt) != len(categories):
            raise SystemExit(f"{config_path}: {len(caption_prompt)} caption prompts for {len(categories)} categories")
        for cat, cp in zip(sorted(categories, key=lambda c: c["id"]), caption_prompt):
            prompt_entries.append({"id": cat["id"], "prefix": cp["prefix"], "name": cp["name"], "suffix": cp["suffix"]})
    folder = register["train"]["img_dir"].split("/")[1]
    lines = [
        f"# {'ODinW-35' if suite == 'odinw35' else 'ODinW-13'}: {folder} ({stem}).",
        f"# Written by recipes/_generate.py from the official GLIP {source.commit[:7]} {config_path};",
        "# category names are the official DATASETS.OVERRIDE_CATEGORY, byte for byte.",
        f"name: {q(name)}",
        f"aliases: [{q(alias)}]",
        f"description: {q(('ODinW-35' if suite == 'odinw35' else 'ODinW-13') + ' ' + folder + ' (' + stem + ')')}",
        f"source: {q(config_path)}",
        "splits:",
    ]
    for split in ["train", "val", "minival", "test"] + extra_splits(register):
        if split in register:
            entry = register[split]
            lines.append(f"  {split}: {{ann_file: {q(entry['ann_file'])}, img_dir: {q(entry['img_dir'])}}}")
    lines += few_shot_block(register, stem)
    lines.append("categories:")
    for cat in categories:
        lines.append(f"  - {{id: {q(cat['id'])}, name: {q(cat['name'])}}}")
    return (
        name,
        "\n".join(lines),
        {
            "categories": categories,
            "register": register,
            "val_split": val_split,
            "input": input_cfg,
            "prompt_entries": prompt_entries,
            "alias": alias,
        },
    )


def finish(
    lines: list[str],
    prompt_file: str | None,
    split: str,
    input_cfg: dict,
    detections: int,
    chunk: int | None,
    metric: str,
) -> list[str]:
    lines = list(lines)
    lines.append(f"prompts: {q(prompt_file)}")
    lines += [
        "evaluation:",
        f"  split: {q(split)}",
        c(f"  min_size: {input_cfg.get('MIN_SIZE_TEST', 800)}", "INPUT.MIN_SIZE_TEST"),
        c(f"  max_size: {input_cfg.get('MAX_SIZE_TEST', 1333)}", "INPUT.MAX_SIZE_TEST"),
        c(f"  detections_per_img: {detections}", "MODEL.ATSS.DETECTIONS_PER_IMG"),
        c(f"  chunk_size: {q(chunk)}", "TEST.CHUNKED_EVALUATION"),
        f"  metric: {q(metric)}",
    ]
    return lines


def prompt_file_text(title: str, source_line: str, entries: list[dict]) -> str:
    lines = [f"# {title}", f"description: {q(title)}", f"source: {q(source_line)}", "categories:"]
    for e in entries:
        parts = [f"id: {q(e['id'])}"]
        for key in ("override", "prefix", "name", "suffix", "note"):
            if key in e:
                parts.append(f"{key}: {q(e[key])}")
        lines.append("  - {" + ", ".join(parts) + "}")
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    source = Source(argv[0])
    written = 0
    odinw13 = {Path(p).stem: yaml.safe_load(source.read(p)) for p in source.list("configs/odinw_13")}

    for suite, folder in (("odinw35", "configs/odinw_35"), ("odinw13", "configs/odinw_13")):
        paths = source.list(folder)
        bases = [alias_base(Path(p).stem) for p in paths]
        aliases = {}
        for p in paths:
            stem = Path(p).stem
            base = alias_base(stem)
            rest = stem.split("_", 1)[1].lower() if "_" in stem else ""
            aliases[stem] = base if bases.count(base) == 1 else f"{base}-{rest}"
        assert len(set(aliases.values())) == len(aliases), aliases
        for p in paths:
            name, head, info = odinw_recipe(source, p, suite, aliases)
            stem = Path(p).stem
            prompt_entries = list(info["prompt_entries"])
            overrides = []
            if suite == "odinw35" and stem in odinw13:
                raw = literal(odinw13[stem]["DATASETS"]["OVERRIDE_CATEGORY"], stem)
                raw_names = {c["id"]: c["name"] for c in raw}
                for cat in info["categories"]:
                    if raw_names.get(cat["id"]) not in (None, cat["name"]):
                        overrides.append(
                            {
                                "id": cat["id"],
                                "override": cat["name"],
                                "note": f"annotation file / ODinW-13 name: {raw_names[cat['id']]}",
                            }
                        )
            prompt_file = None
            if prompt_entries or overrides:
                if prompt_entries and overrides:
                    raise SystemExit(f"{stem}: both caption prompts and overrides; merge them")
                prompt_file = f"{info['alias'].replace('/', '-')}.yaml"
                kind = (
                    "DATASETS.CAPTION_PROMPT" if prompt_entries else "DATASETS.OVERRIDE_CATEGORY (renamed categories)"
                )
                title = f"ODinW-35 {stem}: the official {kind}"
                text = prompt_file_text(
                    title, f"{p} {kind.split(' ')[0]} (GLIP {source.commit[:7]})", prompt_entries or overrides
                )
                write(PROMPTS / prompt_file, text)
                check = yaml.safe_load(text)["categories"]
                assert check == (prompt_entries or overrides), (check, prompt_entries or overrides)
                written += 1
            lines = finish(head.splitlines(), prompt_file, info["val_split"], info["input"], 100, None, "coco")
            lines += tuning_block(info["val_split"])
            text = "\n".join(lines) + "\n"
            out = RECIPES / suite / f"{stem}.yaml"
            write(out, text)
            written += 1
            # round trip: every name, id and path as in the official config
            back = yaml.safe_load(out.read_text(encoding="utf-8"))
            assert back["name"] == name
            assert [(c["id"], c["name"]) for c in back["categories"]] == [
                (c["id"], c["name"]) for c in info["categories"]
            ], stem
            for split, entry in back["splits"].items():
                assert entry == info["register"][split], (stem, split)

    # COCO val2017
    coco_lines = [
        "# COCO 2017 detection (80 categories, COCO ids); evaluated on val2017.",
        "# Paths as the official DatasetCatalog (coco_2017_train / coco_2017_val).",
        'name: "coco"',
        'aliases: ["coco-val2017", "coco2017"]',
        'description: "COCO 2017 val (80 categories)"',
        'source: "maskrcnn_benchmark/config/paths_catalog.py coco_2017_val"',
        "splits:",
        '  train: {ann_file: "coco/annotations/instances_train2017.json", img_dir: "coco/train2017"}',
        '  val: {ann_file: "coco/annotations/instances_val2017.json", img_dir: "coco/val2017"}',
        "categories:",
    ] + [f"  - {{id: {cid}, name: {q(name)}}}" for cid, name in COCO.items()]
    coco_lines = finish(coco_lines, None, "val", {}, 100, None, "coco")
    write(RECIPES / "coco.yaml", "\n".join(coco_lines))
    back = yaml.safe_load((RECIPES / "coco.yaml").read_text())
    assert {c["id"]: c["name"] for c in back["categories"]} == COCO and len(COCO) == 80
    written += 1

    # LVIS v1 minival / val (configs/lvis/*.yaml), categories from the annotation file
    for split, config in (("minival", "configs/lvis/minival.yaml"), ("val", "configs/lvis/val.yaml")):
        cfg = yaml.safe_load(source.read(config))
        reg = cfg["DATASETS"]["REGISTER"]
        mini, full = reg["lvis_evaluation_mini_val"], reg["lvis_evaluation_val"]
        lines = [
            f"# LVIS v1 {split} ({config}), MDETR's FixedAP protocol: chunks of 40 categories, 300 detections",
            "# per image (README 'LVIS Evaluation': TEST.CHUNKED_EVALUATION 40, *.DETECTIONS_PER_IMG 300).",
            "# Categories come from the annotation file (1203, sorted by id).",
            f"name: {q('lvis-' + split)}",
            f"aliases: [{q('lvis-v1-' + split)}]",
            f"description: {q('LVIS v1 ' + split + ' (1203 categories, from the annotation file)')}",
            f"source: {q(config)}",
            "splits:",
            f"  minival: {{ann_file: {q(mini['ann_file'])}, img_dir: {q(mini['img_dir'])}}}",
            f"  val: {{ann_file: {q(full['ann_file'])}, img_dir: {q(full['img_dir'])}}}",
            "categories: from_annotations",
        ]
        lines = finish(lines, None, split, cfg.get("INPUT", {}), 300, 40, "lvis_fixed_ap")
        write(RECIPES / f"lvis-{split}.yaml", "\n".join(lines))
        written += 1
    print(f"wrote {written} files from GLIP {source.commit[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
