"""Model figures: parameters, forward FLOPs, size on disk, latency, feature shapes.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (one
multiply-add = 2 FLOPs, convolutions and matmuls; no extra dependency).
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kdrun.models.features import FeatureTap


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _probe(model: nn.Module, input_shape: tuple, batch: int = 1, device=None) -> torch.Tensor:
    """A random input batch on the model's device, in the memory format of its convolution weights.

    A model trained with ``trainer.channels_last`` keeps its weights channels_last; fed NCHW images, every
    convolution would convert layouts, and latency would time those copies instead of the model."""
    p = next(model.parameters(), None)
    device = device or (p.device if p is not None else "cpu")
    x = torch.randn(batch, *input_shape, device=device)
    cl = torch.channels_last
    # the first 4-D weight whose layout is unambiguous (a 1x1 or depthwise kernel can be contiguous in both)
    conv = next(
        (q for q in model.parameters() if q.dim() == 4 and q.is_contiguous() != q.is_contiguous(memory_format=cl)), None
    )
    if x.dim() == 4 and conv is not None and conv.is_contiguous(memory_format=cl):
        x = x.contiguous(memory_format=cl)
    return x


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple) -> int:
    """Forward FLOPs for one image of ``input_shape`` (C, H, W). Attention runs in its math form while counted:
    the counter has no formula for the fused CPU kernels of ``scaled_dot_product_attention`` (a ViT's
    attention would count 0)."""
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(_probe(model, input_shape))
    model.train(was)
    return int(counter.get_total_flops())


def size_on_disk_mb(model: nn.Module) -> float:
    """Size of the serialised ``state_dict`` in MB (10^6 bytes)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1e6


class Timing(NamedTuple):
    """Wall time of one forward pass in milliseconds: the ``median`` call (the typical cost, other processes'
    share of the cores included) and the ``best`` call (what the hardware does when nothing else runs:
    timeit's advice for a shared machine); and ``queued``, the share of this process's runnable time spent
    waiting for a core while timing (Linux schedstat; None elsewhere)."""

    median: float
    best: float
    queued: float | None = None

    @property
    def spread(self) -> float:
        """``median / best``: near 1 when every call took the same time."""
        return self.median / self.best if self.best > 0 else 1.0


# When the timing was disturbed (other processes took the cores), measured with kdrun train's default models
# (resnet20 and mbv2_tiny on digits, cpu_latency's protocol at batch 1 and 32, torch on both cores of a 2-core
# machine). Idle cores, 12 repeats: medians at most 1.25x the best, at most 0.8% of runnable time queued.
# Three `while True: pass` processes alongside, 6 repeats: largest spread 6.4-11.6x, 56-60% queued (median
# speed-up at batch 32 10-19x; best 2.2-2.5x, idle 2.1-2.3x). One such process: 2.5-9.2x, 40-50% queued.
# Two other torch processes (two threads each): every call ~600x slower, yet spreads of 1.03-1.07 in three
# repeats out of four (the best is slow too), 61-64% queued: the queue share catches what the spread cannot.
# Inside a whole `kdrun train` on idle cores the spread runs higher than in a bare timing script (1.5-2.1x in 4
# runs, 0-1% queued), so the spread alone needs a larger margin; on a VM it is the only sign of a neighbour
# taking the host's cores (steal time is not queueing here).
BUSY_SPREAD = 3.0  # a median above this many times its best call
BUSY_QUEUED = 0.1  # or more than this share of runnable time spent waiting for a core


class Contention(NamedTuple):
    """How disturbed a set of timings was: the largest ``spread`` (median / best) and ``queued`` share."""

    spread: float
    queued: float | None

    @classmethod
    def of(cls, timings: Iterable[Timing]) -> Contention:
        timings = list(timings)
        queued = [t.queued for t in timings if t.queued is not None]
        return cls(max((t.spread for t in timings), default=1.0), max(queued) if queued else None)

    @property
    def busy(self) -> bool:
        return self.spread > BUSY_SPREAD or (self.queued is not None and self.queued > BUSY_QUEUED)

    def note(self) -> str:
        """The warning to print where :attr:`busy`: ``"timed on busy cores: medians up to 9.8x the best, 59% of
        run time waiting for a core"``."""
        note = f"timed on busy cores: medians up to {self.spread:.1f}x the best"
        if self.queued is not None:
            note += f", {100 * self.queued:.0f}% of run time waiting for a core"
        return note


def cpu_load() -> tuple[float | None, int]:
    """(1-minute load average or None where the system has none, CPUs this process may run on): the context of
    a CPU timing. The load average lags by a minute and counts this process's own recent work;
    :class:`Contention` is the verdict."""
    from kdrun.distributed import usable_cores

    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return load, usable_cores()


def load_text(load: float | None, cpus: int) -> str:
    return f"load {load:.1f} on {cpus} CPUs" if load is not None else f"{cpus} CPUs"


def _sched_ns() -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) summed over this process's threads, from
    ``/proc/self/task/*/schedstat``; None where the kernel does not expose it."""
    run = wait = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                on_cpu, waited = f.read().split()[:2]
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
        run, wait = run + int(on_cpu), wait + int(waited)
    return run, wait


def latency_ms(model: nn.Module, input_shape: tuple, batch: int = 1, device="cpu", **timing: Any) -> Timing:
    """Median and best wall time of one forward pass in milliseconds (eval mode, after warm-up); ``timing``: as
    for :func:`latencies_ms` (one round of at least 0.3 s unless given)."""
    timing = {"min_time": 0.3, "max_iters": 200} | timing
    return latencies_ms({"model": model}, input_shape, batch, device, rounds=1, **timing)["model"]


@torch.inference_mode()
def latencies_ms(
    models: Mapping[str, nn.Module],
    input_shape: tuple,
    batch: int = 1,
    device="cpu",
    warmup: int = 3,
    min_time: float = 0.1,
    max_iters: int = 100,
    rounds: int = 5,
    min_iters: int = 5,
) -> dict[str, Timing]:
    """Median and best forward time (ms) of each model, timed in ``rounds`` alternating rounds of ``min_time`` s
    (and at least ``min_iters`` passes) each.

    Models compared with each other (teacher and student) are timed turn by turn rather than one after the
    other, so a burst of load from another process falls on each of them alike and their ratio stays fair."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    was = {name: m.training for name, m in models.items()}
    probes = {}
    for name, m in models.items():
        m.eval()
        probes[name] = _probe(m, input_shape, batch, device)
        for _ in range(warmup):
            m(probes[name])
    sync()
    times: dict[str, list[float]] = {name: [] for name in models}
    sched: dict[str, list[int]] = {name: [0, 0] for name in models}  # ns run, ns waited while timing each model
    for _ in range(rounds):
        for name, m in models.items():
            x, own = probes[name], times[name]
            before = _sched_ns()
            n, start = len(own), time.perf_counter()
            while len(own) - n < max_iters and (time.perf_counter() - start < min_time or len(own) - n < min_iters):
                t0 = time.perf_counter()
                m(x)
                sync()
                own.append(time.perf_counter() - t0)
            after = _sched_ns()
            if before is not None and after is not None:
                sched[name][0] += after[0] - before[0]
                sched[name][1] += after[1] - before[1]
    for name, m in models.items():
        m.train(was[name])
    out = {}
    for name, t in times.items():
        run, wait = sched[name]
        queued = wait / (run + wait) if run + wait > 0 else None
        out[name] = Timing(1000.0 * statistics.median(t), 1000.0 * min(t), queued)
    return out


@torch.no_grad()
def feature_shapes(model: nn.Module, input_shape: tuple, names: list[str] | None = None) -> dict[str, list[int]]:
    """Shape (batch 1) of every named feature point, from one forward pass."""
    names = list(names if names is not None else getattr(model, "feature_points", {}))
    was = model.training
    model.eval()
    with FeatureTap(model, [n for n in names if n != "logits"]) as tap:
        logits = model(_probe(model, input_shape))
    model.train(was)
    feats = dict(tap.features)
    if "logits" in names:
        feats["logits"] = logits
    return {n: list(feats[n].shape) for n in names}
