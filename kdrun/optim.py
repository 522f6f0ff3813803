"""Optimiser and per-step learning-rate schedule of a stage, from ``optim.*`` (torch's own classes).

``optim.schedule`` (per optimiser step, after ``optim.warmup_epochs`` of linear warm-up):

* ``cosine``: ``torch.optim.lr_scheduler.CosineAnnealingLR`` from the base LR to 0 over the steps after warm-up;
* ``step``: ``MultiStepLR``, x ``optim.gamma`` at each of ``optim.milestones`` (epochs, converted to steps:
  the recipes' epoch boundaries);
* ``constant``: ``ConstantLR`` with factor 1.

Warm-up is ``LinearLR``: step k of the first W = warmup_epochs x steps_per_epoch steps runs at
base x (k + 1) / W; the schedules are chained with ``SequentialLR``. Closed forms, for step k of T:

    cosine: base * 0.5 * (1 + cos(pi * (k - W) / (T - W)))
    step:   base * gamma ** #{m : m * steps_per_epoch <= k}
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from kdrun.errors import KdrunError

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw", "adam")


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    name = cfg.name
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=bool(cfg.nesterov) and cfg.momentum > 0,
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise KdrunError(f"optim.name={name}: unknown optimiser; valid: {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg, epochs: int, steps_per_epoch: int
) -> lr_scheduler.LRScheduler:
    """The LR schedule of a stage of ``epochs`` x ``steps_per_epoch`` optimiser steps; ``.step()`` after each."""
    total = max(1, epochs * steps_per_epoch)
    warm = min(int(cfg.get("warmup_epochs", 0) or 0) * steps_per_epoch, total)
    if warm == 1:  # a one-step warm-up runs at the full LR: no warm-up (the schedule below starts at step 0)
        warm = 0
    name = cfg.get("schedule", "constant")
    main: lr_scheduler.LRScheduler
    if name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warm))
    elif name == "step":
        milestones = sorted(max(0, int(m) * steps_per_epoch - warm) for m in cfg.get("milestones") or [])
        main = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=float(cfg.gamma))
    elif name == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise KdrunError(f"optim.schedule={name}: unknown schedule; valid: {', '.join(SCHEDULES)}")
    if not warm:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm - 1)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warm])
