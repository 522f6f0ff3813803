"""``kdrun train``: teacher -> logit cache -> distilled student -> baseline -> evaluation.

Each stage is a few lines here; the loop itself lives in :mod:`kdrun.engine`,
the student's objective in :mod:`kdrun.distill`, the figures in
:mod:`kdrun.report`.
"""
from __future__ import annotations

import logging
import os
import random
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun import report
from kdrun.cache import build_logit_cache, cached_teacher_logits
from kdrun.config import loss_kwargs
from kdrun.data import DATASETS, DataBundle, ImageSet
from kdrun.data.loader import Augment, Normalize, TensorLoader
from kdrun.distill import Distill, probe_shapes
from kdrun.engine import accuracy, atomic_save, cross_entropy, predict, train_stage
from kdrun.errors import ConfigError
from kdrun.losses import LOSSES
from kdrun.models import build_model

log = logging.getLogger("kdrun")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_dataset(dcfg) -> DataBundle:
    kw = OmegaConf.to_container(dcfg, resolve=True)
    return DATASETS.get(kw.pop("name"), "dataset.name")(**kw)


def split_validation(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Hold ``fraction`` of the training split out (seeded) to choose a best epoch; never the test set."""
    if fraction <= 0:
        return train, None
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7))
    n_val = max(1, int(round(len(train) * fraction)))
    return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values)


def build_from_cfg(who: str, mcfg, data: DataBundle) -> nn.Module:
    kwargs = OmegaConf.to_container(mcfg.kwargs, resolve=True) if mcfg.get("kwargs") else {}
    model = build_model(mcfg.name, data.num_classes, data.in_chans, data.image_size, key=f"{who}.name", **kwargs)
    if mcfg.get("pretrained"):
        state = torch.load(mcfg.pretrained, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
    return model


def teacher_identity(tcfg, data: DataBundle) -> dict:
    return {"arch": tcfg.name, "kwargs": OmegaConf.to_container(tcfg.kwargs, resolve=True),
            "num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size}


def load_teacher(path: str, model: nn.Module, want: dict) -> None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"teacher.checkpoint={path}: not a readable checkpoint ({type(e).__name__})") from None
    have = ckpt.get("identity") if isinstance(ckpt, dict) else None
    if not have:
        raise ConfigError(f"teacher.checkpoint={path}: not a kdrun teacher checkpoint (no 'identity')")
    if (have["arch"], have["num_classes"]) != (want["arch"], want["num_classes"]):
        raise ConfigError(f"teacher.checkpoint={path}: holds {have['arch']} for {have['num_classes']} classes, "
                          f"but this run's teacher is {want['arch']} for {want['num_classes']} classes")
    model.load_state_dict(ckpt["model"])


def run(cfg: DictConfig, run_dir: str) -> dict:
    """The whole pipeline; returns the metrics written to ``run_dir/metrics.json``."""
    t_start = time.perf_counter()
    tr = cfg.trainer
    device = pick_device(tr.device)
    seed_everything(tr.seed)
    timings: dict[str, float] = {}

    # ---- data: decoded once into uint8 tensors; batches are sampled from memory
    t0 = time.perf_counter()
    data = load_dataset(cfg.dataset)
    train_set, val_set = split_validation(data.train, float(tr.val_fraction), tr.seed)
    timings["data"] = time.perf_counter() - t0
    log.info("data: %s, %d train / %d val / %d test images, %d classes, %dx%dx%d", data.name, len(train_set),
             len(val_set) if val_set else 0, len(data.test), data.num_classes, data.in_chans,
             data.image_size, data.image_size)
    norm = Normalize(cfg.dataset.mean, cfg.dataset.std, data.in_chans, device)
    aug_cfg = cfg.dataset.get("augment") or {}
    augment = Augment(int(aug_cfg.get("crop_pad", 0)), bool(aug_cfg.get("flip", False)), tr.seed)

    def train_loader(views=None) -> TensorLoader:
        return TensorLoader(train_set, tr.batch_size, norm, augment, shuffle=True, seed=tr.seed,
                            device=device, views=views)

    def eval_loader(split: ImageSet | None) -> TensorLoader | None:
        if split is None:
            return None
        return TensorLoader(split, tr.eval_batch_size, norm, shuffle=False, device=device, views=0)

    val_loader, test_loader = eval_loader(val_set), eval_loader(data.test)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    stages: dict[str, dict] = {}

    # ---- 1. teacher: train with CE, or load a trained one
    teacher = build_from_cfg("teacher", cfg.teacher, data).to(device)
    ident = teacher_identity(cfg.teacher, data)
    if cfg.teacher.checkpoint:
        load_teacher(cfg.teacher.checkpoint, teacher, ident)
        log.info("teacher: loaded %s from %s", cfg.teacher.name, cfg.teacher.checkpoint)
        stages["teacher"] = {"source": cfg.teacher.checkpoint}
    else:
        optim_cfg = OmegaConf.merge(cfg.optim, cfg.teacher.get("optim") or {})
        res = train_stage("teacher", teacher, cross_entropy, train_loader(), epochs=tr.teacher_epochs,
                          optim_cfg=optim_cfg, val_loader=val_loader, run_dir=run_dir, log_every=tr.log_every)
        stages["teacher"] = report.stage_summary(res)
        timings["teacher"] = res.seconds
    atomic_save({"identity": ident, "model": teacher.state_dict()}, os.path.join(ckpt_dir, "teacher.pt"))
    teacher.eval().requires_grad_(False)

    # ---- 2. the KD method, and the teacher's logits from the cache when it needs nothing else
    method = LOSSES.get(cfg.loss.name, "loss.name")(**loss_kwargs(cfg.loss))
    seed_everything(tr.seed)
    student = build_from_cfg("student", cfg.student, data).to(device)
    views = int(cfg.cache.views)
    objective_kw = dict(epochs=tr.epochs, num_samples=len(train_set))
    if method.needs_teacher_features:
        if not (method.teacher_layers or method.student_layers):
            method.teacher_layers, method.student_layers = method.default_layers(
                list(teacher.feature_points), list(student.feature_points))
        log.info("student: %s needs teacher features %s -> the teacher runs online (no logit cache)",
                 cfg.loss.name, method.teacher_layers)
        objective = Distill(method, teacher=teacher, **objective_kw)
    else:
        key = f"{report.stable_hash(ident)}-{data.identity}-n{len(train_set)}-v{views}-s{tr.seed}"
        cache_path = os.path.join(run_dir, "teacher_logits.pt")
        logits, info = cached_teacher_logits(cache_path, key, lambda: build_logit_cache(
            teacher, train_set, norm, augment, views, tr.eval_batch_size, device))
        stages["cache"] = info | {"views": views, "file": "teacher_logits.pt"}
        timings["cache"] = info["seconds"]
        log.info("student: %s needs only teacher logits -> read from the logit cache (teacher not run)",
                 cfg.loss.name)
        objective = Distill(method, cached_logits=logits.to(device), **objective_kw)
    x_probe = norm(train_set.images[:2].to(device))
    method.build(probe_shapes(teacher, method.teacher_layers, x_probe),
                 probe_shapes(student, method.student_layers, x_probe), len(train_set))
    method.to(device)

    # ---- 3. student: distil
    # cached logits: replay view v of each sample (K=0: the plain image); online teacher: fresh views
    student_loader = train_loader(None if method.needs_teacher_features else views)
    res = train_stage("student", student, objective, student_loader,
                      epochs=tr.epochs, optim_cfg=cfg.optim, extra_params=list(method.parameters()),
                      val_loader=val_loader, run_dir=run_dir, log_every=tr.log_every)
    stages["student"] = report.stage_summary(res)
    timings["student"] = res.seconds
    atomic_save({"model": student.state_dict(), "loss": method.state_dict()}, os.path.join(ckpt_dir, "student.pt"))

    # ---- 4. baseline: the same student from the same init, CE only
    baseline = None
    if cfg.baseline:
        seed_everything(tr.seed)
        baseline = build_from_cfg("student", cfg.student, data).to(device)
        res = train_stage("baseline", baseline, cross_entropy, train_loader(), epochs=tr.epochs,
                          optim_cfg=cfg.optim, val_loader=val_loader, run_dir=run_dir, log_every=tr.log_every)
        stages["baseline"] = report.stage_summary(res)
        timings["baseline"] = res.seconds
        atomic_save({"model": baseline.state_dict()}, os.path.join(ckpt_dir, "baseline.pt"))

    # ---- 5. evaluate on the test split (last epoch; best-on-validation where there is a validation split)
    t0 = time.perf_counter()
    results = report.evaluate_all(teacher, student, baseline, test_loader, run_dir, stages, build=lambda: (
        build_from_cfg("student", cfg.student, data).to(device)))
    input_shape = (data.in_chans, data.image_size, data.image_size)
    results["models"] = {
        "teacher": report.model_stats(teacher, input_shape, cfg.teacher.name, latency=tr.latency),
        "student": report.model_stats(student, input_shape, cfg.student.name, latency=tr.latency),
    }
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    metrics = report.assemble(cfg, data, results, stages, timings, device)
    return metrics
