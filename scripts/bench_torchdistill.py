"""Whole runs, one process after another: kdrun (logit cache), kdrun (teacher online) and torchdistill 1.1.5.

    python scripts/bench_torchdistill.py --teacher RUN/checkpoints/teacher.pt [--epochs 15] [--subset N]
        [--test-subset N] [--threads N] [--sides kdrun-cache,kdrun-online,torchdistill] [--workdir DIR]

The full measurement of issue 18 (resnet20 -> resnet8, CIFAR-10 JPEGs, 15 epochs, two cores), with nothing
else running on the machine:

    KDRUN_DEV_CACHE=~/.cache/kdrun-dev python scripts/bench_torchdistill.py \\
        --teacher <run>/checkpoints/teacher.pt --epochs 15 --threads 2

and a smoke run that only shows every side works: ``--subset 512 --test-subset 1000 --epochs 1``.

The teacher is a resnet20 (any kdrun model) trained by ``kdrun train`` on the same folder, e.g. the one of
``kdrun train experiment=cifar10_cpu``; every side loads the SAME weights with kdrun's loader
(:func:`kdrun.weights.load_teacher`: checksum verified, architecture and class count from the checkpoint).
Its normalisation is read from the teacher's run (``<run>/.hydra/config.yaml``; ``--mean/--std``
override it; the CIFAR-10 JPEG copy's statistics when there is no run config).

Every side trains the same student (``--student resnet8``, :func:`kdrun.models.build_model`, initialised
from the same seed) on the same images (``$KDRUN_DEV_CACHE/cifar10-jpg``, made by
``scripts/prepare_shared_data.py``; ``--root``) with the same recipe: pad-4 random crop + horizontal flip,
Hinton KD at T=4 with 0.9 on the T^2-scaled KL and 0.1 on the cross-entropy, batch 128, SGD (lr 0.05,
momentum 0.9, weight decay 5e-4, no Nesterov) with a per-step cosine schedule to 0, fp32; then the teacher and
the last-epoch student are scored on the test split.

==============  ===========================================================================================
side            what runs (each in its own process; the wall time covers the process from start to exit)
==============  ===========================================================================================
kdrun-cache     ``kdrun train dataset=imagefolder teacher.checkpoint=... baseline=false`` (the CLI): the
                JPEGs are decoded once (into a fresh decode cache: decoding is counted), the teacher's
                logits of 8 replayable views per image are cached and the student reads them
kdrun-online    the same with ``cache.enabled=false``: the teacher runs on every batch
torchdistill    torchdistill's own machinery: a ``DistillationBox`` (``get_distillation_box``) built from a
                torchdistill train config (loaders, frozen teacher, SGD, step-wise ``CosineAnnealingLR``,
                ``WeightedSumLoss`` of ``KDLoss``), driven epoch by epoch as torchdistill's
                ``examples/torchvision/image_classification.py`` does (pre_epoch_process, forward_process,
                post_forward_process, post_epoch_process), on torchvision ``ImageFolder`` + ``DataLoader``
                (``--workers``) with PIL transforms; evaluated like that example
==============  ===========================================================================================

torchdistill's ``KDLoss`` puts ``alpha`` on the cross-entropy and ``beta`` on the soft term, so it gets
alpha=0.1, beta=0.9. Its default pre-epoch process puts only the student in train mode and leaves the
teacher as it was given (train mode: batch statistics, running statistics updated): this script registers a
pre-epoch process (``pre_epoch_with_teacher_eval``) that also puts the teacher in eval mode, and checks
after training that the teacher's weights and buffers did not change.

The table: whole-run wall seconds, student-stage images/s (kdrun: its student stage as it reports it, cache
fills included; torchdistill: the training epochs), test top-1 of the last epoch (and the teacher's, the same
weights on every side), and each side's ratios against torchdistill (whole-run speed-up = torchdistill's wall
/ the side's). ``--subset N`` / ``--test-subset N`` keep a seeded choice of N training / test images (a folder
of links made before any side starts, the same for every side). ``--threads N`` sets torch's threads on every
side (kdrun: ``trainer.threads``); ``--kdrun-override KEY=VALUE`` (repeatable) adds a ``kdrun train`` override
to both kdrun sides, e.g. ``dataset.cache_dir=DIR`` to reuse decoded images. Exit code 2 with one line when
torchdistill is not installed (``pip install 'kdrun[bench]'``) or an input is bad.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as pkg_version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
# torch, torchvision, kdrun and torchdistill are imported where they are used: bad input is refused at once

SIDES = ("kdrun-cache", "kdrun-online", "torchdistill")
CIFAR10_JPEG_MEAN = (0.4913, 0.4821, 0.4465)  # the JPEG copy's training split, x/255 (configs/experiment/cifar10_cpu)
CIFAR10_JPEG_STD = (0.2452, 0.2428, 0.2606)
TD_VERSION = "1.1.5"


class BadInput(Exception):
    """One line for the user; exit code 2."""


@dataclass
class Teacher:
    """What a kdrun teacher checkpoint says about its model (from its ``identity``)."""

    path: str
    arch: str
    kwargs: dict
    num_classes: int
    in_chans: int
    image_size: int


@dataclass
class Setting:
    """Everything every side shares (passed to the torchdistill child process as JSON)."""

    root: str
    teacher: Teacher
    student: str
    mean: list[float]
    std: list[float]
    epochs: int
    batch: int
    eval_batch: int
    lr: float
    temperature: float
    alpha: float  # on the T^2-scaled KL term (kdrun's convention)
    seed: int
    threads: int | None
    workers: int
    device: str


@dataclass
class SideResult:
    side: str
    wall_s: float
    student_s: float
    images_per_s: float
    student_top1: float
    teacher_top1: float
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds by part of the run


# ---------------------------------------------------------------- inputs


def read_teacher(path: str) -> Teacher:
    from kdrun.errors import ConfigError
    from kdrun.weights import read_checkpoint

    try:
        ident = read_checkpoint(path, f"--teacher {path}")["identity"]
    except ConfigError as e:
        raise BadInput(str(e)) from None
    if ident.get("source", "kdrun") != "kdrun":
        raise BadInput(f"--teacher {path}: a {ident.get('source')} model; this benchmark takes kdrun's models")
    return Teacher(
        os.path.abspath(path),
        ident["arch"],
        dict(ident.get("kwargs") or {}),
        int(ident["num_classes"]),
        int(ident["in_chans"]),
        int(ident["image_size"]),
    )


def normalisation(teacher_path: str, mean, std) -> tuple[list[float], list[float]]:
    """``--mean/--std`` when given, else the teacher's run's ``dataset.mean/std``, else the CIFAR-10 JPEG copy's."""
    run_cfg = os.path.join(os.path.dirname(os.path.dirname(teacher_path)), ".hydra", "config.yaml")
    if (mean is None or std is None) and os.path.exists(run_cfg):
        from omegaconf import OmegaConf

        ds = OmegaConf.load(run_cfg).get("dataset", {})
        mean = mean if mean is not None else list(ds.get("mean") or CIFAR10_JPEG_MEAN)
        std = std if std is not None else list(ds.get("std") or CIFAR10_JPEG_STD)
    return list(mean or CIFAR10_JPEG_MEAN), list(std or CIFAR10_JPEG_STD)


def image_files(split_dir: str) -> list[tuple[str, str]]:
    """(class, file path) of every image of an image-folder split, in torchvision's ``ImageFolder`` order."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(split_dir)
    return [(ds.classes[y], p) for p, y in ds.samples]


def link_subset(src: str, dst: str, n: int | None, seed: int) -> None:
    """``dst``: a folder of links to a seeded choice of ``n`` images of split ``src`` (the whole split: None)."""
    if n is None:
        os.symlink(os.path.abspath(src), dst)
        return
    sys.path.insert(0, SCRIPTS)
    from reference_kd import subset_indices

    files = image_files(src)
    for i in subset_indices(len(files), n, seed).tolist():
        cls, path = files[i]
        os.makedirs(os.path.join(dst, cls), exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(dst, cls, os.path.basename(path)))


def check_root(root: str, teacher: Teacher) -> None:
    from PIL import Image

    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise BadInput(f"--root {root}: no '{split}' folder (want {split}/<class>/<image>)")
    first = image_files(os.path.join(root, "train"))[0][1]
    with Image.open(first) as im:
        if im.size != (teacher.image_size, teacher.image_size):
            raise BadInput(
                f"--root {root}: images of {im.size[0]}x{im.size[1]}, the teacher takes "
                f"{teacher.image_size}x{teacher.image_size}"
            )


# ---------------------------------------------------------------- kdrun sides (the CLI, in a subprocess)


def hydra_value(v) -> str:
    """A Python value as a Hydra override value (lists and dicts in Hydra's grammar)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def kdrun_command(s: Setting, side: str, work: str, extra: list[str]) -> list[str]:
    t = s.teacher
    overrides = [
        "dataset=imagefolder",
        f"dataset.root={s.root}",
        f"dataset.image_size={t.image_size}",
        f"dataset.in_chans={t.in_chans}",
        f"dataset.num_classes={t.num_classes}",
        f"dataset.mean={hydra_value(s.mean)}",
        f"dataset.std={hydra_value(s.std)}",
        "dataset.augment={crop_pad: 4, flip: true}",
        f"dataset.cache_dir={os.path.join(work, side, 'decoded')}",
        f"teacher.name={t.arch}",
        f"teacher.kwargs={hydra_value(t.kwargs)}",
        f"teacher.checkpoint={t.path}",
        f"student={s.student}",
        "loss=kd",
        f"loss.temperature={s.temperature}",
        f"loss.alpha={s.alpha}",
        "optim=sgd",
        f"optim.lr={s.lr}",
        "optim.momentum=0.9",
        "optim.weight_decay=5e-4",
        "optim.nesterov=false",
        "optim.schedule=cosine",
        "optim.warmup_epochs=0",
        f"trainer.epochs={s.epochs}",
        f"trainer.batch_size={s.batch}",
        f"trainer.eval_batch_size={s.eval_batch}",
        f"trainer.seed={s.seed}",
        f"trainer.device={s.device}",
        "trainer.val_fraction=0",
        "trainer.precision=fp32",
        "trainer.latency=false",
        *([f"trainer.threads={s.threads}"] if s.threads else []),
        f"cache.enabled={hydra_value(side == 'kdrun-cache')}",
        "baseline=false",
        "store.enabled=false",
        f"paths.output={os.path.join(work, side)}",
        f"hydra.run.dir={os.path.join(work, side, 'run')}",
        *extra,
    ]
    return [sys.executable, "-m", "kdrun.cli", "train", *overrides]


def timed_process(cmd: list[str], log_path: str, what: str) -> float:
    """Run ``cmd`` (output to ``log_path``); its wall seconds. A failure ends the benchmark with its log's tail."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        sys.stderr.write(tail)
        raise SystemExit(f"{what} failed (exit code {rc}); log: {log_path}")
    return wall


def kdrun_side(s: Setting, side: str, work: str, extra: list[str]) -> SideResult:
    os.makedirs(os.path.join(work, side))
    wall = timed_process(kdrun_command(s, side, work, extra), os.path.join(work, side, "kdrun.log"), side)
    with open(os.path.join(work, side, "run", "metrics.json")) as f:
        m = json.load(f)
    student = m["stages"]["student"]
    timings = {k: float(v) for k, v in m["timings_s"].items()}
    total = timings.pop("total")
    timings["startup+other"] = wall - total
    return SideResult(
        side,
        wall,
        float(student["seconds"]),
        float(student["images_per_s"]),
        float(m["test"]["student"]["last"]["top1"]),
        float(m["test"]["teacher"]["top1"]),
        {k: v for k, v in timings.items() if v >= 0.05},
    )


# ---------------------------------------------------------------- torchdistill side (a child process)


def torchdistill_train_config(s: Setting, steps_per_epoch: int, sampler) -> dict:
    """torchdistill's ``train`` config (the schema of its sample YAMLs): KD at T, beta on the soft term."""
    return {
        "num_epochs": s.epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": sampler, "kwargs": {}},
            "kwargs": {"batch_size": s.batch, "num_workers": s.workers, "drop_last": False},
        },
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {
            "key": "SGD",
            "kwargs": {"lr": s.lr, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
        },
        "scheduler": {
            "key": "CosineAnnealingLR",
            "kwargs": {"T_max": s.epochs * steps_per_epoch, "eta_min": 0.0},
            "scheduling_step": 1,  # step-wise, like kdrun's schedule
        },
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                                "temperature": s.temperature,
                                "alpha": round(1.0 - s.alpha, 10),  # torchdistill: alpha on CE
                                "beta": s.alpha,  # and beta on the T^2-scaled KL
                                "reduction": "batchmean",
                            },
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
        "pre_epoch_process": "pre_epoch_with_teacher_eval",
    }


def state_digest(model: torch.nn.Module) -> str:
    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def top1(model: torch.nn.Module, loader, device: torch.device) -> float:
    """Top-1 (%) over ``loader``, as torchdistill's image-classification example's ``evaluate``."""
    import torch

    model.eval()
    right = seen = 0
    with torch.inference_mode():
        for x, y in loader:
            right += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            seen += len(y)
    return 100.0 * right / seen


def torchdistill_side(s: Setting) -> dict:
    """Train and evaluate with torchdistill; the parts' seconds and the top-1s (run in a process of its own)."""
    t_start = time.perf_counter()
    import torch
    from torch.utils.data import RandomSampler, SequentialSampler
    from torchdistill.common.main_util import set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.interfaces.pre_epoch_proc import default_pre_epoch_process_with_teacher
    from torchdistill.core.interfaces.registry import PRE_EPOCH_PROC_FUNC_DICT, register_pre_epoch_proc_func
    from torchdistill.datasets.util import build_data_loader
    from torchvision import datasets, transforms

    from kdrun.models import build_model
    from kdrun.weights import load_teacher

    if "pre_epoch_with_teacher_eval" not in PRE_EPOCH_PROC_FUNC_DICT:

        @register_pre_epoch_proc_func
        def pre_epoch_with_teacher_eval(self, epoch=None, **kwargs):
            """torchdistill's default pre-epoch process, plus the teacher in eval mode (it does not do that)."""
            default_pre_epoch_process_with_teacher(self, epoch=epoch, **kwargs)
            self.teacher_model.eval()

    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    t = s.teacher
    teacher = build_model(t.arch, t.num_classes, t.in_chans, t.image_size, **t.kwargs)
    load_teacher(t.path, teacher, {"arch": t.arch, "num_classes": t.num_classes}, f"--teacher {t.path}")
    teacher = teacher.to(device).eval()
    teacher_digest = state_digest(teacher)
    set_seed(s.seed)  # the same student initialisation as kdrun's (seeded right before it is built)
    student = build_model(s.student, t.num_classes, t.in_chans, t.image_size).to(device)

    norm = transforms.Normalize(s.mean, s.std)
    train_tf = transforms.Compose(
        [
            transforms.RandomCrop(t.image_size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            norm,
        ]
    )
    eval_tf = transforms.Compose([transforms.ToTensor(), norm])
    dataset_dict = {
        "train": datasets.ImageFolder(os.path.join(s.root, "train"), transform=train_tf),
        "test": datasets.ImageFolder(os.path.join(s.root, "test"), transform=eval_tf),
    }
    steps = -(-len(dataset_dict["train"]) // s.batch)
    box = get_distillation_box(
        teacher, student, dataset_dict, torchdistill_train_config(s, steps, RandomSampler), device, None, False, 1
    )
    setup_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    seen = 0
    for epoch in range(box.num_epochs):  # examples/torchvision/image_classification.py: train, train_one_epoch
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            seen += len(targets)
        box.post_epoch_process()
    student_s = time.perf_counter() - t0
    if box.teacher_model.training or state_digest(box.teacher_model) != teacher_digest:
        raise RuntimeError("torchdistill: the teacher changed during distillation (not in eval mode)")
    box.clean_modules()

    t0 = time.perf_counter()
    test_cfg = {
        "dataset_id": "test",
        "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
        "kwargs": {"batch_size": s.eval_batch, "num_workers": s.workers},
    }
    test_loader = build_data_loader(dataset_dict["test"], test_cfg, False)
    teacher_top1 = top1(teacher, test_loader, device)
    student_top1 = top1(student, test_loader, device)
    return {
        "student_s": student_s,
        "images": seen,
        "teacher_top1": teacher_top1,
        "student_top1": student_top1,
        "breakdown": {"setup": setup_s, "student": student_s, "evaluate": time.perf_counter() - t0},
    }


def torchdistill_process(s: Setting, work: str) -> SideResult:
    side = "torchdistill"
    os.makedirs(os.path.join(work, side))
    setting_path, result_path = (os.path.join(work, side, n) for n in ("setting.json", "result.json"))
    with open(setting_path, "w") as f:
        json.dump(asdict(s), f)
    cmd = [sys.executable, os.path.abspath(__file__), "--child-torchdistill", setting_path, result_path]
    wall = timed_process(cmd, os.path.join(work, side, "torchdistill.log"), side)
    with open(result_path) as f:
        r = json.load(f)
    breakdown = dict(r["breakdown"])
    breakdown["startup+other"] = wall - sum(breakdown.values())
    return SideResult(
        side, wall, r["student_s"], r["images"] / r["student_s"], r["student_top1"], r["teacher_top1"], breakdown
    )


def child(setting_path: str, result_path: str) -> None:
    with open(setting_path) as f:
        raw = json.load(f)
    raw["teacher"] = Teacher(**raw["teacher"])
    result = torchdistill_side(Setting(**raw))
    with open(result_path, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------- table


def table(results: list[SideResult]) -> str:
    ref = next((r for r in results if r.side == "torchdistill"), None)
    head = (
        f"{'side':<14}{'wall s':>9}{'student img/s':>15}{'top-1':>8}{'teacher':>9}"
        f"{'wall speed-up':>15}{'img/s ratio':>13}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        speed = f"{ref.wall_s / r.wall_s:.2f}x" if ref else "-"
        rate = f"{r.images_per_s / ref.images_per_s:.2f}x" if ref else "-"
        digits = 0 if r.images_per_s >= 100 else 1
        rows.append(
            f"{r.side:<14}{r.wall_s:>9.1f}{r.images_per_s:>15.{digits}f}{r.student_top1:>8.2f}{r.teacher_top1:>9.2f}"
            f"{speed:>15}{rate:>13}"
        )
    rows.append("")
    for r in results:
        rows.append(f"{r.side}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r.breakdown.items()))
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="a kdrun teacher checkpoint (<run>/checkpoints/teacher.pt)")
    p.add_argument(
        "--root",
        default=None,
        help="image folder with train/<class>/* and test/<class>/* (default: $KDRUN_DEV_CACHE/cifar10-jpg)",
    )
    p.add_argument("--student", default="resnet8", help="a kdrun model (kdrun models)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--subset", type=int, default=None, help="seeded choice of N training images (smoke runs)")
    p.add_argument("--test-subset", type=int, default=None, help="seeded choice of N test images (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: torch's)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, run in this order: {', '.join(SIDES)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the T^2-scaled KL term (0.1 on CE)")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="default: the teacher's run's dataset.mean")
    p.add_argument("--std", type=float, nargs=3, default=None, help="default: the teacher's run's dataset.std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="torchdistill's DataLoader workers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kdrun-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", default=None, help="keep every side's outputs here (default: a temporary folder)")
    p.add_argument("--child-torchdistill", nargs=2, metavar=("SETTING", "RESULT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setting_from(a: argparse.Namespace, root: str) -> Setting:
    teacher = read_teacher(a.teacher)
    check_root(a.root, teacher)
    mean, std = normalisation(teacher.path, a.mean, a.std)
    return Setting(
        root,
        teacher,
        a.student,
        mean,
        std,
        a.epochs,
        a.batch,
        a.eval_batch,
        a.lr,
        a.temperature,
        a.alpha,
        a.seed,
        a.threads,
        a.workers,
        a.device,
    )


def bench(a: argparse.Namespace) -> None:
    sides = [x.strip() for x in a.sides.split(",") if x.strip()]
    unknown = [x for x in sides if x not in SIDES]
    if unknown or not sides:
        raise BadInput(f"--sides {a.sides}: valid sides are {', '.join(SIDES)}")
    if "torchdistill" in sides and importlib.util.find_spec("torchdistill") is None:
        raise BadInput(f"torchdistill is not installed: pip install 'kdrun[bench]' (torchdistill {TD_VERSION})")
    if not a.teacher or not os.path.isfile(a.teacher):
        raise BadInput(f"--teacher {a.teacher}: no such file (want a kdrun run's checkpoints/teacher.pt)")
    for name in ("epochs", "batch", "eval_batch", "subset", "test_subset", "threads"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise BadInput(f"--{name.replace('_', '-')} {v}: must be a positive integer")
    if not 0.0 <= a.alpha <= 1.0:
        raise BadInput(f"--alpha {a.alpha}: must be in [0, 1]")
    if a.root is None:
        sys.path.insert(0, SCRIPTS)
        from reference_kd import ROOT

        a.root = ROOT
    if not os.path.isdir(a.root):
        raise BadInput(f"--root {a.root}: no such folder (scripts/prepare_shared_data.py makes the CIFAR-10 JPEGs)")

    work = os.path.abspath(a.workdir) if a.workdir else tempfile.mkdtemp(prefix="bench-torchdistill-")
    if a.workdir:
        if os.path.exists(work) and os.listdir(work):
            raise BadInput(f"--workdir {a.workdir}: not empty")
        os.makedirs(work, exist_ok=True)
    try:
        root = a.root
        if a.subset or a.test_subset:  # the same chosen images for every side
            root = os.path.join(work, "data")
            os.makedirs(root)
            link_subset(os.path.join(a.root, "train"), os.path.join(root, "train"), a.subset, a.seed)
            link_subset(os.path.join(a.root, "test"), os.path.join(root, "test"), a.test_subset, a.seed)
        s = setting_from(a, os.path.abspath(root))
        version = pkg_version("torchdistill") if "torchdistill" in sides else "-"
        n_train = len(image_files(os.path.join(root, "train")))
        n_test = len(image_files(os.path.join(root, "test")))
        print(
            f"{s.teacher.arch} -> {s.student}, {n_train} train / {n_test} test images of {a.root}, "
            f"{s.epochs} epochs, batch {s.batch}, T={s.temperature}, alpha={s.alpha} (KL), SGD lr {s.lr} cosine, "
            f"threads {s.threads or 'default'}, torch {pkg_version('torch')}, torchdistill {version}"
        )
        results = []
        for side in sides:
            print(f"running {side} ...", flush=True)
            r = torchdistill_process(s, work) if side == "torchdistill" else kdrun_side(s, side, work, a.kdrun_override)
            results.append(r)
            print(f"  {side}: {r.wall_s:.1f} s, student top-1 {r.student_top1:.2f}", flush=True)
        print()
        print(table(results))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child_torchdistill:
        child(*a.child_torchdistill)
        return 0
    try:
        bench(a)
    except BadInput as e:
        print(f"bench_torchdistill: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
