"""Resident memory of reading an ImageNet-sized logit cache at random, by batch.

    python scripts/bench_cache_memory.py [--samples 1281167] [--classes 1000] [--views 1] [--topk K]
                                         [--batch 256] [--steps 2000] [--dir DIR] [--keep] [--threads 1]

Writes a synthetic cache (``kdrun.cache.LogitCache``: every row filled, fp16 or top-k) of
``samples`` x ``views`` rows in ``--dir`` (default: a temporary folder under $KDRUN_DEV_CACHE or
~/.cache/kdrun-dev, outside the repository), then reads ``--steps`` random batches of ``--batch``
(sample, view) pairs as the student stage does, checking every row, and prints the file size, the
write and read rates and the process's resident memory (VmRSS) before and at its peak during the
reads. For comparison it repeats the reads through a plain ``numpy.memmap`` of the same rows (what
the cache avoids: every page fault maps up to 64 KiB of the file into the process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from kdrun.cache import CacheShape, LogitCache

DEV_CACHE = os.environ.get("KDRUN_DEV_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kdrun-dev"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def row_value(pos: torch.Tensor) -> torch.Tensor:
    """The synthetic logit 0 of row ``pos``, in [1, 1024] (exact in fp16, the row's largest, so top-k keeps it):
    a check that every read returns its own row."""
    return (pos % 1024 + 1).float()


def fill(cache: LogitCache, chunk: int = 20_000) -> float:
    t0 = time.perf_counter()
    s = cache.shape
    for start in range(0, s.rows, chunk):
        pos = torch.arange(start, min(start + chunk, s.rows))
        logits = torch.zeros(len(pos), s.classes)
        logits[:, 0] = row_value(pos)
        cache.write(pos % s.samples, pos // s.samples, logits)
    cache.flush()
    return time.perf_counter() - t0


def read(cache: LogitCache, batch: int, steps: int, seed: int = 0) -> tuple[float, float, float]:
    """(rows/s, RSS before, peak RSS increase) over ``steps`` random batches."""
    s = cache.shape
    g = torch.Generator().manual_seed(seed)
    cache.lookup(torch.arange(batch), torch.zeros(batch, dtype=torch.long))  # first-call allocations
    before, peak = rss_mb(), 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, s.samples, (batch,), generator=g)
        view = torch.randint(0, max(s.views, 1), (batch,), generator=g)
        logits, have = cache.lookup(idx, view)
        assert bool(have.all()) and torch.equal(logits[:, 0], row_value(view * s.samples + idx))
        peak = max(peak, rss_mb() - before)
    return steps * batch / (time.perf_counter() - t0), before, peak


def read_mmap(cache: LogitCache, batch: int, steps: int, seed: int = 0) -> tuple[float, float]:
    """The same reads through one numpy.memmap of the rows: (rows/s, peak RSS increase)."""
    s = cache.shape
    rows = np.memmap(cache.path, np.uint8, "r", s.data_offset, (s.rows, s.row_bytes))
    g = torch.Generator().manual_seed(seed)
    before, peak = rss_mb(), 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        pos = torch.randint(0, s.rows, (batch,), generator=g).numpy()
        np.asarray(rows[pos]).sum()
        peak = max(peak, rss_mb() - before)
    del rows
    return steps * batch / (time.perf_counter() - t0), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_281_167)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--dir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the cache file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (reads are host-side work)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(DEV_CACHE, exist_ok=True)
    folder = a.dir or tempfile.mkdtemp(prefix="bench-cache-", dir=DEV_CACHE)
    shape = CacheShape(a.samples, a.views, a.classes, a.topk)
    path = os.path.join(folder, "logits.kdlc")
    try:
        start_rss = rss_mb()
        cache = LogitCache.open(path, shape, "bench")
        secs = fill(cache)
        size = os.path.getsize(path) / 2**20
        cache.close()
        cache = LogitCache.open(path, shape, "bench")
        rate, before, peak = read(cache, a.batch, a.steps)
        mrate, mpeak = read_mmap(cache, a.batch, a.steps)
        flags_mb = shape.rows / 2**20
        print(
            f"cache      {shape.samples} samples x {max(shape.views, 1)} views x {shape.classes} classes, "
            f"{'top ' + str(shape.topk) if shape.topk else 'full fp16'} rows of {shape.row_bytes} B"
        )
        print(f"file       {size:,.1f} MiB  (flags {flags_mb:.1f} MiB)")
        print(f"write      {shape.rows / secs:,.0f} rows/s ({secs:.1f} s)")
        print(
            f"read       {rate:,.0f} rows/s, batches of {a.batch}, {a.steps} batches "
            f"({a.steps * a.batch / shape.rows:.0%} of the rows)"
        )
        print(
            f"RSS        {start_rss:,.0f} MiB at start, {before:,.0f} MiB before the reads, "
            f"peak increase during the reads {peak:,.1f} MiB"
        )
        print(f"memmap     {mrate:,.0f} rows/s, peak RSS increase {mpeak:,.1f} MiB (same reads through one map)")
    finally:
        if not a.keep and not a.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
