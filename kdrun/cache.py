"""The teacher's logit cache: run the teacher once, distil from the file.

``logits[i, v]`` are the teacher's logits (fp16) for training sample ``i``
under augmentation view ``v`` (``views=0``: one un-augmented view). The file
is a checksummed artifact of kind ``logits`` made for one key (teacher, data,
views; see :mod:`kdrun.io`): a truncated, damaged or foreign file is rebuilt
with a warning naming it, never used.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from kdrun import distributed, io
from kdrun.data.base import ImageSet
from kdrun.data.loader import Augment, Normalize
from kdrun.engine import autocast
from kdrun.preempt import EXIT_PREEMPTED, STOP, Preempted, maybe_kill

log = logging.getLogger("kdrun")
KIND = "logits"


@torch.inference_mode()
def build_logit_cache(
    teacher: nn.Module,
    data: ImageSet,
    normalize: Normalize,
    augment: Augment,
    views: int,
    batch_size: int,
    device,
    precision: str = "fp32",
) -> torch.Tensor:
    """Teacher logits [N, max(views, 1), C] in fp16, for every training image and view.

    Data parallel: worker r computes batches r, r + W, ... and the shares are summed.
    """
    teacher.eval()
    rank, world = distributed.world()
    n, nv = len(data), max(views, 1)
    num_classes = teacher(normalize(data.images[:1].to(device))).shape[1]
    out = torch.zeros(n, nv, num_classes, dtype=torch.float32 if world > 1 else torch.float16)
    jobs = [(v, start) for v in range(nv) for start in range(0, n, batch_size)]
    bar = tqdm(
        total=n * nv, desc="cache", unit="img", leave=False, dynamic_ncols=True, mininterval=1.0, disable=rank != 0
    )
    for batches, (v, start) in enumerate(jobs[rank::world], start=1):
        idx = torch.arange(start, min(start + batch_size, n))
        images = data.images[idx].to(device)
        if views > 0:
            images = augment(images, idx.to(device), torch.full_like(idx, v).to(device))
        with autocast(torch.device(device), precision):
            logits = teacher(normalize(images)).float().cpu()
        out[idx, v] = logits.half().to(out.dtype)  # rounded to fp16 on every path
        bar.update(len(idx) * world)
        maybe_kill("cache", batches)
        if STOP.requested is not None:  # SIGTERM/SIGINT: stop now; a resumed run builds the cache again
            bar.close()
            raise Preempted(
                f"cache: stopped by {STOP.requested} after {batches} of {len(jobs[rank::world])} batches; "
                f"rerun the same command to resume, the cache is rebuilt (exit code {EXIT_PREEMPTED})"
            )
    bar.close()
    if world > 1:
        # each entry was written by exactly one worker; summed on the device (NCCL reduces CUDA tensors only)
        out = distributed.all_sum(out.to(device)).half().cpu()
    return out


def save_logit_cache(logits: torch.Tensor, path: str, key: str) -> None:
    io.atomic_save({"logits": logits}, path, kind=KIND, key=key)


def load_logit_cache(path: str, key: str) -> torch.Tensor | None:
    """The cached logits if the file is sound and made for ``key``; None (with a warning naming it) otherwise."""
    if not os.path.exists(path):
        return None
    try:
        return io.load(path, KIND, key)["logits"]
    except io.DamagedArtifact as e:
        log.warning("logit cache %s; rebuilding it", e)
        return None


def cached_teacher_logits(path: str, key: str, build) -> tuple[torch.Tensor, dict]:
    """Load the cache at ``path`` or build it with ``build()`` and save it; returns (logits, info)."""
    logits = load_logit_cache(path, key)
    if logits is not None:
        log.info("cache: reusing %s", path)
        return logits, {"reused": True, "seconds": 0.0, "size_mb": os.path.getsize(path) / 2**20}
    t0 = time.perf_counter()
    logits = build()
    save_logit_cache(logits, path, key)
    secs = time.perf_counter() - t0
    size = os.path.getsize(path) / 2**20 if os.path.exists(path) else 0.0  # other workers do not write
    log.info(
        "cache: built %s in %.1fs (%.2f MB, %d images x %d views)", path, secs, size, logits.shape[0], logits.shape[1]
    )
    return logits, {"reused": False, "seconds": secs, "size_mb": size}
