"""The training loop every stage uses.

The engine's other parts have their own modules: the optimiser and per-step LR schedule
(:mod:`kdrun.optim`), checkpoint I/O (:mod:`kdrun.io`), evaluation (:mod:`kdrun.evaluation`), data
parallelism (:mod:`kdrun.distributed`).

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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kdrun import distributed
from kdrun.data.base import layout_matches
from kdrun.data.loader import Batch, TensorLoader
from kdrun.data.stream import StreamLoader
from kdrun.errors import KdrunError, ResumeRefused
from kdrun.evaluation import accuracy, predict
from kdrun.io import atomic_save, load_checkpoint, rng_state, set_rng_state
from kdrun.losses.base import sum_terms
from kdrun.optim import build_optimizer, build_scheduler
from kdrun.preempt import EXIT_PREEMPTED, STOP, Preempted, maybe_kill
from kdrun.progress import progress

log = logging.getLogger("kdrun")

Objective = Callable[[nn.Module, Batch, int], dict[str, torch.Tensor]]


def workers_changed(then: int, now: int) -> str:
    """Why a stage checkpoint of ``then`` workers is not resumed by ``now``: its teacher's store key, its batch
    statistics and the logit cache's shares depend on the count."""
    return (
        f"trained by {then} worker{'s' * (then != 1)}, resumed by {now}; resume it with {then} (torchrun "
        "--nproc-per-node, trainer.devices or SLURM tasks), or give a new hydra.run.dir to start over"
    )


def cross_entropy(model: nn.Module, batch: Batch, epoch: int, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """The plain supervised objective (teacher and baseline stages); ``label_smoothing`` as in torch's CE."""
    return {"ce": F.cross_entropy(model(batch.x), batch.y, label_smoothing=label_smoothing)}


def autocast(device: torch.device, precision: str):
    """Mixed precision for forward passes: fp32 (off), bf16 or fp16."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------- training


@dataclass
class StageResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int | None = None  # chosen on the validation split, if any
    best_val_top1: float | None = None
    seconds: float = 0.0
    images_per_s: float = 0.0
    resumed_from: str | None = None  # "epoch E step S" when the stage continued a checkpoint
    earlier_seconds: float = 0.0  # of ``seconds``, those spent by earlier processes (recorded in the checkpoint)
    ema: nn.Module | None = None  # the EMA of the model's weights (trainer.ema), else None


# Steps between two checks, by every data-parallel worker together, of whether a stop (SIGTERM, SIGINT) was
# requested: each check is one collective and, on GPUs, a host sync that drains the queue of launched kernels,
# so not every step; a worker alone checks its own flag at every step, which costs nothing.
STOP_POLL_STEPS = 10


def train_stage(
    stage: str,
    model: nn.Module,
    objective: Objective,
    loader: TensorLoader | StreamLoader,
    *,
    epochs: int,
    optim_cfg,
    trainable: nn.Module | None = None,
    val_loader: TensorLoader | StreamLoader | None = None,
    run_dir: str = ".",
    log_every: int = 50,
    checkpoint_every_steps: int = 0,
    fingerprint: str = "",
    also_resumes: tuple[str, ...] = (),
    data_layout: str | None = None,
    on_step: Callable[[int, int], dict] | None = None,
    precision: str = "fp32",
    compile: bool = False,
    sync_bn: bool = False,
    ema: float | None = None,
    logger=None,
    find_unused: bool = False,
    lr_key: str = "optim.lr",
) -> StageResult:
    """Train ``model`` for ``epochs`` with ``objective``; resumable at any epoch or checkpointed step.

    ``trainable``: the stage's one trainable module (default ``model``), e.g. the student plus a KD
    method's adapters (:class:`kdrun.distill.StudentStep`); it is what the optimiser steps, what the
    checkpoints hold, what DDP wraps when there are several workers (``sync_bn``: SyncBatchNorm) and
    what ``compile`` compiles; ``objective(net, batch, epoch)`` receives it so wrapped. ``model`` is
    the network evaluated on ``val_loader`` (and averaged with ``ema``).
    ``on_step(epoch, step)`` updates schedules before a step and returns the
    values in effect (logged in the CSV row of the epoch). The learning rate follows
    ``optim_cfg`` per optimiser step (:func:`kdrun.optim.build_scheduler`); ``optim_cfg.grad_clip``
    > 0 clips the gradients' global norm (after unscaling, with fp16). ``ema``: a decay in (0, 1)
    keeps an exponential moving average of ``model``'s weights and buffers
    (``torch.optim.swa_utils.AveragedModel``), validated each epoch and returned in ``result.ema``.
    Writes ``{run_dir}/metrics_{stage}.csv`` and ``checkpoints/{stage}_last.pt`` (every
    epoch, and every ``checkpoint_every_steps`` steps) holding the whole state:
    weights, optimiser, LR scheduler, EMA, epoch and step, RNG states, partial sums and history;
    plus ``{stage}_best.pt`` when a validation split chooses a best epoch. When
    ``{stage}_last.pt`` exists the stage continues from it (or returns at once
    when it is finished); ``fingerprint`` guards against resuming another config (``also_resumes``: earlier
    keys of the same config, which a checkpoint of an older kdrun holds), ``data_layout``
    (:meth:`kdrun.data.base.DataBundle.layout`) against resuming on other data.
    ``precision``: fp32, or bf16/fp16 autocast (fp16 with a gradient scaler).
    ``logger``: experiment trackers (:class:`kdrun.loggers.Loggers`) fed every ``log_every`` steps
    and every epoch. ``find_unused``: some of ``trainable``'s parameters get no gradient (DDP must look for them).
    ``lr_key``: the config key of the stage's learning rate, named when the loss turns non-finite.
    """
    trainable = model if trainable is None else trainable
    net = distributed.wrap(trainable, loader.device, sync_bn, find_unused)  # DDP with several workers
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, epochs, len(loader))
    clip = float(optim_cfg.get("grad_clip") or 0)
    scaler = torch.amp.GradScaler(loader.device.type, enabled=precision == "fp16")
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True) if ema else None
    if averaged is not None:  # the copy took the stage's feature taps (Distill's hooks); it runs plain forwards
        for m in averaged.module.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
    net = torch.compile(net) if compile else net  # type: ignore[assignment]  # a module still, to call
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    csv_path = os.path.join(run_dir, f"metrics_{stage}.csv")
    last_path = os.path.join(ckpt_dir, f"{stage}_last.pt")
    # a new best epoch's weights go to best_next first and become best_path once last_path records that epoch:
    # a crash between the two writes leaves no best_path whose epoch disagrees with the checkpoint's
    best_path = os.path.join(ckpt_dir, f"{stage}_best.pt")
    best_next = best_path + ".next"
    result = StageResult()
    start_epoch, start_step, sums, seen, elapsed, lr = 0, 0, {}, 0, 0.0, None
    resumed_logged: dict = {}

    ckpt = load_checkpoint(last_path)
    if ckpt is not None:
        if ckpt.get("fingerprint") not in (fingerprint, *also_resumes) or ckpt.get("epochs") != epochs:
            raise ResumeRefused(
                f"{last_path}: made by a different configuration of stage '{stage}' (or by a kdrun that trained "
                "it differently); use a new hydra.run.dir (or delete the checkpoint) to start over"
            )
        if (workers := ckpt.get("workers", distributed.size())) != distributed.size():
            raise ResumeRefused(f"{last_path}: {workers_changed(workers, distributed.size())}")
        if data_layout is not None and not layout_matches(ckpt.get("data_layout", data_layout), data_layout):
            raise ResumeRefused(
                f"{last_path}: trained on other data than the dataset holds now (images added, removed, changed or "
                "moved to another class since); give a new hydra.run.dir to train on the data as it is"
            )
        try:
            trainable.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. made by a kdrun whose stage trained other parameters
            raise KdrunError(
                f"{last_path}: does not fit stage '{stage}' as this kdrun builds it ({type(e).__name__}; made by "
                "another version?); use a new hydra.run.dir (or delete the checkpoint) to start the stage over"
            ) from None
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt.get("scaler", {}))
        if averaged is not None:
            averaged.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        start_epoch, start_step, seen, elapsed = ckpt["epoch"], ckpt["step"], ckpt["seen"], ckpt["seconds"]
        result.earlier_seconds = elapsed
        lr = ckpt.get("epoch_lr")  # the LR at the first step of the interrupted epoch (its CSV row)
        resumed_logged = ckpt.get("epoch_logged") or {}
        # the epoch's partial loss sums of every worker, summed when saved: rank 0 holds them, the others start at 0
        sums = {
            k: (v if distributed.is_main() else torch.zeros_like(v)).to(loader.device) for k, v in ckpt["sums"].items()
        }
        result.history = ckpt["history"]
        result.best_epoch, result.best_val_top1 = ckpt["best"]
        _settle_best(best_next, best_path, result.best_epoch)
        result.resumed_from = f"epoch {start_epoch + 1} step {start_step}"
        _rewrite_csv(csv_path, result.history)
        if start_epoch >= epochs:
            log.info("%s: already finished (%s); not retrained", stage, last_path)
        else:
            log.info("%s: resuming from %s at epoch %d, step %d", stage, last_path, start_epoch + 1, start_step)

    def save(epoch: int, step: int) -> None:  # on every worker at once (the sums' collective)
        summed = {k: distributed.all_sum(sums[k].detach().clone()).cpu() for k in sorted(sums)}
        atomic_save(
            {
                "stage": stage,
                "fingerprint": fingerprint,
                "workers": distributed.size(),
                "data_layout": data_layout,
                "epochs": epochs,
                "epoch": epoch,
                "step": step,
                "model": trainable.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch_lr": lr,
                "epoch_logged": logged,
                "scaler": scaler.state_dict(),
                "ema": averaged.state_dict() if averaged is not None else None,
                "rng": rng_state(),
                "seen": seen,
                "sums": summed,
                "history": result.history,
                "best": (result.best_epoch, result.best_val_top1),
                "seconds": elapsed + time.perf_counter() - t0,
            },
            last_path,
        )

    kill = maybe_kill if os.environ.get("KDRUN_KILL_AT") else None  # testing hook: read once, not per step
    t0 = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        trainable.train()
        first = start_step if epoch == start_epoch else 0
        # the scheduled values in effect (their CSV columns); a resumed epoch starts from those it had reached
        logged: dict = dict(resumed_logged) if epoch == start_epoch and first > 0 else {}
        if first == 0 or lr is None:
            lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step (it changes every step)
        bar = progress(
            loader.epoch(epoch, first),
            total=len(loader),
            initial=first,
            desc=f"{stage} {epoch + 1}/{epochs}",
            unit="steps",
            disable=not distributed.is_main(),
        )
        for step, batch in enumerate(bar, start=first):
            if on_step is not None:
                logged = on_step(epoch, step)
            with autocast(loader.device, precision):
                terms = objective(net, batch, epoch)
            loss = sum_terms(terms.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # DDP: gradients all-reduced in buckets while backward runs
            if clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            step_lr = optimizer.param_groups[0]["lr"]  # the rate this step takes (the scheduler sets the next one's)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            constrain = getattr(model, "apply_constraints", None)  # e.g. max-norm (Hinton's MNIST MLP)
            if callable(constrain):
                constrain()
            if averaged is not None:
                averaged.update_parameters(model)
            for k, v in terms.items():  # accumulate on the device: no host sync per step
                sums[k] = sums.get(k, 0) + v.detach() * len(batch.y)
            seen += len(batch.y) * distributed.size()
            global_step = epoch * len(loader) + step + 1
            if kill is not None:
                kill(stage, global_step)
            if global_step % log_every == 0:  # one host sync every log_every steps of the stage, across epochs
                value = float(distributed.all_sum(loss.detach().clone())) / distributed.size()
                _check_finite(value, stage, epoch, step, lr_key)
                bar.set_postfix(loss=f"{value:.4f}")
                if logger:
                    logger.log_step(
                        stage,
                        global_step,
                        terms,
                        loss=value,
                        lr=step_lr,
                        **logged,
                    )
            stop = STOP.requested is not None
            every = checkpoint_every_steps
            checkpoint = every > 0 and (step + 1) % every == 0 and step + 1 < len(loader)  # not the epoch's last
            if distributed.size() > 1:  # every worker stops after the same step, or DDP's next all-reduce hangs;
                # a worker's deferred error (distributed.defer) is raised by all here, and never checkpointed
                polled = global_step % STOP_POLL_STEPS == 0 or checkpoint
                stop = polled and distributed.agree(stop, loader.device)
            if stop or checkpoint:
                _check_finite(float(sum(sums.values())), stage, epoch, step, lr_key)  # never checkpoint a NaN
                save(epoch, step + 1)
                if stop:
                    who = STOP.requested or "another worker"
                    raise Preempted(
                        f"{stage}: stopped by {who} at epoch {epoch + 1}, step {step + 1}; checkpoint "
                        f"saved (exit code {EXIT_PREEMPTED})"
                    )
        bar.close()
        distributed.agree(False, loader.device)  # a deferred error ends every worker before the epoch's checkpoint
        n = loader.num_samples if not loader.drop_last else len(loader) * loader.batch_size
        row = {"epoch": epoch + 1, "lr": lr, **logged}
        row.update({f"loss_{k}": float(distributed.all_sum(v)) / n for k, v in sums.items()})
        row["loss"] = sum(row[f"loss_{k}"] for k in sums)
        _check_finite(row["loss"], stage, epoch, len(loader) - 1, lr_key)
        sums = {}
        if val_loader is not None:
            row["val_top1"] = accuracy(predict(model, val_loader), val_loader.labels)[0]
            if averaged is not None:
                row["val_top1_ema"] = accuracy(predict(averaged.module, val_loader), val_loader.labels)[0]
            if result.best_val_top1 is None or row["val_top1"] > result.best_val_top1:
                result.best_epoch, result.best_val_top1 = epoch + 1, row["val_top1"]
                atomic_save({"stage": stage, "epoch": epoch + 1, "model": model.state_dict()}, best_next)
        result.history.append(row)
        _append_csv(csv_path, row, header=len(result.history) == 1)
        if logger:
            logger.log_epoch(stage, epoch + 1, row)
        save(epoch + 1, 0)
        if distributed.is_main() and os.path.exists(best_next):  # the checkpoint now records this best epoch
            os.replace(best_next, best_path)
        log.info(
            "%s %s", stage, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )

    result.seconds = elapsed + time.perf_counter() - t0
    result.images_per_s = seen / result.seconds if result.seconds > 0 else 0.0
    result.ema = averaged.module if averaged is not None else None
    # each worker has kept BatchNorm statistics of its own shards; the stage's model is rank 0's (saved, scored,
    # stored), so every worker goes on with it: a teacher filling its share of the logit cache among them
    distributed.broadcast_buffers(trainable)
    if averaged is not None:
        distributed.broadcast_buffers(averaged)
    return result


def _settle_best(best_next: str, best_path: str, best_epoch: int | None) -> None:
    """Promote the pending best weights to ``best_path`` when the stage's checkpoint chose their epoch; drop them
    when it did not (the process died before that checkpoint, and the epoch is being trained again)."""
    if not distributed.is_main() or not os.path.exists(best_next):
        return
    pending = load_checkpoint(best_next)
    if pending is not None and pending.get("epoch") == best_epoch:
        os.replace(best_next, best_path)
    else:
        os.remove(best_next)


def _check_finite(value: float, stage: str, epoch: int, step: int, lr_key: str = "optim.lr") -> None:
    if not math.isfinite(value):
        raise KdrunError(
            f"{stage}: non-finite loss ({value}) at epoch {epoch + 1}, step {step + 1}; "
            f"the last good checkpoint is kept (lower {lr_key}, set optim.grad_clip, or check the data)"
        )


def _rewrite_csv(path: str, history: list[dict]) -> None:
    if not distributed.is_main():
        return
    if os.path.exists(path):
        os.remove(path)
    for i, row in enumerate(history):
        _append_csv(path, row, header=i == 0)


def _append_csv(path: str, row: dict, header: bool) -> None:
    if not distributed.is_main():
        return
    fields = list(row)
    if not header and os.path.exists(path):  # the file's own columns: a row never lands under another's header
        with open(path, newline="") as f:
            fields = next(csv.reader(f), []) or fields
    with open(path, "w" if header else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if header:
            w.writeheader()
        w.writerow(row)
