"""Model figures: parameters, forward FLOPs, size on disk, latency, feature shapes.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (one
multiply-add = 2 FLOPs, convolutions and matmuls; no extra dependency).
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
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
    """Forward FLOPs for one image of ``input_shape`` (C, H, W)."""
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(_probe(model, input_shape))
    model.train(was)
    return int(counter.get_total_flops())


def size_on_disk_mb(model: nn.Module) -> float:
    """Size of the serialised ``state_dict`` in MB (10^6 bytes)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1e6


def latency_ms(model: nn.Module, input_shape: tuple, batch: int = 1, device="cpu", **timing: Any) -> float:
    """Median wall time of one forward pass in milliseconds (eval mode, after warm-up); ``timing``: as for
    :func:`latencies_ms` (one round of at least 0.3 s unless given)."""
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
) -> dict[str, float]:
    """Median forward time (ms) of each model, timed in ``rounds`` alternating rounds of ``min_time`` s (and at
    least ``min_iters`` passes) each.

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
    for _ in range(rounds):
        for name, m in models.items():
            x, own = probes[name], times[name]
            n, start = len(own), time.perf_counter()
            while len(own) - n < max_iters and (time.perf_counter() - start < min_time or len(own) - n < min_iters):
                t0 = time.perf_counter()
                m(x)
                sync()
                own.append(time.perf_counter() - t0)
    for name, m in models.items():
        m.train(was[name])
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


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
