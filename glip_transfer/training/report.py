"""The training log (``log.jsonl``: one JSON object per step and per evaluation) and the curves
(``curves.png``: loss per step and AP per evaluation, matplotlib's Agg backend)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..files import AppendLines, write_file, write_text


class JsonlLog:
    """Append-only JSONL log; :meth:`truncate_after` drops the records of steps after a resumed
    checkpoint (written by the run that was killed). A failed write is a one-line
    :class:`~glip_transfer.files.OutputError`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lines = AppendLines(self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._lines.write(json.dumps(record, default=float))

    def close(self) -> None:
        self._lines.close()

    def records(self) -> list[dict]:
        return read_log(self.path)

    def truncate_after(self, step: int) -> None:
        self.close()
        if not self.path.exists():
            return
        kept = [r for r in self.records() if int(r.get("step", 0)) <= step]
        write_text(self.path, "".join(json.dumps(r, default=float) + "\n" for r in kept))


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a log (a torn last line is ignored)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def plot_curves(records: Iterable[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss (raw and smoothed) per step and val AP / AP50 per evaluation, as a PNG."""
    import matplotlib  # about half a second to import: only when a run has finished

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    steps = [r for r in records if r.get("type") == "step" and r.get("loss") is not None]
    evals = [r for r in records if r.get("type") == "eval" and r.get("split", "val") == "val"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = [r["step"] for r in steps]
        y = [r["loss"] for r in steps]
        ax1.plot(x, y, alpha=0.35, lw=0.8, label="loss")
        window = max(1, len(y) // 25)
        smooth, acc = [], 0.0
        for i, v in enumerate(y):
            acc += v
            if i >= window:
                acc -= y[i - window]
            smooth.append(acc / min(i + 1, window))
        ax1.plot(x, smooth, lw=1.6, label=f"mean of {window}")
        ax1.legend()
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.grid(alpha=0.3)
    if evals:
        x = [r["epoch"] for r in evals]
        for key in ("AP", "AP50"):
            ax2.plot(x, [max(r.get(key, 0.0), 0.0) for r in evals], marker="o", label=f"val {key}")
        ax2.legend()
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("AP")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)

    write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
