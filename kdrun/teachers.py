"""Where a run's teacher comes from: ``teacher.checkpoint``, the artifact store, or trained here (and stored).

:class:`Teacher` is what a scheme passes to a distillation stage: the frozen model, its name (``teacher``,
or the stage that trained it, e.g. an assistant), the store key of its weights (None when it is not in the
store, so its logit cache stays in the run), the precision of its forward pass and, for a stored teacher, the
SHA-256 of its weights.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun import distributed, io
from kdrun.engine import cross_entropy
from kdrun.errors import ConfigError
from kdrun.models.registry import sets_from_data, weights_name
from kdrun.stages import DATA_INIT, StageRunner
from kdrun.store import Store, StoreRefs, key_of, link_into, model_definition
from kdrun.weights import load_teacher, model_identity

log = logging.getLogger("kdrun")


@dataclass
class Teacher:
    model: nn.Module  # frozen: eval mode, no autograd
    name: str  # "teacher", or the stage that trained it
    key: str | None  # store key of its weights; None: not stored
    precision: str | None = None  # autocast of its forward pass; None: the stage's own
    # SHA-256 of a stored teacher's weights (its state_dict), part of its logit caches' keys: a teacher entry
    # rebuilt under the same recipe (damaged, removed, trained elsewhere) holds other weights, so other logits
    weights_sha256: str | None = None


class TeacherSource:
    """Builds the run's teacher (``teacher`` config) and records it for the report."""

    def __init__(self, cfg: DictConfig, stages: StageRunner, store: Store | None, refs: StoreRefs):
        self.cfg, self.tr, self.stages, self.store, self.refs = cfg, cfg.trainer, stages, store, refs
        self.data = stages.data

    @property
    def precision(self) -> str:
        """``teacher.precision``, else ``trainer.precision``: the teacher's training, cache and online forward."""
        return self.cfg.teacher.get("precision") or self.tr.get("precision", "fp32")

    @property
    def label_smoothing(self) -> float:
        """``teacher.label_smoothing`` of the teacher's CE (0: plain CE)."""
        return float(self.cfg.teacher.get("label_smoothing") or 0.0)

    def optim(self):
        return OmegaConf.merge(self.cfg.optim, self.cfg.teacher.get("optim") or {})

    def recipe(self) -> dict:
        """Everything that determines the trained teacher (its artifact-store key)."""
        cfg, data = self.cfg, self.data
        tcfg = cfg.teacher
        # pretrained by name (DEFAULT resolved: it names other weights in another torchvision version)
        weights = {}
        if tcfg.get("weights"):
            weights["weights"] = weights_name(tcfg.name, tcfg.get("source", "kdrun"), tcfg.weights)
        # timm weights read from a local file (pretrained_cfg_overlay={file: PATH}): by the file's contents too
        overlay = OmegaConf.select(tcfg, "kwargs.pretrained_cfg_overlay.file", default=None)
        if overlay and os.path.isfile(str(overlay)):
            weights["weights_sha256"] = io.sha256_file(str(overlay))
        # only when set, so the teachers stored before the option keep their keys
        optional: dict = {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}
        starts_from_weights = tcfg.get("weights") or tcfg.get("pretrained")
        if not starts_from_weights and sets_from_data(tcfg.name, tcfg.get("source", "kdrun")):
            optional["data_init"] = DATA_INIT  # which images set part of it before training (airbench)
        return {
            "model": model_identity(cfg.teacher, data.data),
            # the starting weights by their contents: another file at the same path is another teacher
            "pretrained": io.sha256_file(cfg.teacher.pretrained) if cfg.teacher.get("pretrained") else None,
            **weights,
            **optional,
            "definition": model_definition(cfg.teacher.name, cfg.teacher.get("source", "kdrun")),
            "data": data.data.content_key(),
            "train": len(data.train_set),
            "val_fraction": float(self.tr.val_fraction),
            "optim": OmegaConf.to_container(self.optim(), resolve=True),
            "epochs": self.tr.teacher_epochs,
            "batch_size": self.tr.batch_size,
            "seed": self.tr.seed,
            "augment": data.augment_key(data.teacher_augment),
            "torch": torch.__version__.split("+")[0],
            "normalize": [list(cfg.dataset.mean), list(cfg.dataset.std)],
            "device": data.device.type,
            "workers": distributed.size(),
            **({"sync_bn": True} if distributed.size() > 1 and self.tr.get("sync_bn") else {}),
            "precision": self.precision,
        }

    def get(self) -> Teacher:
        """The trained teacher: from ``teacher.checkpoint``, from the store, or trained here (and stored)."""
        tcfg, stages = self.cfg.teacher, self.stages
        if tcfg.checkpoint and (tcfg.get("weights") or tcfg.get("pretrained")):
            # the checkpoint's weights replace any starting weights: not read (nor downloaded) for nothing
            unused = [f"teacher.{k}={tcfg.get(k)}" for k in ("weights", "pretrained") if tcfg.get(k)]
            log.warning("teacher: %s not used: teacher.checkpoint gives every weight", ", ".join(unused))
            tcfg = OmegaConf.merge(tcfg, {"weights": None, "pretrained": None})
        final = os.path.join(stages.ckpt_dir, "teacher.pt")
        # named starting weights (torchvision's, timm's) that a trained teacher will replace are not read (nor
        # downloaded): an offline machine with the teacher in its store runs; if it is gone by the time it is
        # needed, the teacher is built again with them to train
        weightless = bool(tcfg.get("weights")) and not tcfg.checkpoint and self._trained_one_exists(final)
        build = partial(stages.build, "teacher", trains_on=self.data.train_set)
        model = build(OmegaConf.merge(tcfg, {"weights": None}) if weightless else tcfg)
        ident = model_identity(tcfg, self.data.data)
        metrics_csv = os.path.join(stages.run_dir, "metrics_teacher.csv")
        fresh = getattr(model, "new_parameters", None)
        if not tcfg.checkpoint and fresh and not self.tr.teacher_epochs:
            raise ConfigError(
                f"teacher.weights={tcfg.weights}: {', '.join(fresh)} not in the weights (another class count or "
                "input), so trainer.teacher_epochs=0 would distil from an untrained classifier; give "
                "trainer.teacher_epochs > 0 to fine-tune it"
            )
        classes = list(self.data.data.classes)
        if tcfg.get("weights") and not tcfg.checkpoint and len(classes) == 1000 and not _synsets(classes):
            log.warning(
                "teacher.weights=%s: the data's 1000 classes (%s, ...) are not ImageNet's synsets (n01440764, "
                "n01443537, ...), yet the weights' 1000-class classifier is kept: class i of the data (in sorted "
                "order) is taken for ImageNet's class i%s",
                tcfg.weights,
                ", ".join(classes[:2]),
                "" if self.tr.teacher_epochs else "; give trainer.teacher_epochs > 0 to fine-tune it to these classes",
            )
        if not (tcfg.checkpoint or tcfg.get("weights") or tcfg.get("pretrained") or self.tr.teacher_epochs):
            log.warning(
                "teacher: trainer.teacher_epochs=0 and no teacher.checkpoint, weights or pretrained: the students "
                "learn from an untrained teacher (random weights); fine for timing, meaningless for accuracy"
            )
        run = stages.data_record(tcfg)  # classes, normalisation and data a teacher's checkpoint must agree with
        if tcfg.checkpoint:
            load_teacher(tcfg.checkpoint, model, ident, run=run)
            log.info("teacher: loaded %s from %s", tcfg.name, tcfg.checkpoint)
            stages.log.note("teacher", source=str(tcfg.checkpoint))
            # its logit caches are keyed by the file's content: a path and time survive a copy over it (cp -p, rsync)
            key = key_of({"checkpoint_sha256": io.sha256_file(tcfg.checkpoint)})
        elif self.store is None:
            key = key_of(self.recipe())
            self._train(model, final)
        else:
            store, recipe = self.store, self.recipe()
            key = key_of(recipe)
            self.refs.note("teacher", key)
            # another job may hold it while it trains this teacher: every worker waits (DDP), then reuses it
            locks = partial(store.lock, "teacher", key), partial(store.try_lock, "teacher", key)
            with distributed.lock_on_main(*locks, self.data.device):
                finished = self._finished_here()  # read once: teacher_last.pt holds the optimiser's state too
                own = None if finished else self._taken_before(final, model, ident, run)
                # the entry is read (its SHA-256 checked) only when the run has no teacher of its own yet
                entry = None if own is not None else distributed.shared(lambda: store.get("teacher", key))
                if own is not None:
                    stages.log.note("teacher", **own, source="store", store_key=key, file=final)
                elif entry is not None and not finished:
                    summary = load_teacher(entry.file("teacher.pt"), model, ident, f"store entry {entry.path}", run)
                    if distributed.is_main():
                        link_into(entry.file("teacher.pt"), final)
                        if os.path.exists(entry.file("metrics_teacher.csv")):  # none for 0 epochs
                            link_into(entry.file("metrics_teacher.csv"), metrics_csv)
                        self._drop_own_attempt()
                    log.info("teacher: reused %s from the store (%s); not retrained", tcfg.name, entry.path)
                    stages.log.note("teacher", **summary, source="store", store_key=key)
                else:  # not stored, or trained in this run (run again: its record stays the run's own)
                    if weightless and not finished:  # the stored teacher went meanwhile: start from the weights
                        model = build(tcfg)
                    self._train(model, final)
                    if entry is None and distributed.is_main():
                        files = {"teacher.pt": final}
                        if os.path.exists(metrics_csv):  # trainer.teacher_epochs=0 writes no epoch rows
                            files["metrics_teacher.csv"] = metrics_csv
                        entry = store.publish("teacher", key, files, recipe)
                        log.info("teacher: stored as %s", entry.path)
        weights = None  # the weights, not teacher.pt's bytes: a run run again writes its summary there anew
        if self.store is not None and not tcfg.checkpoint:  # a teacher.checkpoint's key is already its file's
            weights = io.digest({"state_dict": model.state_dict()})
            stages.log.note("teacher", weights_sha256=weights)
        model.eval().requires_grad_(False)
        stages.record("teacher", model, tcfg, None)  # reported at its last epoch
        if self.tr.get("ema") and "teacher" not in stages.ema and self.tr.teacher_epochs:
            where = "loaded from teacher.checkpoint" if tcfg.checkpoint else "reused from the store"
            log.info("teacher: %s, so no teacher_ema row (trainer.ema averages a stage trained in this run)", where)
        return Teacher(model, "teacher", key, self.precision, weights)

    def _taken_before(self, final: str, model: nn.Module, ident: dict, run: dict) -> dict | None:
        """A run run again (resumed, or a finished one evaluated again) keeps the teacher it took from the store: its
        ``checkpoints/teacher.pt``, loaded into ``model`` (its summary returned), even when the store entry has
        since gone (gc, a deleted store) or been rebuilt; the students of the run learnt from that teacher. Called
        when the run did not train its own teacher; None when it took none yet; a damaged file is a warning, and
        the teacher then comes from the store or is trained again."""
        if not distributed.shared(lambda: os.path.exists(final)):
            return None
        try:
            summary = load_teacher(final, model, ident, f"this run's {final}", run)
        except ConfigError as e:
            log.warning("teacher: %s; taking the teacher from the store or training it again", e)
            return None
        log.info("teacher: this run's own %s (taken before); not retrained", final)
        return summary

    def _trained_one_exists(self, final: str) -> bool:
        """Whether a trained teacher will be loaded over the starting weights: with the store in use, this run's
        own (run again: its teacher.pt, or its finished teacher stage) or a complete entry of its recipe. (Without
        the store, the teacher stage runs, and resumes from teacher_last.pt if it has one: never weightless.)"""

        def probe() -> bool:
            if self.store is None:
                return False
            if os.path.exists(final) or self._finished_here():
                return True
            entry = self.store.inspect("teacher", key_of(self.recipe()), verify=False)
            return entry is not None and entry.problem is None

        return distributed.shared(probe)

    def _drop_own_attempt(self) -> None:
        """Remove what this run's own teacher stage left before it was stopped (its checkpoints, its per-step rows):
        another run finished the same teacher meanwhile and this one takes that, so they describe no model of it."""
        run_dir, ckpt_dir = self.stages.run_dir, self.stages.ckpt_dir
        for path in (
            os.path.join(ckpt_dir, "teacher_last.pt"),
            os.path.join(ckpt_dir, "teacher_best.pt"),
            os.path.join(run_dir, "metrics_teacher_steps.csv"),
        ):
            if os.path.exists(path):
                os.remove(path)
                log.info("teacher: removed %s, of this run's own teacher stage stopped before", path)

    def _finished_here(self) -> bool:
        """Whether this run's own teacher stage has finished (the run is being run again)."""
        ckpt = io.load_checkpoint(os.path.join(self.stages.ckpt_dir, "teacher_last.pt"))
        return ckpt is not None and ckpt.get("epoch", 0) >= ckpt.get("epochs", 0)

    def _train(self, model: nn.Module, final: str) -> None:
        stages = self.stages
        stages.fit(
            "teacher",
            model,
            partial(cross_entropy, label_smoothing=self.label_smoothing),
            epochs=self.tr.teacher_epochs,
            optim_cfg=self.optim(),
            loader=self.data.train_loader(augment=self.data.teacher_augment),
            precision=self.precision,
            lr_key="teacher.optim.lr" if (self.cfg.teacher.get("optim") or {}).get("lr") is not None else "optim.lr",
        )
        stages.export("teacher", model, self.cfg.teacher, {"summary": stages.log.summaries["teacher"]})


def _synsets(classes: list[str]) -> bool:
    """Whether class names are WordNet synsets (``n01440764``, ...), as ImageNet's folders are named: sorted, as
    class folders are, they are its label order (another set of 1,000 synsets is not told apart)."""
    return all(re.fullmatch(r"n\d{8}", c) for c in classes)
