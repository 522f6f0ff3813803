"""``kdrun train``: data -> scheme (teacher, logit cache, students) -> evaluation -> metrics.

:func:`run` is the recipe, top to bottom. The building blocks a scheme
combines live on :class:`Run`: ``teacher()`` (train, reuse from the store, or
load a checkpoint), ``logits()`` (the logit cache), ``distil()`` (a student
trained with the configured KD method), ``ce_model()`` (a model trained with CE
alone, e.g. the baseline). The loop itself is :func:`kdrun.engine.train_stage`;
the student's objective is :class:`kdrun.distill.Distill`.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun import distributed, loggers, report, schedules
from kdrun import io as kio
from kdrun.cache import FORMAT as CACHE_FORMAT
from kdrun.cache import SUFFIX as CACHE_SUFFIX
from kdrun.cache import CacheShape, LogitCache, fill_pass
from kdrun.config import loss_kwargs
from kdrun.data import DATASETS, DataBundle, ImageSet
from kdrun.data.base import FileSet
from kdrun.data.loader import Normalize, TensorLoader
from kdrun.data.stream import StreamLoader
from kdrun.data.transforms import make_augment
from kdrun.distill import Distill, probe_shapes
from kdrun.engine import StageResult, atomic_save, cross_entropy, train_stage
from kdrun.errors import ConfigError
from kdrun.losses import LOSSES
from kdrun.models import build_model
from kdrun.store import Store, key_of, link_into, model_definition

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
    """Load (decode once) the configured dataset and check it against the config."""
    kw = OmegaConf.to_container(dcfg, resolve=True)
    for k in ("mean", "std", "augment", "student_fraction", "student_exclude"):  # used by the run, not the factory
        kw.pop(k, None)
    data = DATASETS.get(kw.pop("name"), "dataset.name")(**kw)
    data.check(dcfg.get("num_classes"), dcfg.get("image_size"), dcfg.get("in_chans"))
    for split, part in (("train", data.train), ("test", data.test)):
        labels = getattr(part, "labels", None)
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= data.num_classes):
            raise ConfigError(
                f"dataset={data.name}: {split} labels span [{int(labels.min())}, {int(labels.max())}], "
                f"outside [0, {data.num_classes}) for its {data.num_classes} classes"
            )
    return data


def split_validation(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Hold ``fraction`` of the training split out (seeded) to choose a best epoch; never the test set."""
    if fraction <= 0:
        return train, None
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7))
    n_val = max(1, int(round(len(train) * fraction)))
    return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values)


def transfer_subset(
    train: ImageSet | FileSet, fraction: float, seed: int, exclude: list[int] | tuple[int, ...] = ()
) -> ImageSet | FileSet:
    """A seeded, class-stratified ``fraction`` of ``train`` (each class keeps at least one image), in index order,
    without the classes in ``exclude``.

    The student stages' transfer set (``dataset.student_fraction``, ``dataset.student_exclude``); the whole
    split when ``fraction >= 1`` and nothing is excluded.
    """
    if fraction >= 1 and not exclude:
        return train
    gen = torch.Generator().manual_seed(seed + 11)
    labels = train.labels.cpu()
    keep = []
    for c in labels.unique().tolist():
        if c in exclude:
            continue
        members = (labels == c).nonzero().flatten()
        n = max(1, int(round(len(members) * fraction)))
        keep.append(members[torch.randperm(len(members), generator=gen)[:n]])
    return train.subset(torch.cat(keep).sort().values)


def on_device(split: ImageSet | FileSet | None, device: torch.device) -> ImageSet | FileSet | None:
    """An in-memory split on ``device`` (files of a streamed split stay where they are)."""
    if isinstance(split, ImageSet):
        return ImageSet(split.images.to(device), split.labels.to(device))
    return split


@dataclass
class CacheUse:
    """A logit cache in use by this run: its store key and recipe; ``damaged_entry``: the creation time of
    a damaged store entry found for that key (replaced when the run publishes its own)."""

    cache: LogitCache
    key: str
    recipe: dict
    damaged_entry: float | None = None


def model_identity(mcfg, data: DataBundle) -> dict:
    return {
        "arch": mcfg.name,
        "source": mcfg.get("source", "kdrun"),
        "kwargs": OmegaConf.to_container(mcfg.kwargs, resolve=True) if mcfg.get("kwargs") else {},
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "image_size": data.image_size,
    }


def load_teacher(path: str, model: nn.Module, want: dict, what: str | None = None) -> dict:
    """Load a kdrun teacher checkpoint into ``model`` after verifying its checksum (:mod:`kdrun.io`);
    refuse a damaged file, another architecture or class count. ``what`` names the file in errors
    (default ``teacher.checkpoint=PATH``)."""
    what = what or f"teacher.checkpoint={path}"
    try:
        ckpt = kio.load(path, "checkpoint")
    except kio.DamagedArtifact as e:
        raise ConfigError(f"{what}: {e.reason}") from None
    have = ckpt.get("identity")
    if not isinstance(have, dict) or not isinstance(ckpt.get("model"), dict):
        raise ConfigError(f"{what}: not a kdrun teacher checkpoint (no 'identity' and 'model')")
    if (have.get("arch"), have.get("num_classes")) != (want["arch"], want["num_classes"]):
        raise ConfigError(
            f"{what}: holds {have.get('arch')} for {have.get('num_classes')} classes, "
            f"but this run's teacher is {want['arch']} for {want['num_classes']} classes"
        )
    load_weights(model, ckpt["model"], what)
    return ckpt.get("summary", {})


def load_weights(model: nn.Module, state, what: str) -> None:
    """``model.load_state_dict(state)``, or one line naming ``what`` when ``state`` does not fit the model."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what}: not a state_dict (a mapping of parameter names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = (first[1].strip() if len(first) > 1 else first[0])[:200] if first else ""
        raise ConfigError(f"{what}: does not fit the model ({detail})") from None


def load_pretrained(path: str, model: nn.Module, what: str) -> None:
    """Initialise ``model`` from a local state_dict (or a kdrun checkpoint's ``model``), read with
    ``weights_only=True``: a file that is not what it claims is one line naming ``what``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated, not torch, or a pickle with more than weights)
        raise ConfigError(
            f"{what}: not a loadable state_dict ({type(e).__name__}; only tensors and plain "
            "values are read, never code)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        if "header" in state:  # a kdrun checkpoint: verify its checksum too
            try:
                state = kio.load(path, state["header"].get("kind", "checkpoint"))
            except kio.DamagedArtifact as e:
                raise ConfigError(f"{what}: {e.reason}") from None
        state = state["model"]
    load_weights(model, state, what)


@dataclass
class Trained:
    """A model the run evaluates: its weights, config and the stage that trained it."""

    model: nn.Module
    mcfg: DictConfig
    stage: str | None  # None when loaded, not trained here


class Run:
    """Everything one run shares: config, device, data, loaders, output directory, artifact store."""

    def __init__(self, cfg: DictConfig, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        tr = self.tr = cfg.trainer
        self.device = distributed.bind_device(tr.device)  # cuda:LOCAL_RANK with several workers
        if tr.get("deterministic"):
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        if tr.get("threads"):
            torch.set_num_threads(int(tr.threads))
        seed_everything(tr.seed)
        self.student_views: int | None = None  # the views the distilled student trained on (baselines match)
        self.timings: dict[str, float] = {}
        self.ema: dict[str, nn.Module] = {}  # stage -> EMA of its model's weights (trainer.ema)
        self.stages: dict[str, dict] = {}
        self.caches: dict[str, CacheUse] = {}  # teacher name -> its logit cache
        self.models: dict[str, Trained] = {}
        self.roles: dict[str, str] = {}  # teacher/student/baseline -> model name
        self.store_refs: dict[str, str] = {}
        self.store = Store(cfg.store.dir) if cfg.store.enabled else None
        self.logger = loggers.Loggers()  # the run's trackers, set by run()
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        os.makedirs(self.ckpt_dir, exist_ok=True)
        self.fingerprint = key_of(OmegaConf.to_container(cfg, resolve=True))

        t0 = time.perf_counter()
        self.data = load_dataset(cfg.dataset)
        self.train_set, self.val_set = split_validation(self.data.train, float(tr.val_fraction), tr.seed)
        # the student stages' transfer set: all of the training split, or a seeded fraction of it
        self.student_set = transfer_subset(
            self.train_set,
            float(cfg.dataset.get("student_fraction", 1.0)),
            tr.seed,
            list(cfg.dataset.get("student_exclude") or []),
        )
        # in-memory splits go to the training device once; every loader of every stage shares them
        self.train_set, self.student_set, self.val_set, self.test_set = (
            on_device(s, self.device) for s in (self.train_set, self.student_set, self.val_set, self.data.test)
        )
        self.timings["data"] = time.perf_counter() - t0
        log.info(
            "data: %s, %d train / %d val / %d test images, %d classes, %dx%dx%d",
            self.data.name,
            len(self.train_set),
            len(self.val_set) if self.val_set else 0,
            len(self.data.test),
            self.data.num_classes,
            self.data.in_chans,
            self.data.image_size,
            self.data.image_size,
        )
        if len(self.student_set) != len(self.train_set):
            log.info(
                "data: the student stages train on %d of the %d training images (dataset.student_fraction=%s, "
                "student_exclude=%s); the teacher on all of them",
                len(self.student_set),
                len(self.train_set),
                cfg.dataset.student_fraction,
                list(cfg.dataset.get("student_exclude") or []),
            )
        self.norm = Normalize(cfg.dataset.mean, cfg.dataset.std, self.data.in_chans, self.device)
        aug = cfg.dataset.get("augment")
        self.augment = make_augment(OmegaConf.to_container(aug, resolve=True) if aug is not None else None, tr.seed)
        views = cfg.cache.views
        self.views = int(views) if views is not None else (8 if self.augment.enabled else 0)
        self.val_loader = self.eval_loader(self.val_set)
        self.test_loader = self.eval_loader(self.test_set)

    # ---------------------------------------------------------------- loaders and models

    def loader(self, split: ImageSet | FileSet, batch_size: int, **kw) -> TensorLoader | StreamLoader:
        """Batches from memory (decoded once), or streamed from the files of a split too big for memory."""
        if isinstance(split, FileSet):
            return StreamLoader(
                split,
                batch_size,
                self.norm,
                num_workers=int(self.cfg.dataset.get("workers") or 2),
                device=self.device,
                **kw,
            )
        return TensorLoader(split, batch_size, self.norm, device=self.device, **kw)

    def train_loader(
        self, views: int | None = None, split: ImageSet | FileSet | None = None
    ) -> TensorLoader | StreamLoader:
        """Shuffled, augmented batches of ``split`` (default: the whole training split); ``views``: None fresh
        views, K > 0 one of K cached views, 0 plain."""
        return self.loader(
            split if split is not None else self.train_set,
            self.tr.batch_size,
            augment=self.augment,
            shuffle=True,
            seed=self.tr.seed,
            views=views,
            shard=distributed.world(),
        )

    def eval_loader(self, split: ImageSet | FileSet | None) -> TensorLoader | StreamLoader | None:
        if split is None:
            return None
        return self.loader(split, self.tr.eval_batch_size, shuffle=False, views=0)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train_set, FileSet)

    def build(self, who: str, mcfg, seed_offset: int = 0) -> nn.Module:
        """A fresh model for ``mcfg`` (``who`` names its config key in errors), initialised from
        ``trainer.seed + seed_offset``: the student and its baseline start from the same weights."""
        seed_everything(self.tr.seed + seed_offset)
        ident = model_identity(mcfg, self.data)
        model = build_model(
            mcfg.name,
            ident["num_classes"],
            ident["in_chans"],
            ident["image_size"],
            key=f"{who}.name",
            source=ident["source"],
            weights=mcfg.get("weights"),
            **ident["kwargs"],
        )
        if mcfg.get("pretrained"):
            load_pretrained(mcfg.pretrained, model, f"{who}.pretrained={mcfg.pretrained}")
        if self.tr.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.device)

    def record(self, name: str, model: nn.Module, mcfg, stage: str | None) -> None:
        """A model the report evaluates; with ``trainer.ema`` its stage's EMA weights too (``{name}_ema``)."""
        self.models[name] = Trained(model, mcfg, stage)
        ema = self.ema.get(stage or name)
        if ema is not None:
            self.export(f"{stage or name}_ema", ema, mcfg)
            self.models[f"{name}_ema"] = Trained(ema, mcfg, None)

    def fit(
        self,
        stage: str,
        model: nn.Module,
        objective,
        *,
        epochs: int,
        optim_cfg=None,
        trainable: nn.Module | None = None,
        loader: TensorLoader | None = None,
        on_step=None,
        precision: str | None = None,
    ) -> StageResult:
        """Train one stage (resuming its checkpoint if there is one) and note its summary and time.

        ``trainable``: the stage's one trainable module when it is more than ``model`` (student + KD method).
        With ``trainer.ema`` the EMA of ``model``'s weights is kept in ``self.ema[stage]``.
        """
        ema = self.tr.get("ema")
        res = train_stage(
            stage,
            model,
            objective,
            loader or self.train_loader(),
            epochs=epochs,
            optim_cfg=optim_cfg if optim_cfg is not None else self.cfg.optim,
            trainable=trainable,
            val_loader=self.val_loader,
            run_dir=self.run_dir,
            log_every=self.tr.log_every,
            checkpoint_every_steps=int(self.tr.checkpoint_every_steps),
            fingerprint=f"{self.fingerprint}-{stage}",
            on_step=on_step,
            precision=precision or self.tr.get("precision", "fp32"),
            compile=bool(self.tr.get("compile")),
            sync_bn=bool(self.tr.get("sync_bn")),
            ema=float(ema) if ema else None,
            logger=self.logger,
        )
        self.stages[stage] = report.stage_summary(res)
        self.timings[stage] = res.seconds
        if res.ema is not None:
            self.ema[stage] = res.ema
        return res

    def export(self, stage: str, model: nn.Module, mcfg, extra: dict | None = None) -> str:
        """Write ``checkpoints/{stage}.pt``: the model alone (plus its identity), ready to ship."""
        path = os.path.join(self.ckpt_dir, f"{stage}.pt")
        atomic_save({"identity": model_identity(mcfg, self.data), "model": model.state_dict(), **(extra or {})}, path)
        return path

    # ---------------------------------------------------------------- building blocks of schemes

    def note_store_ref(self, kind: str, key: str) -> None:
        """Record (in ``store_refs.json``, at once) that this run uses a store entry: ``kdrun store gc`` keeps it."""
        self.store_refs[kind] = key
        if distributed.is_main():
            report.write_json(
                {"store": self.store.root, "refs": self.store_refs}, os.path.join(self.run_dir, "store_refs.json")
            )

    def teacher_recipe(self) -> dict:
        """Everything that determines the trained teacher (its artifact-store key)."""
        cfg = self.cfg
        weights = {"weights": cfg.teacher.weights} if cfg.teacher.get("weights") else {}  # pretrained by name
        return {
            "model": model_identity(cfg.teacher, self.data),
            "pretrained": cfg.teacher.get("pretrained"),
            **weights,
            "definition": model_definition(cfg.teacher.name, cfg.teacher.get("source", "kdrun")),
            "data": self.data.identity,
            "train": len(self.train_set),
            "val_fraction": float(self.tr.val_fraction),
            "optim": OmegaConf.to_container(self.teacher_optim(), resolve=True),
            "epochs": self.tr.teacher_epochs,
            "batch_size": self.tr.batch_size,
            "seed": self.tr.seed,
            "augment": self.augment.identity(),
            "torch": torch.__version__.split("+")[0],
            "normalize": [list(cfg.dataset.mean), list(cfg.dataset.std)],
            "device": self.device.type,
            "workers": distributed.size(),
            "precision": self.teacher_precision(),
        }

    def teacher_precision(self) -> str:
        """``teacher.precision``, else ``trainer.precision``: the teacher's training, cache and online forward."""
        return self.cfg.teacher.get("precision") or self.tr.get("precision", "fp32")

    def teacher_optim(self):
        return OmegaConf.merge(self.cfg.optim, self.cfg.teacher.get("optim") or {})

    def teacher(self) -> nn.Module:
        """The trained teacher: from ``teacher.checkpoint``, from the store, or trained here (and stored)."""
        tcfg = self.cfg.teacher
        model = self.build("teacher", tcfg)
        ident = model_identity(tcfg, self.data)
        final = os.path.join(self.ckpt_dir, "teacher.pt")
        if tcfg.checkpoint:
            load_teacher(tcfg.checkpoint, model, ident)
            log.info("teacher: loaded %s from %s", tcfg.name, tcfg.checkpoint)
            self.stages["teacher"] = {"source": str(tcfg.checkpoint)}
            self.teacher_key = key_of(
                {"checkpoint": os.path.abspath(tcfg.checkpoint), "mtime": os.path.getmtime(tcfg.checkpoint)}
            )
        elif self.store is None:
            self.teacher_key = key_of(self.teacher_recipe())
            self._train_teacher(model, final)
        else:
            recipe = self.teacher_recipe()
            self.teacher_key = key = key_of(recipe)
            self.note_store_ref("teacher", key)
            with distributed.main_only(self.store.lock("teacher", key)):
                entry = distributed.shared(lambda: self.store.get("teacher", key))
                if entry is not None:
                    summary = load_teacher(entry.file("teacher.pt"), model, ident, f"store entry {entry.path}")
                    if distributed.is_main():
                        link_into(entry.file("teacher.pt"), final)
                        link_into(entry.file("metrics_teacher.csv"), os.path.join(self.run_dir, "metrics_teacher.csv"))
                    log.info("teacher: reused %s from the store (%s); not retrained", tcfg.name, entry.path)
                    self.stages["teacher"] = summary | {"source": "store", "store_key": key}
                else:
                    self._train_teacher(model, final)
                    files = {
                        "teacher.pt": final,
                        "metrics_teacher.csv": os.path.join(self.run_dir, "metrics_teacher.csv"),
                    }
                    if distributed.is_main():
                        entry = self.store.publish("teacher", key, files, recipe)
                        log.info("teacher: stored as %s", entry.path)
        model.eval().requires_grad_(False)
        self.record("teacher", model, tcfg, None)  # reported at its last epoch
        self.roles["teacher"] = "teacher"
        return model

    def _train_teacher(self, model: nn.Module, final: str) -> None:
        self.fit(
            "teacher",
            model,
            cross_entropy,
            epochs=self.tr.teacher_epochs,
            optim_cfg=self.teacher_optim(),
            precision=self.teacher_precision(),
        )
        self.export("teacher", model, self.cfg.teacher, {"summary": self.stages["teacher"]})

    def logits(self, teacher: nn.Module, name: str, key: str | None) -> LogitCache:
        """The logit cache of ``teacher`` (named ``name``) on the student's training images, K replayable views:
        this run's file (resumed), else the store's entry (partial ones are copied and filled further), else a
        new empty file. Filled on first use by the student stage, or here in one pass with ``cache.fill=pass``."""
        topk = self.cfg.cache.get("topk")
        shape = CacheShape(len(self.student_set), self.views, self.data.num_classes, int(topk) if topk else None)
        path = os.path.join(self.run_dir, f"{name}_logits{CACHE_SUFFIX}")
        recipe = {
            "teacher": key,
            "format": CACHE_FORMAT,
            "data": self.data.identity,
            "train": len(self.train_set),
            "views": self.views,
            "topk": shape.topk,
            "student_fraction": float(self.cfg.dataset.get("student_fraction", 1.0)),
            "student_exclude": sorted(self.cfg.dataset.get("student_exclude") or []),
            "augment": [*self.augment.identity(), self.augment.seed],
            "normalize": [list(self.cfg.dataset.mean), list(self.cfg.dataset.std)],
        }
        ckey = key_of(recipe)
        source, damaged = "run", None
        if distributed.is_main():
            if self.store is not None and key is not None:
                self.note_store_ref("logits", ckey)
                if not os.path.exists(path):
                    with self.store.lock("logits", ckey):
                        entry = self.store.get("logits", ckey)
                        if entry is not None:
                            link_into(entry.file(f"logits{CACHE_SUFFIX}"), path)
                            source = "store"
                        elif (bad := self.store.inspect("logits", ckey, verify=False)) is not None:
                            damaged = bad.created  # reported by get(); replaced when this run publishes
            cache = LogitCache.open(path, shape, ckey)
            if not cache.complete:
                cache.copy_on_write()  # never write into a file the store holds
        distributed.barrier()
        if not distributed.is_main():
            cache = LogitCache.attach(path, shape, ckey)
        filled = cache.filled
        log.info(
            "cache: %s (%s), %d of %d rows filled (%d images x %d views%s)",
            path,
            source if filled else "new",
            filled,
            shape.rows,
            shape.samples,
            max(shape.views, 1),
            f", top {shape.topk} logits" if shape.topk else "",
        )
        info = {"source": source, "filled_before": filled, "seconds": 0.0, "fill": self.cfg.cache.get("fill")}
        if self.cfg.cache.get("fill") == "pass" and not cache.complete and not self.streamed:
            info["seconds"] = fill_pass(
                cache,
                teacher,
                self.student_set,
                self.norm,
                self.augment,
                self.tr.eval_batch_size,
                self.device,
                self.teacher_precision() if name == "teacher" else self.tr.get("precision", "fp32"),
            )
            log.info("cache: filled %d rows in one pass in %.1fs", shape.rows - filled, info["seconds"])
            self.timings["cache"] = self.timings.get("cache", 0.0) + info["seconds"]
        self.caches[name] = CacheUse(cache, ckey, recipe, damaged)
        self.stages[self.cache_stage(name)] = info | cache.info() | {"views": self.views}
        return cache

    @staticmethod
    def cache_stage(name: str) -> str:
        return f"cache_{name}" if name != "teacher" else "cache"

    def publish_logits(self, name: str, teacher_key: str | None) -> None:
        """After a student stage: note how full the cache of ``name`` is, and publish it to the store when it
        holds more rows than the store's entry (rows written by every rank: flushed before the barrier)."""
        use = self.caches[name]
        cache, ckey = use.cache, use.key
        cache.flush()
        distributed.barrier()
        info = self.stages[self.cache_stage(name)]
        info |= cache.info() | {"teacher_rows": info.get("teacher_rows", 0) + cache.teacher_rows}
        cache.teacher_rows = 0
        if self.store is None or teacher_key is None or not distributed.is_main():
            return
        with self.store.lock("logits", ckey):
            entry = self.store.inspect("logits", ckey, verify=False)
            usable = entry is not None and entry.problem is None and entry.created != use.damaged_entry
            if cache.filled > (entry.recipe.get("filled", 0) if usable else -1):
                files = {f"logits{CACHE_SUFFIX}": cache.path}
                entry = self.store.publish("logits", ckey, files, use.recipe | {"filled": cache.filled}, link=True)
                log.info("cache: stored as %s (%d of %d rows)", entry.path, cache.filled, cache.shape.rows)

    def distil(
        self,
        stage: str,
        mcfg,
        teacher: nn.Module,
        teacher_name: str = "teacher",
        teacher_key: str | None = None,
        who: str = "student",
    ) -> nn.Module:
        """A student of config ``mcfg`` distilled from ``teacher`` with the configured KD method."""
        static, scheds = schedules.split(loss_kwargs(self.cfg.loss))
        method = LOSSES.get(self.cfg.loss.name, "loss.name")(**static)
        student = self.build(who, mcfg)
        views = self.views
        common = dict(epochs=self.tr.epochs, num_samples=len(self.student_set))
        # the logit cache is built only for a student that trains on it (not with trainer.epochs=0)
        if method.needs_teacher_features or not self.cfg.cache.enabled or not self.tr.epochs:
            if method.needs_teacher_features and not (method.teacher_layers or method.student_layers):
                method.teacher_layers, method.student_layers = method.default_layers(
                    list(teacher.feature_points), list(student.feature_points)
                )
            why = (
                f"needs teacher features {method.teacher_layers}"
                if method.needs_teacher_features
                else "trains for 0 epochs"
                if not self.tr.epochs
                else "runs with cache.enabled=false"
            )
            log.info(
                "%s: %s %s -> the teacher runs online on fresh augmented views (no logit cache)",
                stage,
                self.cfg.loss.name,
                why,
            )
            precision = self.teacher_precision() if teacher_name == "teacher" else None
            objective = Distill(method, student, teacher=teacher, teacher_precision=precision, **common)
            self.student_views = None
            loader = self.train_loader(None, self.student_set)  # fresh augmentation; teacher sees the same batch
        else:
            cache = self.logits(teacher, teacher_name, teacher_key)
            log.info(
                "%s: %s needs only teacher logits -> read from the logit cache%s",
                stage,
                self.cfg.loss.name,
                " (complete: teacher not run)" if cache.complete else "; the teacher fills missing rows on first use",
            )
            precision = self.teacher_precision() if teacher_name == "teacher" else None
            objective = Distill(method, student, teacher=teacher, cache=cache, teacher_precision=precision, **common)
            self.student_views = views
            loader = self.train_loader(views, self.student_set)  # replays view v of each sample (K=0: plain)
        x_probe = next(self.eval_loader(self.student_set.subset(torch.arange(2))).epoch(0)).x
        method.build(
            probe_shapes(teacher, method.teacher_layers, x_probe),
            probe_shapes(student, method.student_layers, x_probe),
            len(self.student_set),
        )
        method.bind_teacher(teacher)
        method.to(self.device)
        for pre in method.pre_stages(teacher, student):  # FT's paraphraser, AB's / FSP's init: stages of their own
            with pre.objective:
                self.fit(
                    f"{stage}_{pre.name}",
                    pre.trainable,
                    pre.objective,
                    epochs=pre.epochs,
                    optim_cfg=OmegaConf.merge(self.cfg.optim, pre.optim),
                    loader=loader,
                )

        def on_step(epoch: int, step: int) -> dict:
            values = {}
            for k, sch in scheds.items():
                values[k] = sch.at(epoch, step, self.tr.epochs, len(loader))
                setattr(method, k, values[k])
            return values

        with objective:  # feature hooks registered once for the stage
            self.fit(
                stage,
                student,
                objective,
                epochs=self.tr.epochs,
                trainable=objective.module,
                loader=loader,
                on_step=on_step if scheds else None,
            )
        if objective.cache is not None:
            self.publish_logits(teacher_name, teacher_key)
        self.export(stage, student, mcfg, {"loss_state": method.state_dict()})
        self.record(stage, student, mcfg, stage)
        return student

    def ce_model(
        self, stage: str, mcfg, who: str = "student", views: int | None = None, seed_offset: int = 0
    ) -> nn.Module:
        """A model trained from scratch with CE only (same init, budget and seed as the students).

        ``views``: as for :meth:`train_loader`; a baseline passes ``run.student_views`` so it sees
        exactly the images the distilled student saw (e.g. no augmentation with ``cache.views=0``).
        """
        model = self.build(who, mcfg, seed_offset)
        self.fit(stage, model, cross_entropy, epochs=self.tr.epochs, loader=self.train_loader(views, self.student_set))
        self.export(stage, model, mcfg)
        self.record(stage, model, mcfg, stage)
        return model


def run(cfg: DictConfig, run_dir: str) -> dict | None:
    """The whole pipeline; returns the metrics for ``run_dir/metrics.json`` (None on workers other than rank 0)."""
    from kdrun.schemes import SCHEMES

    t_start = time.perf_counter()
    r = Run(cfg, run_dir)
    # experiment trackers (logger=[...]), closed (marked failed on an error) when the block ends
    with loggers.build(cfg, run_dir) if distributed.is_main() else loggers.Loggers() as r.logger:
        SCHEMES.get(cfg.scheme.name, "scheme.name")(r)  # trains teacher(s) and students, fills r.models / r.roles
        if not distributed.is_main():
            return None

        t0 = time.perf_counter()
        results, logits = report.evaluate(r)
        r.timings["evaluate"] = time.perf_counter() - t0
        r.timings["total"] = time.perf_counter() - t_start
        metrics = report.assemble(r, results, logits)
        r.logger.finish(metrics, {role: os.path.join(r.ckpt_dir, f"{name}.pt") for role, name in r.roles.items()})
    return metrics
