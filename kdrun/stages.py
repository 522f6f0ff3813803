"""The stage runner: builds models, trains stages (:func:`kdrun.engine.train_stage`), writes their
checkpoints and keeps what each stage reports (:class:`StageLog`) and which models the run evaluates.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun import distributed, io, loggers, report
from kdrun.data.base import FileSet, ImageSet
from kdrun.data.loader import TensorLoader
from kdrun.data.stream import StreamLoader
from kdrun.engine import StageResult, atomic_save, train_stage
from kdrun.models import build_model
from kdrun.run_data import RunData
from kdrun.store import key_of
from kdrun.weights import load_pretrained, model_identity

log = logging.getLogger("kdrun")

# a model trained from scratch that sets part of itself from the data (``init_from_data``) sees this many images,
# evenly spaced through the split it trains on (RunData.spread_batches); ``DATA_INIT`` says so in a teacher's store key
DATA_INIT_IMAGES = 5000  # airbench's whitening layer: the 2x2-patch second moments of 5,000 images
DATA_INIT = f"{DATA_INIT_IMAGES} images evenly spaced through the split, un-augmented"

# Keys that say where a run reads and writes, how it is watched or how fast it goes, not what it trains:
# a run resumed with other values of these (another KDRUN_DATA, data root given explicitly, another logger,
# eval batch or thread count, another machine) continues; any other change is refused by the fingerprint.
RESUME_IGNORED = ("paths", "logger", "store", "sweep", "evaluate", "hydra", "plugins")  # plugins: where code comes from
RESUME_IGNORED_TRAINER = ("eval_batch_size", "device", "log_every", "latency", "checkpoint_every_steps", "threads")
# keys added since checkpoints were first fingerprinted, at the value that trains as a kdrun without them did:
# left out of the fingerprint at that value, so a run an older kdrun began still resumes
ADDED_LATER = {"trainer": {"pre_stage_epochs": None}}
# where the data lies and how it is read: a stage's checkpoint checks the data itself (DataBundle.layout)
RESUME_IGNORED_DATASET = ("root", "cache_dir", "workers", "download")


# Raised when a stage of an unchanged config comes to train differently (other images, another objective), so
# a run an older kdrun began is not resumed into stages that no longer match the ones it finished.
# 2: online peers train on the student stages' images, and self's first generation on the students' views.
RECIPE = 2


def resume_fingerprint(cfg: DictConfig, before_data_check: bool = False) -> str:
    """The key of the resolved config a stage's checkpoint must match to be resumed (see ``RESUME_IGNORED``),
    and of the :data:`RECIPE` that trains it. ``before_data_check``: the key as kdrun made it before checkpoints
    checked their data (:data:`RESUME_IGNORED_DATASET` still in it), which a checkpoint of such a run holds."""
    return key_of({"recipe": RECIPE, "config": _resumed(cfg, before_data_check)})


def _resumed(cfg: DictConfig, before_data_check: bool = False) -> dict:
    """The part of the resolved config a stage's checkpoint must match (see ``RESUME_IGNORED``)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    kept = {k: v for k, v in resolved.items() if k not in RESUME_IGNORED}
    kept["trainer"] = {k: v for k, v in kept.get("trainer", {}).items() if k not in RESUME_IGNORED_TRAINER}
    for group, added in ADDED_LATER.items():
        kept[group] = {k: v for k, v in kept.get(group, {}).items() if k not in added or v != added[k]}
    if not before_data_check:
        kept["dataset"] = {k: v for k, v in kept.get("dataset", {}).items() if k not in RESUME_IGNORED_DATASET}
    return kept


def resume_changes(before: DictConfig, now: DictConfig) -> list[str]:
    """``key: old -> new`` for each value a resume would change (the keys ``RESUME_IGNORED`` leaves out never)."""
    a, b = loggers.flatten(_resumed(before)), loggers.flatten(_resumed(now))
    return [
        f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)
    ]


def resume_fingerprints(cfg: DictConfig) -> tuple[str, str]:
    """(the key a stage's checkpoint is written with, the key of a run begun before the data check): either
    resumes."""
    return resume_fingerprint(cfg), resume_fingerprint(cfg, before_data_check=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Trained:
    """A model the run evaluates: its weights, config and the stage that trained it."""

    model: nn.Module
    mcfg: DictConfig
    stage: str | None  # None when loaded, not trained here


@dataclass
class StageLog:
    """What the stages report: per stage a summary for ``metrics.json`` (``summaries``) and its seconds."""

    summaries: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    earlier_seconds: float = 0.0  # stage time spent by earlier processes of this run (a resumed or rerun run)

    def note(self, stage: str, **info) -> None:
        """Add facts to a stage's summary (e.g. which peer an online scheme chose)."""
        self.summaries.setdefault(stage, {}).update(info)

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class StageRunner:
    """Builds, trains and saves the models of one run; ``models`` are the ones the report evaluates."""

    def __init__(self, cfg: DictConfig, data: RunData, run_dir: str, fingerprints: tuple[str, str]):
        self.cfg, self.tr, self.data = cfg, cfg.trainer, data
        self.device = data.device
        self.run_dir, (self.fingerprint, self.earlier_fingerprint) = run_dir, fingerprints
        self.data_layout = data.data.layout()  # a stage's checkpoint resumes only on the data it trained on
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        os.makedirs(self.ckpt_dir, exist_ok=True)
        if distributed.is_main() and (stale := io.remove_stale_temps(self.ckpt_dir)):  # a write killed midway
            log.info("checkpoints: removed %s, left by a process killed while writing", ", ".join(stale))
        self.log = StageLog()
        self.models: dict[str, Trained] = {}
        self.ema: dict[str, nn.Module] = {}  # stage -> EMA of its model's weights (trainer.ema)
        self.logger = loggers.Loggers()  # the run's trackers, set by kdrun.train.run()

    def build(self, who: str, mcfg, seed_offset: int = 0, trains_on: ImageSet | FileSet | None = None) -> nn.Module:
        """A fresh model for ``mcfg`` (``who`` names its config key in errors), initialised from
        ``trainer.seed + seed_offset``: the student and its baseline start from the same weights.

        A model with an ``init_from_data(batches)`` method (airbench's whitening layer) is given batches of
        ``DATA_INIT_IMAGES`` un-augmented images evenly spaced through the split it trains on, ``trains_on``
        (default: the student stages' transfer set), unless its weights come from elsewhere (``weights``,
        ``pretrained``, ``checkpoint``). Reading them leaves the random state as it was (a streamed split's
        DataLoader draws from it), so what is seeded after the model starts the same either way."""
        seed_everything(self.tr.seed + seed_offset)
        ident = model_identity(mcfg, self.data.data)
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
        init = getattr(model, "init_from_data", None)
        if callable(init) and not any(mcfg.get(k) for k in ("weights", "pretrained", "checkpoint")):
            split = trains_on if trains_on is not None else self.data.student_set
            with torch.random.fork_rng(devices=[]):
                init(self.data.spread_batches(split, DATA_INIT_IMAGES))
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
        loader: TensorLoader | StreamLoader | None = None,
        on_step=None,
        precision: str | None = None,
        pre_stage: bool = False,
        lr_key: str = "optim.lr",
    ) -> StageResult:
        """Train one stage (resuming its checkpoint if there is one) and note its summary and time.

        ``trainable``: the stage's one trainable module when it is more than ``model`` (student + KD method).
        With ``trainer.ema`` the EMA of ``model``'s weights is kept in ``self.ema[stage]``. ``pre_stage``: a KD
        method's stage before the student's (FT's paraphraser, AB's and FSP's initialisation): ``model`` is not
        a classifier, so it is neither validated nor averaged, and part of it may get no gradient. ``lr_key``: the
        config key that sets the stage's learning rate, which a non-finite loss's message tells the user to lower.
        """
        ema = None if pre_stage else self.tr.get("ema")
        res = train_stage(
            stage,
            model,
            objective,
            loader or self.data.train_loader(),
            epochs=epochs,
            optim_cfg=optim_cfg if optim_cfg is not None else self.cfg.optim,
            trainable=trainable,
            val_loader=None if pre_stage else self.data.val_loader,
            run_dir=self.run_dir,
            log_every=self.tr.log_every,
            checkpoint_every_steps=int(self.tr.checkpoint_every_steps),
            fingerprint=f"{self.fingerprint}-{stage}",
            also_resumes=(f"{self.earlier_fingerprint}-{stage}",),
            data_layout=self.data_layout,
            on_step=on_step,
            precision=precision or self.tr.get("precision", "fp32"),
            compile=bool(self.tr.get("compile")),
            sync_bn=bool(self.tr.get("sync_bn")),
            ema=float(ema) if ema else None,
            logger=self.logger,
            find_unused=pre_stage,
            lr_key=lr_key,
        )
        self.log.summaries[stage] = report.stage_summary(res)
        self.log.seconds[stage] = res.seconds
        self.log.earlier_seconds += res.earlier_seconds
        if res.ema is not None:
            self.ema[stage] = res.ema
        return res

    def export(self, stage: str, model: nn.Module, mcfg, extra: dict | None = None) -> str:
        """Write ``checkpoints/{stage}.pt``: the model alone, ready to ship, with its identity and what its input
        was (the names of its classes, the normalisation, the data), which ``kdrun export`` and
        ``teacher.checkpoint`` check against the data they read."""
        path = os.path.join(self.ckpt_dir, f"{stage}.pt")
        atomic_save({**self.data_record(mcfg), "model": model.state_dict(), **(extra or {})}, path)
        return path

    def data_record(self, mcfg) -> dict:
        """A model's identity and its input: class names, normalisation (``dataset.mean``/``std``), data."""
        d = self.cfg.dataset
        return {
            "identity": model_identity(mcfg, self.data.data),
            "classes": list(self.data.data.classes),
            "normalize": [[float(v) for v in d.mean], [float(v) for v in d.std]],
            "data": self.data.data.identity,
            "data_content": self.data.data.content_key(),
            # which training images the validation split held out (none at 0): a teacher reused by a run with
            # another split has trained on some of that run's validation images
            "validation": {"fraction": float(self.tr.val_fraction), "seed": int(self.tr.seed)},
        }
