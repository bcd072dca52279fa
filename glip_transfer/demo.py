"""``glip demo``: the whole transfer story on glip-nano, offline, in minutes.

Zero-shot on both demo targets (``demo/novel``: known words in unseen combinations;
``demo/shifted``: shape words never seen in pretraining, other backgrounds and scales), then
linear probing, prompt tuning, LoRA and full fine-tuning on ``demo/shifted`` — the same runs as
``glip zeroshot eval`` / ``glip finetune --recipe demo/shifted --mode M`` with the settings of
:data:`MODE_SETTINGS` and a short budget (:data:`EPOCHS`). The data are rendered into the data
root on first use.

The report folder holds one JSON file per finished step (``steps/<name>.json``, written
atomically with the settings that made it), the fine-tuning runs (``runs/<mode>/``), and at the
end ``report.md`` (the table), ``ap_vs_trainable.png`` and ``examples/`` (a few test images
before and after transfer). An interrupted demo continues with ``resume=True``: finished steps
are reused only when they were made with the same settings (else a one-line error), an
unfinished fine-tuning run starts over.

``few_shot=True``: the K-shot table instead (1/3/5/10 shots x the recipe's three prepared
few-shot draws, every mode; mean ± std of test AP).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_model
from .config import ConfigError
from .data import DetectionDataset, load_coco
from .files import write_text
from .inference import EncodedPrompt
from .recipes import evaluation_prompt, load_recipe, split_paths
from .tokenizer import load_tokenizer
from .training.artifacts import base_hash
from .training.evaluate import evaluate

TARGETS = ("demo/novel", "demo/shifted")
SHIFTED = "demo/shifted"
MODES = ("linear", "prompt", "lora", "full")
# Per-mode settings of the demo's fine-tuning runs (``--set`` values of glip finetune): batch 8,
# no AMP (CPU), glip-nano's 160-pixel input and no dropout (as pretrained), a constant learning rate, and the
# learning rates of a 75-step budget on 200 images (the official ones are for 200 epochs).
COMMON = ["train.batch_size=8", "evaluation.batch_size=8", "train.amp=false", "train.workers=0", "train.warmup_iters=0",
          "train.schedule=constant", "train.dropout=0.0", "train.min_sizes=[160]", "train.max_size=160"]  # fmt: skip
MODE_SETTINGS: dict[str, list[str]] = {
    "linear": ["train.lr=0.001", "train.weight_decay=0.0"],
    "prompt": ["train.lr=0.05", "train.weight_decay=0.0"],
    "lora": ["train.lr=0.001", "train.weight_decay=0.0"],
    "full": ["train.lr=0.0002", "train.weight_decay=0.0001"],
}
EPOCHS = {"linear": 3, "prompt": 3, "lora": 3, "full": 3}
FEW_SHOTS = (1, 3, 5, 10)
EXAMPLES = 3  # test images drawn before / after
SHOW_SCORE = 0.3  # detections drawn in the examples


class DemoError(ConfigError):
    """A demo folder that cannot be used as asked; the message says what to do."""


@dataclass
class DemoConfig:
    out: Path
    data_root: Path
    weights: str = "glip-nano"
    device: str = "cpu"
    epochs: dict[str, int] = field(default_factory=lambda: dict(EPOCHS))
    modes: tuple[str, ...] = MODES
    few_shot: bool = False
    shots: tuple[int, ...] = FEW_SHOTS

    def identity(self, base: str) -> dict:
        """What a finished step depends on (a step made with other values is never reused)."""
        return {
            "weights_sha256": base,
            "epochs": self.epochs,
            "settings": {m: COMMON + MODE_SETTINGS[m] for m in MODES},
            "few_shot": self.few_shot,
        }


@dataclass
class Row:
    target: str
    mode: str
    trainable: int
    total: int
    ap: float
    ap50: float
    seconds: float
    shots: int = 0
    seed: int | None = None
    run: str | None = None  # the run folder (fine-tuning)


Progress = Callable[[str, float], None]  # (what is running, fraction of the demo done)


def check_out(out: Path, *, force: bool, resume: bool) -> str:
    """'new', 'resume' or 'force'; a one-line :class:`DemoError` for a folder in the way."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; give a folder")
    used = out.is_dir() and any(out.iterdir())
    if not used:
        return "new"
    if force:
        return "force"
    if resume:
        if not (out / "steps").is_dir():
            raise DemoError(
                f"--out {out} is not a glip demo folder: choose another --out, or pass --force to replace it"
            )
        return "resume"
    if (out / "demo.json").exists():
        raise DemoError(f"{out} holds a finished demo: pass --force to run it again, or choose another --out")
    raise DemoError(
        f"{out} is not empty: pass --resume to continue an interrupted demo, --force to start over, or another --out"
    )


def clear_out(out: Path) -> None:
    """Remove what a demo writes in ``out`` (nothing else)."""
    import shutil

    for name in ("steps", "runs", "examples"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("demo.json", "report.md", "ap_vs_trainable.png"):
        (out / name).unlink(missing_ok=True)


def check_settings(cfg: DemoConfig) -> None:
    """Every mode's settings validated before any work (a one-line ConfigError)."""
    from .training.config import apply_train_overrides
    from .training.modes import train_config_for

    recipe = load_recipe(SHIFTED)
    for mode in cfg.modes:
        if mode not in MODES:
            raise ConfigError(f"demo mode {mode!r}: choose from {', '.join(MODES)}")
        apply_train_overrides(
            train_config_for(recipe, mode), [s.split(".", 1)[1] for s in COMMON + MODE_SETTINGS[mode]]
        )


def plan(cfg: DemoConfig) -> list[tuple[str, str, int, int | None]]:
    """The steps: (target, mode, shots, seed)."""
    steps: list[tuple[str, str, int, int | None]] = [(t, "zeroshot", 0, None) for t in TARGETS]
    if not cfg.few_shot:
        return steps + [(SHIFTED, m, 0, None) for m in cfg.modes]
    seeds = load_recipe(SHIFTED).few_shot.seeds
    return steps + [(SHIFTED, m, k, s) for k in cfg.shots for s in seeds for m in cfg.modes]


def step_name(target: str, mode: str, shots: int, seed: int | None) -> str:
    name = f"{target.split('/')[1]}-{mode}"
    return name + (f"-{shots}shot-seed{seed}" if shots else "")


def run_demo(cfg: DemoConfig, *, force: bool = False, resume: bool = False, progress: Progress | None = None,
             notify: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Run (or continue) the demo; returns ``{"targets", "results", "few_shot"?, "report"}`` and writes
    the report folder."""
    how = check_out(cfg.out, force=force, resume=resume)
    check_settings(cfg)
    if how == "force":
        clear_out(cfg.out)
    (cfg.out / "steps").mkdir(parents=True, exist_ok=True)
    notify = notify or (lambda text: None)
    device = torch.device(cfg.device)
    base_model, _ = load_model(cfg.weights, overrides=load_recipe(SHIFTED).evaluation.model_overrides())
    identity = cfg.identity(base_hash(cfg.weights, base_model))
    steps = plan(cfg)
    rows: list[Row] = []
    start = time.perf_counter()
    for i, (target, mode, shots, seed) in enumerate(steps):
        name = step_name(target, mode, shots, seed)
        if progress:
            progress(name, i / len(steps))
        path = cfg.out / "steps" / f"{name}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("identity") != identity:
                raise DemoError(
                    f"{path}: made with other settings (weights, budget or mode settings): pass --force to start over"
                )
            rows.append(Row(**saved["row"]))
            continue
        if mode == "zeroshot":
            row = zeroshot_step(base_model, target, cfg, device)
        else:
            row = finetune_step(target, mode, shots, seed, cfg, name)
        write_text(path, json.dumps({"identity": identity, "row": asdict(row)}, indent=2) + "\n")
        rows.append(row)
        notify(f"{name}: AP {row.ap:.3f} AP50 {row.ap50:.3f} ({row.seconds:.0f} s)")
    if progress:
        progress("report", 1.0)
    summary = summarise(rows, cfg)
    summary["seconds_this_run"] = time.perf_counter() - start
    write_report(cfg, rows, summary)
    return summary


# --------------------------------------------------------------------------- steps


def target_dataset(model, target: str, data_root: Path):
    """The recipe's evaluation split as a dataset, with the encoded evaluation prompt."""
    recipe = load_recipe(target)
    ann, images = split_paths(recipe, recipe.evaluation.split, data_root)
    coco = load_coco(ann, require_annotations=False)
    tokenizer = load_tokenizer(model.cfg.language.tokenizer)
    prompt = evaluation_prompt(recipe, tokenizer, list(coco.categories.values()))
    encoded = EncodedPrompt.from_chunks(tokenizer, prompt.chunks, model.cfg.language.max_query_len)
    return recipe, DetectionDataset(coco, images, model.cfg.input), encoded


def zeroshot_step(model, target: str, cfg: DemoConfig, device: torch.device) -> Row:
    start = time.perf_counter()
    _, dataset, encoded = target_dataset(model, target, cfg.data_root)  # both targets evaluate at the same size
    results, metrics = evaluate(model, dataset, encoded, batch_size=8, device=device)
    folder = cfg.out / "runs" / f"zeroshot-{target.split('/')[1]}"
    write_text(folder / "bbox.json", json.dumps(results) + "\n")
    total = sum(p.numel() for p in model.parameters())
    return Row(target, "zeroshot", 0, total, float(metrics["AP"]), float(metrics["AP50"]), time.perf_counter() - start,
               run=str(folder))  # fmt: skip


def finetune_command(mode: str, cfg: DemoConfig, shots: int = 0, seed: int | None = None) -> list[str]:
    """The ``glip finetune`` arguments that make the same run (for the report)."""
    args = [
        "glip",
        "finetune",
        "--recipe",
        SHIFTED,
        "--weights",
        cfg.weights,
        "--mode",
        mode,
        "--epochs",
        str(cfg.epochs[mode]),
    ]
    if shots:
        args += ["--shots", str(shots)]
    for item in COMMON + MODE_SETTINGS[mode] + few_shot_sets(shots, seed):
        args += ["--set", item]
    return args


def few_shot_sets(shots: int, seed: int | None) -> list[str]:
    return ["train.few_shot_prepared=true", f"train.shuffle_seed={seed}"] if shots else []


def finetune_step(target: str, mode: str, shots: int, seed: int | None, cfg: DemoConfig, name: str) -> Row:
    from .training.run import RunSpec, prepare, train_run

    start = time.perf_counter()
    out = cfg.out / "runs" / name
    spec = RunSpec(mode=mode, recipe=target, weights=cfg.weights, out=out, shots=shots, epochs=cfg.epochs[mode],
                   sets=COMMON + MODE_SETTINGS[mode] + few_shot_sets(shots, seed), data_root=cfg.data_root,
                   device=cfg.device, force=True, progress=False)  # fmt: skip
    prep = prepare(spec, device=torch.device(cfg.device))
    summary = train_run(prep, console=None)
    test = summary["test"]
    return Row(
        target,
        mode,
        prep.trainable,
        prep.total,
        float(test["AP"]),
        float(test["AP50"]),
        time.perf_counter() - start,
        shots=shots,
        seed=seed,
        run=str(out),
    )


# --------------------------------------------------------------------------- the report


def summarise(rows: list[Row], cfg: DemoConfig) -> dict:
    """The ``--json`` object: zero-shot of each target, the shifted target's table (``few_shot``:
    mean and std per mode and shots as well)."""

    def public(r: Row) -> dict:
        return {"mode": r.mode, "trainable": r.trainable, "ap": r.ap, "ap50": r.ap50, "seconds": r.seconds}

    targets = {r.target: public(r) for r in rows if r.mode == "zeroshot"}
    out: dict = {"targets": targets}
    if not cfg.few_shot:
        out["results"] = [public(r) for r in rows if r.target == SHIFTED]
        return out
    out["results"] = [public(r) for r in rows if r.target == SHIFTED and r.mode == "zeroshot"]
    table = []
    for mode in cfg.modes:
        for k in cfg.shots:
            group = [r for r in rows if r.mode == mode and r.shots == k]
            if not group:
                continue
            aps = [r.ap for r in group]
            table.append({"mode": mode, "shots": k, "seeds": [r.seed for r in group], "trainable": group[0].trainable,
                          "ap_mean": statistics.fmean(aps), "ap_std": statistics.stdev(aps) if len(aps) > 1 else 0.0,
                          "ap50_mean": statistics.fmean(r.ap50 for r in group),
                          "seconds": sum(r.seconds for r in group)})  # fmt: skip
    out["few_shot"] = table
    return out


def write_report(cfg: DemoConfig, rows: list[Row], summary: dict) -> None:
    total = next((r.total for r in rows if r.total), 0)
    lines = [f"# glip demo ({cfg.weights})", "", "| target | mode | trainable | share | AP | AP50 | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        if cfg.few_shot and r.mode != "zeroshot":
            continue
        share = f"{100 * r.trainable / r.total:.3f} %" if r.total else "-"
        lines.append(
            f"| {r.target} | {r.mode} | {r.trainable:,} | {share} | {r.ap:.3f} | {r.ap50:.3f} | {r.seconds:.0f} |"
        )
    if cfg.few_shot:
        lines += ["", "K-shot on demo/shifted: test AP, mean ± std over the recipe's three few-shot draws", "",
                  "| mode | trainable | " + " | ".join(f"{k}-shot" for k in cfg.shots) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in cfg.shots) + " |"]  # fmt: skip
        for mode in cfg.modes:
            cells = {e["shots"]: e for e in summary["few_shot"] if e["mode"] == mode}
            if cells:
                trainable = next(iter(cells.values()))["trainable"]
                values = [
                    f"{cells[k]['ap_mean']:.3f} ± {cells[k]['ap_std']:.3f}" if k in cells else "-" for k in cfg.shots
                ]
                lines.append(f"| {mode} | {trainable:,} | " + " | ".join(values) + " |")
    lines += ["", f"Base model: {total:,} parameters. The same fine-tuning runs from the command line:", ""]
    for mode in cfg.modes:
        lines.append("    " + " ".join(finetune_command(mode, cfg)))
    lines += ["", "![AP against trainable parameters](ap_vs_trainable.png)", ""]
    examples = write_examples(cfg, rows)
    if examples:
        lines += ["Test images of demo/shifted, before (zero-shot) and after transfer "
                  f"(detections scoring >= {SHOW_SCORE}):", ""]  # fmt: skip
        lines += [f"![{p.stem}](examples/{p.name})" for p in examples]
    plot_ap(rows, cfg.out / "ap_vs_trainable.png", few_shot=cfg.few_shot)
    write_text(cfg.out / "report.md", "\n".join(lines) + "\n")
    write_text(cfg.out / "demo.json", json.dumps({**summary, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


def plot_ap(rows: list[Row], path: Path, *, few_shot: bool) -> None:
    """Test AP of demo/shifted against the trainable parameters (log scale; zero-shot at the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifted = [r for r in rows if r.target == SHIFTED and (not few_shot or r.mode == "zeroshot")]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for r in shifted:
        x = max(r.trainable, 1)
        ax.scatter([x], [r.ap], s=40)
        ax.annotate(r.mode, (x, r.ap), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (zero-shot plotted at 1)")
    ax.set_ylabel("test AP (demo/shifted)")
    ax.set_title("glip-nano on demo/shifted")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    from .files import write_file

    write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_examples(cfg: DemoConfig, rows: list[Row]) -> list[Path]:
    """For the first :data:`EXAMPLES` test images of demo/shifted: one PNG with the image as
    detected zero-shot and after each mode (its test detections, ``bbox.json`` of the run)."""
    from PIL import Image, ImageDraw

    from .visualize import draw_detections, save_png

    shown = [r for r in rows if r.target == SHIFTED and r.shots == 0 and r.run]
    if cfg.few_shot or not shown:
        return []
    recipe = load_recipe(SHIFTED)
    ann, images = split_paths(recipe, recipe.evaluation.split, cfg.data_root)
    coco = load_coco(ann, require_annotations=False)
    names = coco.category_names
    detections = {}
    for r in shown:
        file = Path(r.run) / ("bbox.json" if r.mode == "zeroshot" else "test/bbox.json")
        detections[r.mode] = json.loads(file.read_text()) if file.exists() else []
    paths = []
    for image_id in sorted(coco.images)[:EXAMPLES]:
        info = coco.images[image_id]
        image = Image.open(images / info["file_name"]).convert("RGB")
        panels = []
        for mode, dets in detections.items():
            mine = [{"box": [d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]],
                     "score": d["score"], "label": str(names.get(d["category_id"], d["category_id"]))}
                    for d in dets if d["image_id"] == image_id and d["score"] >= SHOW_SCORE]  # fmt: skip
            panel = draw_detections(image.resize((image.width * 2, image.height * 2)), [_scaled(d, 2) for d in mine],
                                    label_names=sorted(set(names.values())))  # fmt: skip
            ImageDraw.Draw(panel).text((4, panel.height - 14), mode, fill=(255, 255, 255))
            panels.append(panel)
        strip = Image.new(
            "RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), (255, 255, 255)
        )
        x = 0
        for p in panels:
            strip.paste(p, (x, 0))
            x += p.width + 4
        path = cfg.out / "examples" / f"test_{image_id}.png"
        save_png(strip, path)
        paths.append(path)
    return paths


def _scaled(det: dict, factor: float) -> dict:
    return {**det, "box": [v * factor for v in det["box"]]}
