"""What a distillation step costs with the logit cache warm, partly filled, empty, and with the teacher online.

    python scripts/bench_cached_step.py [--root DIR] [--subset 6400] [--steps 30] [--warmup 5] [--batch 128]
        [--teacher resnet20] [--student resnet8] [--channels-last] [--threads 2]

Each figure is images/s of kdrun's own ``train_stage`` (``--steps`` steps of ``--batch`` images, the first ``--warmup``
untimed) on a seeded subset of the CIFAR-10 JPEG folder (default ``$KDRUN_DEV_CACHE/cifar10-jpg``): the student
with CE alone; distilled from a cache of 8 views whose rows are all filled, 15 % missing, all missing (every
step runs the teacher on its misses and writes them); distilled with the teacher online; and the teacher's
forward pass alone at the batch size and at 15 % of it (a 15 %-miss step's teacher batch). fp32, CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference_kd as ref  # noqa: E402
from bench_speed import timed_stage  # noqa: E402

from kdrun.cache import CacheShape, LogitCache, fill_pass  # noqa: E402
from kdrun.data import DATASETS  # noqa: E402
from kdrun.data.loader import Augment, Normalize, TensorLoader  # noqa: E402
from kdrun.distill import Distill  # noqa: E402
from kdrun.engine import cross_entropy  # noqa: E402
from kdrun.losses.kd import KD  # noqa: E402

DEV_CACHE = os.environ.get("KDRUN_DEV_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kdrun-dev"))
VIEWS = 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(DEV_CACHE, "cifar10-jpg"))
    p.add_argument("--subset", type=int, default=6400)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if not os.path.isdir(a.root):
        sys.exit(f"--root {a.root}: not a folder (python scripts/prepare_shared_data.py makes it)")
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    data = DATASETS.get("imagefolder")(root=a.root, image_size=32)
    train = data.train.subset(ref.subset_indices(len(data.train), a.subset, 0))
    norm, augment = Normalize(ref.MEAN, ref.STD, 3, "cpu"), Augment(4, True, 0)

    def model(name: str) -> torch.nn.Module:
        m = ref.cifar_model(name, cpu, data.num_classes)
        return m.to(memory_format=torch.channels_last) if a.channels_last else m

    def fit(net, objective, views, trainable=None) -> float:
        loader = TensorLoader(train, a.batch, norm, augment, shuffle=True, seed=0, views=views, drop_last=True)
        with tempfile.TemporaryDirectory() as run_dir:
            return timed_stage("s", net, objective, loader, a.steps, a.warmup, 0.05, run_dir, trainable)

    teacher = model(a.teacher).eval().requires_grad_(False)
    rows = {"CE alone": fit(model(a.student), cross_entropy, None)}
    for missing in (0.0, 0.15, 1.0):
        with tempfile.TemporaryDirectory() as d:
            cache = LogitCache.open(os.path.join(d, "c.kdlc"), CacheShape(len(train), VIEWS, data.num_classes), "k")
            if missing < 1.0:
                fill_pass(cache, teacher, TensorLoader(train, 64, norm, augment, seed=0, views=VIEWS), 64)
                cache._flags[np.random.default_rng(0).random(cache.shape.rows) < missing] = 0  # forget some rows
            student = model(a.student)
            objective = Distill(KD(temperature=4.0, alpha=0.9), student, 1, len(train), teacher=teacher, cache=cache)
            with objective:
                rows[f"cache, {missing:.0%} rows missing"] = fit(student, objective, VIEWS, objective.module)
    student = model(a.student)
    objective = Distill(KD(temperature=4.0, alpha=0.9), student, 1, len(train), teacher=teacher)
    with objective:
        rows["teacher online"] = fit(student, objective, None, objective.module)
    for b in (a.batch, max(1, round(0.15 * a.batch))):
        x = torch.randn(b, 3, 32, 32)
        x = x.contiguous(memory_format=torch.channels_last) if a.channels_last else x
        with torch.no_grad():
            for _ in range(3):
                teacher(x)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 3:
                teacher(x)
                n += b
        rows[f"teacher forward, batch {b}"] = n / (time.perf_counter() - t0)
    layout = "channels_last" if a.channels_last else "NCHW"
    print(f"{a.teacher} -> {a.student}, {len(train)} images, batch {a.batch}, {a.threads} threads, fp32 {layout}")
    for name, ips in rows.items():
        print(f"{name:<32} {ips:>8,.0f} img/s")


if __name__ == "__main__":
    main()
