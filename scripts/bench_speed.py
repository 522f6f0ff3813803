"""Stage throughput: kdrun's own code path vs the tutorial loop of ``scripts/reference_kd.py``.

    python scripts/bench_speed.py [--subset 5000] [--steps 30] [--repeats 3] [--threads N] [--channels-last]

Both sides train the same models (``--teacher resnet20 --student resnet8``) on the same seeded subset
of CIFAR-10 train (JPEG folder) with the same batch, augmentation (pad-4 crop, flip), optimiser (SGD,
momentum 0.9, weight decay 5e-4, constant LR) and number of steps per stage:

=============  ==========================================  =============================================
stage          kdrun                                       reference
=============  ==========================================  =============================================
teacher        ``train_stage(cross_entropy)``              ``train_ce`` (ImageFolder + DataLoader, w=2)
cache          ``fill_pass`` (views x subset)              ``teacher_pass``: one teacher inference pass
distil         ``train_stage(Distill(cache=...))``         ``distill``: teacher online on every batch
student CE     ``train_stage(cross_entropy)``              ``train_ce``
=============  ==========================================  =============================================

kdrun reads the decode-once uint8 tensors of ``dataset=imagefolder`` through ``TensorLoader``. Each
side runs in its own process (so its peak memory is its own), and the sides alternate for
``--repeats`` rounds (kdrun first in even rounds, the reference first in odd ones); the table holds
the median of the rounds. Training stages time the steps after the first ``--warmup``; the cache
stage times the whole pass. Peak memory: the process's peak RSS during the stage on the CPU
(``resource.getrusage`` after resetting the high-water mark), ``torch.cuda.max_memory_allocated``
on a GPU. ``--channels-last`` and ``--bf16`` apply to kdrun's side only (the reference stays the
plain tutorial loop; ``--threads`` sets torch's threads on both sides); ``--sides kdrun`` skips the
reference, e.g. to compare kdrun settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from itertools import count, islice

import torch
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_kd as ref  # noqa: E402

from kdrun.cache import CacheShape, LogitCache, fill_pass  # noqa: E402
from kdrun.data import DATASETS  # noqa: E402
from kdrun.data.loader import Augment, Normalize, TensorLoader  # noqa: E402
from kdrun.distill import Distill  # noqa: E402
from kdrun.engine import cross_entropy, train_stage  # noqa: E402
from kdrun.losses.kd import KD  # noqa: E402
from kdrun.run_data import default_eval_batch_size  # noqa: E402

STAGES = ("teacher", "cache", "distil", "student_ce")
LABELS = {
    "teacher": "teacher (CE)",
    "cache": "cache / teacher pass",
    "distil": "distil (kdrun: cached)",
    "student_ce": "student alone (CE)",
}


def optim_cfg(lr: float):
    """kdrun's SGD config with the reference's settings and a constant LR."""
    return OmegaConf.create(
        {
            "name": "sgd",
            "lr": lr,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "nesterov": False,
            "schedule": "constant",
            "milestones": [],
            "gamma": 0.1,
            "warmup_epochs": 0,
        }
    )


@contextmanager
def peak_memory(device: torch.device, out: dict, key: str):
    """Store in ``out[key]`` the peak memory (MiB) reached inside the block, on ``device``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # reset the RSS high-water mark to the current RSS
            f.write("5")
    yield
    if device.type == "cuda":
        out[key] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out[key] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FixedSteps:
    """A :class:`TensorLoader` seen by ``train_stage`` as one epoch of exactly ``steps`` full batches.

    It goes on into the wrapped loader's next epochs when one is too short.
    """

    drop_last = True

    def __init__(self, loader: TensorLoader, steps: int):
        self.loader, self.steps = loader, steps
        self.batch_size, self.device = loader.batch_size, loader.device

    @property
    def num_samples(self) -> int:
        return self.steps * self.batch_size

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_step: int = 0):
        return islice((b for e in count(epoch) for b in self.loader.epoch(e)), start_step, self.steps)


def in_bf16(objective, device: torch.device):
    """``objective`` with its forward passes under bf16 autocast (weights, optimiser and loss stay fp32)."""

    def run(model: nn.Module, batch, epoch: int) -> dict:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return objective(model, batch, epoch)

    return run


class SteadyClock:
    """``on_step`` hook of ``train_stage``: starts the clock just before step ``warmup``."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.t0 = warmup, device, None

    def __call__(self, epoch: int, step: int) -> dict:
        if step == self.warmup:
            ref.sync(self.device)
            self.t0 = time.perf_counter()
        return {}

    def images_per_s(self, images: int) -> float:
        ref.sync(self.device)
        return images / (time.perf_counter() - self.t0)


def timed_stage(
    stage: str,
    net: nn.Module,
    objective,
    loader: TensorLoader,
    steps: int,
    warmup: int,
    lr: float,
    run_dir: str,
    trainable: nn.Module | None = None,
    compile: bool = False,
) -> float:
    """Images/s of ``steps`` steps of kdrun's ``train_stage`` on ``loader``, the first ``warmup`` untimed."""
    clock = SteadyClock(warmup, loader.device)
    train_stage(
        stage,
        net,
        objective,
        FixedSteps(loader, steps),
        epochs=1,
        optim_cfg=optim_cfg(lr),
        trainable=trainable,
        run_dir=run_dir,
        on_step=clock,
        compile=compile,
    )
    return clock.images_per_s((steps - warmup) * loader.batch_size)


def kdrun_side(a, device: torch.device) -> dict:
    """All four stages through kdrun's code path; returns {"ips": {stage: images/s}, "mem": {stage: MiB}}."""
    data = DATASETS.get("imagefolder")(root=a.root, image_size=32)
    classes = data.num_classes
    train = data.train.subset(ref.subset_indices(len(data.train), a.subset, a.seed))
    del data  # a real run keeps the whole train and test split; here only the subset stays
    gc.collect()
    norm = Normalize(ref.MEAN, ref.STD, 3, device)
    augment = Augment(4, True, a.seed)
    ips, mem = {}, {}

    def model(name: str) -> nn.Module:
        m = ref.cifar_model(name, device, classes)
        return m.to(memory_format=torch.channels_last) if a.channels_last else m

    def fit(stage: str, net: nn.Module, objective, views: int | None, steps: int, trainable=None) -> float:
        if a.bf16:
            objective = in_bf16(objective, device)
        loader = TensorLoader(
            train, a.batch, norm, augment, shuffle=True, seed=a.seed, device=device, views=views, drop_last=True
        )
        return timed_stage(stage, net, objective, loader, steps, a.warmup, a.lr, run_dir, trainable, a.compile)

    with tempfile.TemporaryDirectory(prefix="bench-kdrun-") as run_dir:
        teacher = model(a.teacher)
        with peak_memory(device, mem, "teacher"):
            ips["teacher"] = fit("teacher", teacher, cross_entropy, None, a.teacher_steps)
        teacher.eval().requires_grad_(False)
        with peak_memory(device, mem, "cache"):
            t0 = time.perf_counter()
            shape = CacheShape(len(train), a.views, classes)
            cache = LogitCache.open(os.path.join(run_dir, "teacher_logits.kdlc"), shape, "bench")
            precision = "bf16" if a.bf16 else "fp32"
            views_loader = TensorLoader(train, a.batch, norm, augment, seed=a.seed, device=device, views=a.views)
            fill_pass(cache, teacher, views_loader, a.eval_batch, precision)
            ref.sync(device)
            ips["cache"] = shape.rows / (time.perf_counter() - t0)
        method = KD(temperature=a.temperature, alpha=a.alpha).to(device)
        student = model(a.student)
        objective = Distill(method, student, epochs=1, num_samples=len(train), cache=cache)
        with peak_memory(device, mem, "distil"), objective:
            ips["distil"] = fit("student", student, objective, a.views, a.steps, objective.module)
        with peak_memory(device, mem, "student_ce"):
            ips["student_ce"] = fit("baseline", model(a.student), cross_entropy, None, a.steps)
    return {"ips": ips, "mem": mem}


def reference_side(a, device: torch.device) -> dict:
    """All four stages through ``reference_kd``; also the DataLoader workers' peak RSS (MiB)."""
    train = ref.image_loader(a.root, a.subset, ref.train_transform(), a.batch, True, a.workers, a.seed)
    plain = ref.image_loader(a.root, a.subset, ref.eval_transform(), a.eval_batch, False, a.workers, a.seed)
    ips, mem = {}, {}
    classes = len(train.dataset.dataset.classes)
    teacher = ref.cifar_model(a.teacher, device, classes)
    with peak_memory(device, mem, "teacher"):
        ips["teacher"] = ref.train_ce(teacher, train, a.teacher_steps, a.warmup, device, a.lr)
    with peak_memory(device, mem, "cache"):
        ips["cache"] = ref.teacher_pass(teacher, plain, device)
    with peak_memory(device, mem, "distil"):
        student = ref.cifar_model(a.student, device, classes)
        ips["distil"] = ref.distill(student, teacher, train, a.steps, a.warmup, device, a.temperature, a.alpha, a.lr)
    with peak_memory(device, mem, "student_ce"):
        student = ref.cifar_model(a.student, device, classes)
        ips["student_ce"] = ref.train_ce(student, train, a.steps, a.warmup, device, a.lr)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"ips": ips, "mem": mem, "workers_mib": workers}


def run_side(a, side: str) -> dict:
    """One side in a fresh process (``--side``); its result is the JSON on the last line of its output."""
    argv = [sys.executable, os.path.abspath(__file__), "--side", side]
    for k, v in vars(a).items():
        if k in ("side", "repeats", "sides", "json") or v is None or v is False:
            continue
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(results: list[dict], part: str, stage: str) -> float:
    return statistics.median(r[part][stage] for r in results)


def print_table(kd: list[dict], rf: list[dict], device: torch.device) -> None:
    unit = "peak CUDA alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"\n{'stage':<24}{'kdrun img/s':>12}{'ref img/s':>11}{'kdrun/ref':>10}   {unit}: kdrun / ref")
    for s in STAGES:
        k = median(kd, "ips", s)
        if rf:
            r = median(rf, "ips", s)
            print(
                f"{LABELS[s]:<24}{k:>12.0f}{r:>11.0f}{k / r:>9.2f}x   {median(kd, 'mem', s):8.0f} / "
                f"{median(rf, 'mem', s):.0f}"
            )
        else:
            print(f"{LABELS[s]:<24}{k:>12.0f}{'-':>11}{'-':>10}   {median(kd, 'mem', s):8.0f}")
    if rf:
        print(f"(reference DataLoader workers: peak RSS {max(r['workers_mib'] for r in rf):.0f} MiB each, on top)")
    d, ce = median(kd, "ips", "distil"), median(kd, "ips", "student_ce")
    print(f"kdrun distillation with the cache vs student alone with CE: {d:.0f} vs {ce:.0f} images/s ({d / ce:.2f}x)")
    if rf:
        ratio = d / median(rf, "ips", "distil")
        print(f"target distil >= 3x reference: {ratio:.2f}x -> {'met' if ratio >= 3 else 'NOT met'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=ref.ROOT, help="folder with train/<class>/*.jpg")
    p.add_argument("--subset", type=int, default=5000, help="training images used (seeded choice)")
    p.add_argument("--steps", type=int, default=30, help="steps per training stage")
    p.add_argument("--teacher-steps", type=int, help="steps of the teacher stage (default: --steps)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each training stage")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument(
        "--eval-batch", type=int, help="batch of the cache build / teacher pass (default: 512 on cuda, 64 on cpu)"
    )
    p.add_argument("--views", type=int, default=1, help="kdrun cache.views (K > 0: augmented student batches)")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads on both sides (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="kdrun's models in channels_last")
    p.add_argument(
        "--compile",
        action="store_true",
        help="kdrun's trainable modules torch.compile'd (warm-up steps absorb the compilation)",
    )
    p.add_argument("--json", help="also write the rounds' results (images/s, memory) to this JSON file")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="kdrun's forward passes under bf16 autocast (what kdrun would gain from a trainer.precision=bf16 option)",
    )
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of both sides")
    p.add_argument("--sides", default="both", choices=["both", "kdrun"])
    p.add_argument("--side", choices=["kdrun", "reference"], help=argparse.SUPPRESS)
    a = p.parse_args()
    a.eval_batch = a.eval_batch or default_eval_batch_size(torch.device(a.device))
    a.teacher_steps = a.teacher_steps or a.steps
    if min(a.steps, a.teacher_steps) <= a.warmup:
        p.error(f"--steps and --teacher-steps must exceed --warmup {a.warmup}")
    device = torch.device(a.device)
    if a.side:
        if a.threads:
            torch.set_num_threads(a.threads)
        out = kdrun_side(a, device) if a.side == "kdrun" else reference_side(a, device)
        print(json.dumps(out))
        return
    threads = a.threads or torch.get_num_threads()
    print(
        f"{a.teacher} -> {a.student} on {a.subset} CIFAR-10 train images, batch {a.batch}, {a.steps} steps "
        f"({a.warmup} untimed), device {a.device}, {os.cpu_count()} CPUs, torch threads {threads}, "
        f"channels_last {a.channels_last}, bf16 {a.bf16}, views {a.views}, {a.repeats} rounds"
    )
    kd, rf = [], []
    for r in range(a.repeats):
        order = ["kdrun", "reference"] if r % 2 == 0 else ["reference", "kdrun"]
        if a.sides == "kdrun":
            order = ["kdrun"]
        for side in order:
            res = run_side(a, side)
            (kd if side == "kdrun" else rf).append(res)
            print(f"round {r + 1} {side:<9} " + "  ".join(f"{s} {res['ips'][s]:.0f}" for s in STAGES), flush=True)
    print_table(kd, rf, device)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"kdrun": kd, "reference": rf, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    main()
