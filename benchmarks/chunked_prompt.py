"""A long prompt split into chunks (LVIS: 1203 categories): seconds per image when every chunk runs
the whole model (before) and when Swin + FPN run once per image and only the fused head per chunk
(after, ``glip_transfer.inference.detect_batch``), and with several chunks batched through the head.

    python benchmarks/chunked_prompt.py [--ann lvis_v1_val.json] [--protocol recipe,greedy]
                                        [--size 800x800] [--threads 1] [--batched 4] [--max-chunks 0]

GLIP-T with the reference's deterministic weights, the astronaut photo resized to ``--size``. The
categories are those of ``--ann`` (a COCO/LVIS annotation file, e.g. LVIS v1's), else 1203 synthetic
names with LVIS's distribution of word pieces per name (same caption lengths, so the same cost).
Protocols: ``recipe`` = the ``lvis-minival`` recipe (TEST.CHUNKED_EVALUATION 40: 31 chunks of ~111
tokens), ``greedy`` = the fewest chunks that fit 256 tokens (14). CPU time per image
(``time.process_time``); the paths of one protocol run back to back; their detections are compared
(the shared path must give the same floats). Writes ``chunked_prompt.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch
from gpu_eval import find_vocab  # benchmarks/ is on the path when a script in it runs
from rich.console import Console
from rich.table import Table

from glip_transfer.config import variant_config
from glip_transfer.inference import EncodedPrompt, detect_batch
from glip_transfer.model.glip import build_glip
from glip_transfer.model.head import HeadOutputs
from glip_transfer.model.language import TextFeatures
from glip_transfer.model.postprocess import match_detections, merge_chunk_detections, postprocess
from glip_transfer.prompts import build_detection_prompt
from glip_transfer.recipes import load_recipe
from glip_transfer.reference import apply_deterministic_weights
from glip_transfer.tokenizer import load_tokenizer

REFERENCE_DIR = Path(os.environ.get("GLIP_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
# word pieces per LVIS v1 category name as captions write it (prompts.clean_name, bert-base-uncased): count of names with 1..5
LVIS_PIECES = {1: 448, 2: 547, 3: 175, 4: 29, 5: 4}


def synthetic_lvis(tokenizer) -> list[tuple[int, str]]:
    """1203 distinct names of one-piece vocabulary words, as many pieces per name as LVIS has."""
    rng = random.Random(0)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) >= 4)
    rng.shuffle(words)
    pieces = [n for n, count in LVIS_PIECES.items() for _ in range(count)]
    rng.shuffle(pieces)
    names, start = [], 0
    for n in pieces:
        names.append(" ".join(words[start : start + n]))
        start += n
    return list(enumerate(names, start=1))


def prompt_for(protocol: str, tokenizer, categories, max_len: int) -> EncodedPrompt:
    chunk_size = load_recipe("lvis-minival").evaluation.chunk_size if protocol == "recipe" else None
    prompt = build_detection_prompt(tokenizer, categories, chunk_size=chunk_size, max_len=max_len, warn=False)
    return EncodedPrompt.from_chunks(tokenizer, prompt.chunks, max_len)


@torch.no_grad()
def before(model, images, sizes, prompt):
    """Every chunk through the whole model (as inference ran before the image work was shared)."""
    per_chunk, first = [], 0
    for index, chunk in enumerate(prompt.chunks):
        dets = model.detect(images, sizes, prompt.features(model, index, images.device), chunk.positive_map)
        for d in dets:
            d.labels = d.labels + first
        per_chunk.append(dets)
        first += len(chunk.category_ids)
    return [merge_chunk_detections([c[i] for c in per_chunk], model.cfg.postprocess.detections_per_img) for i in range(len(sizes))]


@torch.no_grad()
def batched(model, images, sizes, prompt, group: int):
    """One image; Swin + FPN once, then ``group`` chunks at a time through the head as a batch
    (captions padded to the longest of the group, masked), decoded chunk by chunk."""
    features = model.forward_features(images)
    per_chunk, first = [], 0
    for g0 in range(0, len(prompt.chunks), group):
        indices = list(range(g0, min(g0 + group, len(prompt.chunks))))
        texts = [prompt.features(model, i, images.device) for i in indices]
        length = max(t.used_length() for t in texts)
        text = TextFeatures(*(torch.cat([getattr(t, f)[:, :length] for t in texts]) for f in ("hidden", "embedded", "mask")))
        k = len(indices)
        outputs, anchors = model(images.expand(k, -1, -1, -1), text, features=[f.expand(k, -1, -1, -1).contiguous() for f in features])
        for j, index in enumerate(indices):
            chunk = prompt.chunks[index]
            one = HeadOutputs(*([t[j : j + 1].float() for t in field] for field in (outputs.box_regression, outputs.centerness, outputs.token_logits)))
            dets = postprocess(one, anchors, chunk.positive_map[:, :length].float(), sizes, model.cfg.postprocess)
            for d in dets:
                d.labels = d.labels + first
            per_chunk.append(dets)
            first += len(chunk.category_ids)
    return [merge_chunk_detections([c[i] for c in per_chunk], model.cfg.postprocess.detections_per_img) for i in range(len(sizes))]


def image_tensor(h: int, w: int) -> torch.Tensor:
    from PIL import Image

    from glip_transfer.config import InputConfig
    from glip_transfer.transforms import to_normalized_tensor

    photo = REFERENCE_DIR / "astronaut.png"
    if not photo.exists():
        return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    return to_normalized_tensor(Image.open(photo).convert("RGB").resize((w, h), Image.Resampling.BILINEAR), InputConfig())[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", type=Path, default=None, help="COCO/LVIS annotation file whose categories to prompt")
    parser.add_argument("--protocol", default="recipe,greedy")
    parser.add_argument("--size", default="800x800")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batched", default="4", help="chunks per head batch for the batched path(s); empty: skip")
    parser.add_argument("--max-chunks", type=int, default=0, help="time only the first N chunks (0: all)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    h, w = (int(v) for v in args.size.lower().split("x"))

    tokenizer = load_tokenizer(find_vocab())
    if args.ann is not None:
        cats = json.loads(args.ann.read_text())["categories"]
        categories, source = [(c["id"], c["name"]) for c in cats], f"{args.ann.name} ({len(cats)} categories)"
    else:
        categories, source = synthetic_lvis(tokenizer), "1203 synthetic names with LVIS's word pieces per name"
    cfg = variant_config("glip-t")
    cfg.postprocess.detections_per_img = 300  # LVIS
    model = build_glip(cfg)
    apply_deterministic_weights(model, cfg.head.num_convs)
    model.eval()
    images = image_tensor(h, w)
    sizes = [(h, w)]

    rows = []
    for protocol in args.protocol.split(","):
        prompt = prompt_for(protocol, tokenizer, categories, cfg.language.max_query_len)
        if args.max_chunks:
            prompt = EncodedPrompt(prompt.chunks[: args.max_chunks], prompt.input_ids[: args.max_chunks], prompt.attention_masks[: args.max_chunks])
        with torch.no_grad():
            for i in range(len(prompt.chunks)):  # BERT once per chunk, cached (not timed: once per dataset)
                prompt.features(model, i, images.device)
        tokens = [int(m.sum()) for m in prompt.attention_masks]
        paths = {"before": lambda: before(model, images, sizes, prompt), "after": lambda: detect_batch(model, images, sizes, prompt)}
        for g in (int(x) for x in args.batched.split(",") if x):
            paths[f"after, {g} chunks per head batch"] = lambda g=g: batched(model, images, sizes, prompt, g)
        dets = {}
        for name, run in paths.items():
            start = time.process_time()
            dets[name] = run()[0]
            seconds = time.process_time() - start
            row = {"protocol": protocol, "path": name, "chunks": len(prompt.chunks), "mean_tokens": round(sum(tokens) / len(tokens), 1),
                   "cpu_s_per_image": round(seconds, 2), "detections": len(dets[name])}  # fmt: skip
            if name != "before":
                m = match_detections(dets["before"], dets[name])
                same = torch.equal(dets["before"].scores, dets[name].scores) and torch.equal(dets["before"].boxes, dets[name].boxes)
                row.update(identical_to_before=same, matched=m["matched"], max_score_diff=m["max_score_diff"])
            rows.append(row)
            Console().print(row)
    load_end = os.getloadavg()

    table = Table(title=f"GLIP-T, {source}, {args.size}, {args.threads} thread(s): CPU s per image")
    cols = ("protocol", "path", "chunks", "mean_tokens", "cpu_s_per_image", "identical_to_before", "matched")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in cols))
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}"
    result = {"machine": machine, "categories": source, "size": args.size, "loadavg_start": load_start, "loadavg_end": load_end, "rows": rows}
    (out / "chunked_prompt.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Chunked prompt: {source}", "", f"Machine: {machine}; GLIP-T (deterministic weights), astronaut at {args.size}; "
             f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end. CPU seconds per image "
             "(BERT features cached, not timed).", "",
             "| protocol | path | chunks | mean tokens | CPU s / image | identical to before | matched |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['protocol']} | {r['path']} | {r['chunks']} | {r['mean_tokens']} | {r['cpu_s_per_image']} | "
              f"{r.get('identical_to_before', '')} | {r.get('matched', '')} |" for r in rows]  # fmt: skip
    (out / "chunked_prompt.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
