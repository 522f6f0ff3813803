"""``kdrun train``: data -> scheme (teacher, logit cache, students) -> evaluation -> metrics.

:func:`run` is the recipe, top to bottom. A run is made of small services, each in its own module:

- :class:`kdrun.run_data.RunData`: the dataset, its splits and the loaders;
- :class:`kdrun.stages.StageRunner`: builds, trains (:func:`kdrun.engine.train_stage`) and saves models, and
  keeps the stages' summaries and the models the report evaluates;
- :class:`kdrun.teachers.TeacherSource`: the teacher, from a checkpoint, the artifact store or trained here;
- :class:`kdrun.logit_caches.LogitCaches`: the teachers' logit caches, through the store.

A scheme (``kdrun/schemes/``) receives a :class:`Run`, which holds them plus the two building blocks every
scheme combines: :meth:`Run.distil` (a student trained with the configured KD method; its objective is
:class:`kdrun.distill.Distill`) and :meth:`Run.ce_model` (a model trained with CE alone, e.g. the baseline).
The scheme returns its :class:`Roles`: which model is the teacher, the student and the baseline.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import distributed, loggers, predictions, report, schedules
from kdrun.config import check_method_fits, loss_kwargs
from kdrun.distill import Distill, probe_shapes
from kdrun.engine import cross_entropy
from kdrun.logit_caches import LogitCaches
from kdrun.losses import LOSSES
from kdrun.models.registry import feature_points
from kdrun.preempt import maybe_kill
from kdrun.run_data import RunData
from kdrun.stages import StageRunner, resume_fingerprints, seed_everything
from kdrun.store import Store, StoreRefs
from kdrun.teachers import Teacher, TeacherSource

log = logging.getLogger("kdrun")


@dataclass
class Roles:
    """Which trained model plays which part (model names as in ``metrics.json`` ``test``)."""

    student: str
    teacher: str | None = None
    baseline: str | None = None

    def items(self) -> list[tuple[str, str]]:
        return [(role, name) for role, name in asdict(self).items() if name is not None]


class Run:
    """One run's services (``data``, ``stages``, ``teachers``, ``caches``, the ``store``) and the building
    blocks of schemes."""

    def __init__(self, cfg: DictConfig, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        tr = self.tr = cfg.trainer
        device = distributed.bind_device(tr.device)  # cuda:LOCAL_RANK with several workers
        if tr.get("deterministic"):
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        if tr.get("threads"):
            torch.set_num_threads(int(tr.threads))
        seed_everything(tr.seed)
        self.store = Store(cfg.store.dir) if cfg.store.enabled else None
        self.refs = StoreRefs(self.store, run_dir, distributed.is_main())
        self.data = RunData(cfg, device)
        self.stages = StageRunner(cfg, self.data, run_dir, resume_fingerprints(cfg))
        self.stages.log.seconds["data"] = self.data.seconds
        self.teachers = TeacherSource(cfg, self.stages, self.store, self.refs)
        self.caches = LogitCaches(cfg, self.data, self.stages.log, run_dir, self.store, self.refs)
        self.student_views: int | None = None  # the views the distilled student trained on (baselines match)

    def teacher(self) -> Teacher:
        return self.teachers.get()

    def distil(self, stage: str, mcfg, teacher: Teacher, who: str = "student", seed_offset: int = 0) -> Teacher:
        """A student of config ``mcfg`` distilled from ``teacher`` with the configured KD method, initialised from
        ``trainer.seed + seed_offset``; returned as a possible teacher of a later stage (frozen, named ``stage``,
        not in the store)."""
        cfg, tr, data, stages = self.cfg, self.tr, self.data, self.stages
        static, scheds = schedules.split(loss_kwargs(cfg.loss))
        method = LOSSES.get(cfg.loss.name, "loss.name")(**static)
        student = stages.build(who, mcfg, seed_offset)
        t_model = teacher.model
        common = dict(epochs=tr.epochs, num_samples=len(data.student_set), teacher_precision=teacher.precision)
        # the logit cache is made only for a student that trains on it (not with trainer.epochs=0)
        if self._teacher_online(method):
            if method.needs_teacher_features and not (method.teacher_layers or method.student_layers):
                method.teacher_layers, method.student_layers = method.default_layers(
                    list(feature_points(t_model)), list(feature_points(student))
                )
            why = (
                f"needs teacher features {method.teacher_layers}"
                if method.needs_teacher_features
                else "trains for 0 epochs"
                if not tr.epochs
                else "runs with cache.enabled=false"
            )
            log.info(
                "%s: %s %s -> the teacher runs online on %s (no logit cache)",
                stage,
                cfg.loss.name,
                why,
                "fresh augmented views" if data.augment.enabled else "the student's images (no augmentation)",
            )
            unused = [f"cache.{k}={v}" for k, v in cache_choices(cfg.cache).items()]
            if unused and cfg.cache.enabled and method.needs_teacher_features:
                log.warning("%s: %s not used: with no logit cache they change nothing", stage, ", ".join(unused))
            objective = Distill(method, student, teacher=t_model, **common)
            self.student_views = None
            loader = data.train_loader(None, data.student_set)  # fresh augmentation; teacher sees the same batch
        else:
            cache = self.caches.open(teacher)
            log.info(
                "%s: %s needs only teacher logits -> read from the logit cache%s",
                stage,
                cfg.loss.name,
                " (complete: teacher not run)" if cache.complete else "; the teacher fills missing rows on first use",
            )
            objective = Distill(method, student, teacher=t_model, cache=cache, **common)
            self.student_views = data.views
            loader = data.train_loader(data.views, data.student_set)  # replays view v of each sample (K=0: plain)
        probe_loader = data.eval_loader(data.student_set.subset(torch.arange(min(2, len(data.student_set)))))
        assert probe_loader is not None
        x_probe = next(probe_loader.epoch(0)).x
        method.build(
            probe_shapes(t_model, method.teacher_layers, x_probe),
            probe_shapes(student, method.student_layers, x_probe),
            len(data.student_set),
        )
        method.bind_teacher(t_model)
        method.to(data.device)
        if tr.get("sync_bn") and distributed.size() > 1:  # before the feature taps attach to the BatchNorms
            distributed.to_sync_bn(objective.module)
        for pre in method.pre_stages(t_model, student):  # FT's paraphraser, AB's / FSP's init: stages of their own
            with pre.objective:
                stages.fit(
                    f"{stage}_{pre.name}",
                    pre.trainable,
                    pre.objective,
                    epochs=min(pre.epochs, tr.get("pre_stage_epochs") or pre.epochs),
                    optim_cfg=OmegaConf.merge(cfg.optim, pre.optim),
                    loader=loader,
                    pre_stage=True,
                    lr_key=pre.lr_key,
                )

        def on_step(epoch: int, step: int) -> dict:
            values = {}
            for k, sch in scheds.items():
                values[k] = sch.at(epoch, step, tr.epochs, len(loader))
                setattr(method, k, values[k])
            return values

        with objective:  # feature hooks registered once for the stage
            stages.fit(
                stage,
                student,
                objective,
                epochs=tr.epochs,
                trainable=objective.module,
                loader=loader,
                on_step=on_step if scheds else None,
            )
        if objective.cache is not None:
            self.caches.publish(teacher)
        stages.export(stage, student, mcfg, {"loss_state": method.state_dict()})
        stages.record(stage, student, mcfg, stage)
        return Teacher(student.eval().requires_grad_(False), stage, None)

    def _teacher_online(self, method) -> bool:
        """Whether a student distilled with ``method`` has its teacher run on fresh views (features, no cache,
        or no epochs) rather than reading the logit cache's replayed views."""
        return bool(method.needs_teacher_features or not self.cfg.cache.enabled or not self.tr.epochs)

    def distil_views(self) -> int | None:
        """The views a student distilled in this run trains on, known before any is: ``data.views`` from the
        logit cache, or None (fresh views) when the teacher runs online. For a baseline trained first."""
        static, _ = schedules.split(loss_kwargs(self.cfg.loss))
        return None if self._teacher_online(LOSSES.get(self.cfg.loss.name, "loss.name")(**static)) else self.data.views

    def ce_model(
        self, stage: str, mcfg, who: str = "student", views: int | None = None, seed_offset: int = 0
    ) -> Teacher:
        """A model trained from scratch with CE only (same init, budget and seed as the students).

        ``views``: as for :meth:`RunData.train_loader`; a baseline passes ``run.student_views`` so it sees
        exactly the images the distilled student saw (e.g. no augmentation with ``cache.views=0``).
        Returned as a possible teacher of a later stage (frozen, named ``stage``).
        """
        stages, data = self.stages, self.data
        model = stages.build(who, mcfg, seed_offset)
        loader = data.train_loader(views, data.student_set)
        stages.fit(stage, model, cross_entropy, epochs=self.tr.epochs, loader=loader)
        stages.export(stage, model, mcfg)
        stages.record(stage, model, mcfg, stage)
        return Teacher(model.eval().requires_grad_(False), stage, None)


def cache_choices(ccfg) -> dict:
    """The ``cache.*`` keys set away from their defaults (views, topk, fill=pass): what a run whose teacher runs
    online does not use."""
    chosen = {k: ccfg.get(k) for k in ("views", "topk") if ccfg.get(k) is not None}
    return chosen | ({"fill": ccfg.fill} if ccfg.get("fill") == "pass" else {})


def run(cfg: DictConfig, run_dir: str) -> dict | None:
    """The whole pipeline; returns the metrics for ``run_dir/metrics.json`` (None on workers other than rank 0)."""
    from kdrun import plugins
    from kdrun.schemes import SCHEMES

    plugins.load(cfg.get("plugins"))  # again in a worker trainer.devices spawned: a fresh interpreter
    t_start = time.perf_counter()
    r = Run(cfg, run_dir)
    if cfg.dataset.get("num_classes") is None or not cfg.dataset.get("image_size"):  # validate() could not yet
        data = r.data.data
        check_method_fits(cfg, data.num_classes, data.in_chans, data.image_size)
    stages = r.stages
    # experiment trackers (logger=[...]), closed (marked failed on an error) when the block ends
    with loggers.build(cfg, run_dir) if distributed.is_main() else loggers.Loggers() as stages.logger:
        roles = SCHEMES.get(cfg.scheme.name, "scheme.name")(r)  # trains teacher(s) and students
        if not distributed.is_main():
            return None

        t0 = time.perf_counter()
        maybe_kill("evaluate", 1)  # testing hook (KDRUN_KILL_AT=evaluate:1): a kill after the stages
        ev = report.evaluate(cfg, r.data, stages, roles)
        predictions.write(run_dir, predictions.collect(cfg, r.data, stages, roles, ev))  # for `kdrun compare`
        stages.log.seconds["evaluate"] = time.perf_counter() - t0
        # the run's time over all its processes: this one's, and the stage time earlier ones recorded in checkpoints
        stages.log.seconds["this_process"] = time.perf_counter() - t_start
        stages.log.seconds["total"] = stages.log.seconds["this_process"] + stages.log.earlier_seconds
        metrics = report.assemble(cfg, r.data, stages, roles, r.refs.refs, ev.scores, ev.logits)
        stages.logger.finish(
            metrics, {role: os.path.join(stages.ckpt_dir, f"{name}.pt") for role, name in roles.items()}
        )
    return metrics
