"""The training forward (:class:`TrainModule`) and loop (:class:`Trainer`).

The forward computes only what can change: frozen parts upstream of everything that trains run
without autograd (Swin + FPN when the backbone is frozen; the fused tower in linear probing), and
a frozen language backbone encodes the run's caption once and the features are reused every step.
Captions are cut to their longest real length in the batch (padding positions cannot influence
real tokens or the loss, so this changes nothing but the cost).

A step: forward (CUDA autocast: bf16 where supported, else fp16 with a GradScaler), the GLIP
losses, backward, full-model gradient clipping (norm 1.0), and the optimiser step — skipped and
counted when the loss or the gradient norm is not finite (the official zeroes a NaN loss instead).
Then the lr schedule and the EMA. After every epoch: validation AP, the plateau schedule, the best
weights and the early stop; the `last` checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import CheckpointError
from ..model.autograd import needs_grad
from ..model.glip import GLIP
from ..model.language import TextFeatures, used_length
from ..model.loss import GLIPLoss, GroundingTarget, LossConfig
from ..runtime import autocast, autocast_dtype, progress_bar
from .config import TrainConfig
from .data import Batch, EpochBatchSampler, FixedPrompt, make_train_loader
from .distributed import DistInfo, all_reduce_mean, all_true, barrier, broadcast_object
from .modes import ModePlan, set_train_modes
from .optim import EMA, LRSchedule, build_optimizer
from .report import JsonlLog
from .state import (
    has_checkpoint,
    load_last,
    load_optimizer,
    load_state_file,
    optimizer_tensors,
    rng_state,
    save_last,
    save_state_file,
    set_rng_state,
    trained_tensors,
)


class TrainModule(nn.Module):
    """GLIP + the loss: ``forward(images, targets, input_ids, attention_mask)`` -> the loss dict,
    through the model's own forward. This is what DDP wraps.

    A frozen language backbone in eval mode encodes the run's fixed caption once; the features
    are reused every step (and dropped by :meth:`forget_text` when the weights change)."""

    def __init__(self, model: GLIP, plan: ModePlan, loss_cfg: LossConfig | None = None):
        super().__init__()
        self.model = model
        self.plan = plan
        loss_cfg = loss_cfg or LossConfig(max_query_len=model.cfg.language.max_query_len)
        self.criterion = GLIPLoss(loss_cfg, model.cfg.postprocess.box_coder_weights)
        self._text_cache: tuple[bytes, TextFeatures] | None = None

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The model's trainable parameters (official names), in the model's order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def forget_text(self) -> None:
        self._text_cache = None

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """BERT over the captions cut to their longest real length (padding positions cannot
        influence real tokens or the loss); cached for a frozen language backbone in eval mode."""
        n = used_length(attention_mask)
        ids, mask = input_ids[:, :n], attention_mask[:, :n]
        language = self.model.language_backbone
        if language.training or needs_grad(language):
            return self.model.encode_text(ids, mask)
        key = ids.cpu().numpy().tobytes() + str(ids.device).encode()
        if self._text_cache is not None and self._text_cache[0] == key:
            return self._text_cache[1]
        with torch.no_grad():
            feats = self.model.encode_text(ids, mask)
        if ids.shape[0] == 1:  # the run's fixed caption: BERT runs once
            self._text_cache = (key, feats)
        return feats

    def forward(
        self,
        images: torch.Tensor,
        targets: list[GroundingTarget],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        text = self.text_features(input_ids, attention_mask).expand(images.shape[0])
        outputs, anchors = self.model(images, text)
        num_tokens = text.mask.shape[1]
        targets = [GroundingTarget(t.boxes, t.positive_map[:, :num_tokens]) for t in targets]
        return self.criterion(outputs, anchors, targets, text.mask)


@dataclass
class TrainerState:
    """The loop's counters (saved in every checkpoint)."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done within the current epoch
    step: int = 0  # optimiser steps attempted (skipped ones included)
    skipped: int = 0  # steps skipped for a non-finite loss / gradient
    best_ap: float = 0.0  # official AUTO_TERMINATE previous_best starts at 0.0
    best_epoch: int = -1
    patience: int = 0
    stopped_early: bool = False
    finished: bool = False
    history: list = field(default_factory=list)  # one record per validation


@dataclass
class TrainResult:
    status: Literal["finished", "stopped"]  # stopped: by the ``stop_after_steps`` hook
    state: TrainerState
    best_path: Path | None


class Trainer:
    """Runs epochs over ``dataset`` with ``module``; ``evaluate(model) -> metrics`` gives the
    validation metrics (None: no validation; the last weights are the best).

    ``stop_after_steps`` (tests and tools, not a setting): end after that many steps as if the
    process were killed, after writing the ``last`` checkpoint (0: off)."""

    def __init__(
        self,
        module: TrainModule,
        cfg: TrainConfig,
        dataset,
        *,
        device: torch.device,
        out_dir: str | Path,
        prompt: FixedPrompt | None = None,
        evaluate: Callable[[GLIP], dict] | None = None,
        dist_info: DistInfo | None = None,
        console: Console | None = None,
        progress: bool = True,
        stop_after_steps: int = 0,
    ):
        self.module = module
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.prompt = prompt
        self.evaluate_fn = evaluate
        self.dist = dist_info or DistInfo()
        self.console = console
        self.show_progress = progress and self.dist.main
        self.stop_after_steps = stop_after_steps
        self.state = TrainerState()
        self.log = JsonlLog(self.out_dir / "log.jsonl") if self.dist.main else None

        self.named = module.named_trainable()
        self.params = {n: p for n, p in self.named}
        self.optimizer = build_optimizer(module.model, cfg, module.plan.definition.per_part_lr)
        per_epoch = EpochBatchSampler.num_batches(len(dataset), cfg.batch_size)
        self.batches_per_epoch = per_epoch
        total = per_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.schedule = LRSchedule(self.optimizer, cfg, self.total_steps)
        self.ema = EMA({n: p for n, p in self.named}, cfg.ema) if cfg.ema > 0 else None

        self.amp_dtype = autocast_dtype(device, cfg.amp, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.wrapped: nn.Module = module
        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            # buffers (anchors, Swin indices) never change: no syncing in forward
            new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            sync = {"forward_sync_buffers": False} if new_name else {"broadcast_buffers": False}
            self.wrapped = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False, **sync)

    # ------------------------------------------------------------------ checkpoints

    def _trainable_tensors(self, prefix: str = "param/") -> dict[str, torch.Tensor]:
        return {prefix + n: p.detach() for n, p in self.named}

    def save_checkpoint(self) -> None:
        if not self.dist.main:
            return
        tensors = self._trainable_tensors()
        opt_t, opt_json = optimizer_tensors(self.optimizer)
        tensors.update(opt_t)
        if self.ema is not None:
            tensors.update({"ema/" + k: v for k, v in self.ema.shadow.items()})
        rng_t, rng_json = rng_state()
        tensors.update(rng_t)
        state = {
            "trainer": asdict(self.state),
            "optimizer": opt_json,
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_json,
            "mode": self.module.plan.mode,
            "config": _jsonable(asdict(self.cfg)),
        }
        save_last(self.ckpt_dir, tensors, state)

    def resume(self) -> bool:
        """Restore from ``checkpoints/last`` (or ``last.prev``); False when there is none."""
        if not has_checkpoint(self.ckpt_dir):
            return False
        tensors, state, _ = load_last(self.ckpt_dir)
        mode = self.module.plan.mode
        if state.get("mode") != mode:
            raise CheckpointError(
                f"{self.ckpt_dir}: the checkpoint is of mode {state.get('mode')!r}, not {mode!r}: use another --out"
            )
        params = trained_tensors(tensors, "param/", list(self.params))
        missing = [n for n in self.params if n not in params]
        if missing:
            raise CheckpointError(
                f"{self.ckpt_dir}: the checkpoint lacks {missing[0]} (a different model or mode): use another --out"
            )
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(params[n].to(p.device, p.dtype))
        load_optimizer(self.optimizer, tensors, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            for k, v in trained_tensors(tensors, "ema/", list(self.ema.shadow)).items():
                self.ema.shadow[k].copy_(v)
        set_rng_state(tensors, state["rng"])
        self.state = TrainerState(**state["trainer"])
        saved = state.get("config") or {}
        now = _jsonable(asdict(self.cfg))
        changed = sorted(k for k in now if k not in ("max_steps", "workers") and saved.get(k, now[k]) != now[k])
        if changed:
            warnings.warn(
                f"resuming with changed settings ({', '.join(changed[:5])}): the run will not match an uninterrupted "
                "one",
                stacklevel=2,
            )
        self.module.forget_text()
        if self.log is not None:
            self.log.truncate_after(self.state.step)
        return True

    def save_best(self) -> None:
        if not self.dist.main:
            return
        tensors = {k: v.detach() for k, v in self.best_tensors().items()}
        save_state_file(
            self.ckpt_dir / "best.safetensors",
            {"param/" + k: v for k, v in tensors.items()},
            {"epoch": self.state.epoch, "step": self.state.step, "ap": self.state.best_ap},
        )

    def best_tensors(self) -> dict[str, torch.Tensor]:
        """The weights to evaluate / keep: the EMA averages when EMA is on."""
        if self.ema is not None:
            return dict(self.ema.shadow)
        return {n: p for n, p in self.named}

    def load_best(self) -> bool:
        path = self.ckpt_dir / "best.safetensors"
        if not path.exists():
            return False
        tensors, _ = load_state_file(path)
        params = trained_tensors(tensors, "param/", list(self.params))
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(params[n].to(p.device, p.dtype))
        return True

    # ------------------------------------------------------------------ one step

    def autocast(self) -> contextlib.AbstractContextManager:
        """The step's autocast (CUDA with ``train.amp``), a no-op otherwise."""
        return autocast(self.device, self.amp_dtype is not None, self.cfg.amp_dtype)

    def train_step(self, batch: Batch) -> dict[str, Any]:
        cfg = self.cfg
        batch = batch.to(self.device)
        if batch.input_ids is None:
            if self.prompt is None:
                raise ValueError("the batch has no captions and the run no fixed prompt")
            input_ids = self.prompt.input_ids.to(self.device)
            mask = self.prompt.attention_mask.to(self.device)
        else:
            input_ids, mask = batch.input_ids, batch.attention_mask
        with self.autocast():
            losses = self.wrapped(batch.images, batch.targets, input_ids, mask)
        loss = sum(losses.values())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        params = list(self.params.values())
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss_value = float(loss.detach())
        finite = all_true(math.isfinite(loss_value) and bool(torch.isfinite(grad_norm)), self.dist, self.device)
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        else:
            self.state.skipped += 1
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None and finite:
            self.ema.update(self.params)
        self.state.step += 1
        parts = {k: float(v.detach()) for k, v in losses.items()}
        if self.dist.enabled:
            reduced = all_reduce_mean(
                torch.tensor([loss_value, *parts.values()], device=self.device), self.dist
            ).tolist()
            loss_value, parts = reduced[0], dict(zip(parts, reduced[1:]))
        return {"loss": loss_value, **parts, "grad_norm": float(grad_norm), "skipped": not finite}

    # ------------------------------------------------------------------ evaluation

    def validate(self) -> dict | None:
        """Val metrics (rank 0 evaluates; the others get its AP)."""
        if self.evaluate_fn is None:
            return None
        metrics = None
        if self.dist.main:
            if self.ema is not None:
                self.ema.swap(self.params)
            try:
                metrics = self.evaluate_fn(self.module.model)
            finally:
                if self.ema is not None:
                    self.ema.swap(self.params)
            set_train_modes(self.module.model, self.module.plan, True)
            metrics = {k: v for k, v in metrics.items() if k not in ("per_category", "log")}
        metrics = broadcast_object(metrics, self.dist)
        return metrics

    def _after_validation(self, metrics: dict) -> bool:
        """Schedule, best weights and early stop after a validation; True = stop training."""
        cfg, st = self.cfg, self.state
        ap = max(float(metrics.get("AP", 0.0)), 0.0)
        reduced = self.schedule.observe(ap)
        record = {
            "type": "eval",
            "split": "val",
            "epoch": st.epoch,
            "step": st.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        if ap < st.best_ap:
            st.patience += 1
        else:
            st.patience = 0
            st.best_ap = ap
            st.best_epoch = st.epoch
            self.save_best()
        record["best_ap"] = st.best_ap
        record["lr_reduced"] = reduced
        st.history.append(record)
        if self.log is not None:
            self.log.write(record)
        self._say(
            f"epoch {st.epoch}: val AP {ap:.4f} AP50 {max(metrics.get('AP50', 0.0), 0.0):.4f} (best {st.best_ap:.4f} "
            f"at epoch {st.best_epoch})" + (" — lr reduced" if reduced else "")
        )
        if cfg.early_stop_patience > 0 and st.patience >= cfg.early_stop_patience:
            st.stopped_early = True
            self._say(f"early stop: no improvement over {st.patience} evaluations")
            return True
        return False

    def _say(self, text: str) -> None:
        if self.dist.main and self.console is not None:
            self.console.print(text, highlight=False)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        cfg, st = self.cfg, self.state
        set_train_modes(self.module.model, self.module.plan, True)
        bar = progress_bar() if self.show_progress else None
        stack = contextlib.ExitStack()
        if bar is not None:
            stack.enter_context(bar)
            task = bar.add_task("train", total=self.total_steps, completed=min(st.step, self.total_steps), info="")
        try:
            if cfg.eval_before and self.evaluate_fn is not None and st.step == 0 and not st.history:
                metrics = self.validate()
                record = {
                    "type": "eval",
                    "split": "val",
                    "epoch": 0,
                    "step": 0,
                    "start": True,
                    **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                }
                st.history.append(record)
                if self.log is not None:
                    self.log.write(record)
                self._say(
                    f"start: val AP {max(metrics.get('AP', 0.0), 0.0):.4f} AP50 "
                    f"{max(metrics.get('AP50', 0.0), 0.0):.4f}"
                )
            while st.epoch < cfg.epochs and not st.stopped_early and not (cfg.max_steps and st.step >= cfg.max_steps):
                loader = make_train_loader(
                    self.dataset,
                    cfg.batch_size,
                    seed=cfg.seed,
                    epoch=st.epoch,
                    rank=self.dist.rank,
                    world=self.dist.world,
                    start=st.batch,
                    workers=cfg.workers,
                    size_divisibility=self.module.model.cfg.input.size_divisibility,
                )
                for batch in loader:
                    t0 = time.perf_counter()
                    out = self.train_step(batch)
                    st.batch += 1
                    out["time"] = time.perf_counter() - t0
                    lr = self.optimizer.param_groups[0]["lr"]
                    if self.log is not None:
                        self.log.write({"type": "step", "step": st.step, "epoch": st.epoch, "lr": lr, **out})
                    if bar is not None:
                        bar.update(
                            task,
                            completed=st.step,
                            info=f"ep {st.epoch + 1}/{cfg.epochs} loss {out['loss']:.4f} lr {lr:.2e}"
                            + (f" skipped {st.skipped}" if st.skipped else ""),
                        )
                    if out["skipped"]:
                        warnings.warn(
                            f"step {st.step}: non-finite loss or gradient, step skipped ({st.skipped} so far)",
                            stacklevel=2,
                        )
                    if cfg.checkpoint_every_steps and st.step % cfg.checkpoint_every_steps == 0:
                        self.save_checkpoint()
                    if self.stop_after_steps and st.step >= self.stop_after_steps:
                        self.save_checkpoint()
                        barrier(self.dist)
                        return TrainResult("stopped", st, None)
                    if cfg.max_steps and st.step >= cfg.max_steps:
                        break
                st.epoch += 1
                st.batch = 0
                last_epoch = st.epoch >= cfg.epochs or bool(cfg.max_steps and st.step >= cfg.max_steps)
                if self.evaluate_fn is not None and (st.epoch % cfg.eval_every_epochs == 0 or last_epoch):
                    self._after_validation(self.validate())  # may set stopped_early
                self.save_checkpoint()
                barrier(self.dist)
        finally:
            stack.close()
            if self.log is not None:
                self.log.close()
        if self.evaluate_fn is None:  # no validation: the final weights are the best
            st.best_epoch = st.epoch
            self.save_best()
        st.finished = True
        self.save_checkpoint()
        barrier(self.dist)
        return TrainResult("finished", st, self.ckpt_dir / "best.safetensors")


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (set, tuple)) else str(v)))
