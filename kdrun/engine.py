"""The training loop every stage uses, and evaluation.

One loop, readable top to bottom. What differs between stages (teacher with
CE, student with a KD method, baseline with CE) is the *objective*: a callable
``objective(model, batch, epoch) -> {term name: weighted loss tensor}`` whose
terms are summed and each logged in the per-epoch CSV.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kdrun.data.loader import Batch, TensorLoader
from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")

Objective = Callable[[nn.Module, Batch, int], dict[str, torch.Tensor]]


def cross_entropy(model: nn.Module, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
    """The plain supervised objective (teacher and baseline stages)."""
    return {"ce": F.cross_entropy(model(batch.x), batch.y)}


# ---------------------------------------------------------------- optimiser

def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    name = cfg.name
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=bool(cfg.nesterov) and cfg.momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise KdrunError(f"optim.name={name}: unknown optimiser; valid: adam, adamw, sgd")


def lr_factor(cfg, epoch: int, epochs: int) -> float:
    """Multiplier of the base LR at the start of ``epoch`` (0-based)."""
    warm = int(cfg.get("warmup_epochs", 0) or 0)
    if epoch < warm:
        return (epoch + 1) / warm
    sched = cfg.schedule
    if sched == "cosine":
        span = max(1, epochs - warm)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))
    if sched == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0  # "constant"


# ---------------------------------------------------------------- checkpoints

def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, fsync, rename: a crash leaves the old file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------- training

@dataclass
class StageResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int | None = None  # chosen on the validation split, if any
    best_val_top1: float | None = None
    seconds: float = 0.0
    images_per_s: float = 0.0


def train_stage(stage: str, model: nn.Module, objective: Objective, loader: TensorLoader, *,
                epochs: int, optim_cfg, extra_params: list | None = None,
                val_loader: TensorLoader | None = None, run_dir: str = ".", log_every: int = 50,
                on_epoch_start: Callable[[int], dict] | None = None) -> StageResult:
    """Train ``model`` for ``epochs`` with ``objective``; checkpoint each epoch; log a CSV row each epoch.

    ``extra_params``: other trainable parameters (a KD method's adapters).
    ``on_epoch_start(epoch)`` may update schedules and returns values to log.
    Writes ``{run_dir}/metrics_{stage}.csv`` and ``checkpoints/{stage}_last.pt``
    (plus ``{stage}_best.pt`` when a validation split chooses a best epoch).
    """
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    optimizer = build_optimizer(params, optim_cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    csv_path = os.path.join(run_dir, f"metrics_{stage}.csv")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    result = StageResult()
    rows_written = False
    t0, seen = time.perf_counter(), 0

    for epoch in range(epochs):
        lr = base_lrs[0] * lr_factor(optim_cfg, epoch, epochs)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * lr_factor(optim_cfg, epoch, epochs)
        logged = on_epoch_start(epoch) if on_epoch_start else {}
        model.train()
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.long)
        bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"{stage} {epoch + 1}/{epochs}",
                   leave=False, dynamic_ncols=True, mininterval=1.0)
        for step, batch in enumerate(bar):
            terms = objective(model, batch, epoch)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in terms.items():  # accumulate on device: no host sync per step
                sums[k] = sums.get(k, 0) + v.detach() * len(batch.y)
            seen += len(batch.y)
            if (step + 1) % log_every == 0:  # one sync every log_every steps
                value = float(loss.detach())
                _check_finite(value, stage, epoch, step)
                bar.set_postfix(loss=f"{value:.4f}")
        n = loader.num_samples if not loader.drop_last else len(loader) * loader.batch_size
        row = {"epoch": epoch + 1, "lr": lr, **logged}
        row.update({f"loss_{k}": float(v) / n for k, v in sums.items()})
        row["loss"] = sum(row[f"loss_{k}"] for k in sums)
        _check_finite(row["loss"], stage, epoch, len(loader) - 1)
        if val_loader is not None:
            row["val_top1"] = accuracy(predict(model, val_loader), val_loader.labels)[0]
        result.history.append(row)
        _append_csv(csv_path, row, header=not rows_written)
        rows_written = True
        state = {"stage": stage, "epoch": epoch + 1, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict()}
        atomic_save(state, os.path.join(ckpt_dir, f"{stage}_last.pt"))
        if val_loader is not None and (result.best_val_top1 is None or row["val_top1"] > result.best_val_top1):
            result.best_epoch, result.best_val_top1 = epoch + 1, row["val_top1"]
            atomic_save({"stage": stage, "epoch": epoch + 1, "model": model.state_dict()},
                        os.path.join(ckpt_dir, f"{stage}_best.pt"))
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        log.info("%s %s", stage, msg)

    result.seconds = time.perf_counter() - t0
    result.images_per_s = seen / result.seconds if result.seconds > 0 else 0.0
    return result


def _check_finite(value: float, stage: str, epoch: int, step: int) -> None:
    if not math.isfinite(value):
        raise KdrunError(f"{stage}: non-finite loss ({value}) at epoch {epoch + 1}, step {step + 1}; "
                         "the last good checkpoint is kept (lower optim.lr or check the data)")


def _append_csv(path: str, row: dict, header: bool) -> None:
    with open(path, "w" if header else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if header:
            w.writeheader()
        w.writerow(row)


# ---------------------------------------------------------------- evaluation

@torch.inference_mode()
def predict(model: nn.Module, loader: TensorLoader) -> torch.Tensor:
    """Logits of ``model`` over the loader's split, in order (float32, on CPU)."""
    was_training = model.training
    model.eval()
    out = [model(b.x).float().cpu() for b in loader.epoch(0)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Top-k accuracies in percent."""
    labels = labels.cpu()
    res = []
    for k in ks:
        k = min(k, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        res.append(100.0 * (topk == labels[:, None]).any(dim=1).float().mean().item())
    return res
