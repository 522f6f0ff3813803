"""What a KD method is, for the student stage.

A method is one module in ``kdrun/losses/`` holding a subclass of
:class:`DistillLoss` registered with ``@register_loss("name")``, plus one YAML
in ``configs/loss/``. The student stage computes

    total = ce_weight * CE(y, student_logits) + sum(method terms)

where each method returns its already-weighted terms by name (each one is
logged in the per-epoch CSV). Methods that need features name them in
``teacher_layers`` / ``student_layers`` (feature-point names such as
``stage3`` or module paths); the stage captures them with hooks in the same
forward pass and hands them over in that order. A method whose
``needs_teacher_features`` is False only sees teacher logits, which then come
from the logit cache and the teacher never runs during distillation.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.registry import Registry


@dataclass
class Outputs:
    """One network's outputs for a batch: logits and the requested features."""

    logits: torch.Tensor
    feats: list[torch.Tensor] = field(default_factory=list)


@dataclass
class StepContext:
    """What a loss may know besides the outputs."""

    target: torch.Tensor  # [B] int64 labels
    index: torch.Tensor  # [B] int64 positions of the samples in the training set
    epoch: int  # 0-based
    epochs: int  # total epochs of the stage
    num_samples: int = 0  # size of the training set (memory banks)


def _is_stage(name: str) -> bool:
    """``stage1``, ``stage2``, ...: a model's stage outputs (not ``stage1_preact`` or other variants)."""
    return re.fullmatch(r"stage\d+", name) is not None


def _names(value) -> list[str]:
    """A layer list from config: one name or a list of names."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


class DistillLoss(nn.Module):
    """Base class of every KD method. Parameters (adapters) it owns train with the student."""

    term: str  # the key of its loss term in the logs (``register``: the method's name unless the class sets one)
    needs_teacher_features: bool = False
    # False: its terms train only a stage before the student's (AB's, FSP's initialisation), whose loss is then
    # loss.ce_weight's CE alone: a ce_weight of 0 is refused (the stage would have nothing to minimise)
    trains_student: bool = True
    # key -> (predicate, what is valid): ranges of this method's config values that ``kdrun.config``
    # checks before anything runs, schedules included (e.g. KD's alpha in [0, 1]; DKD's alpha may exceed 1)
    value_rules: ClassVar[dict] = {}
    # A schedule on a key (loss.KEY={schedule: ...}) sets the attribute of the key's name before each step: a
    # method stores each value a schedule may set as self.KEY and reads it there in forward.
    # Keys read once, when the method is built (sizes, counts, a stage's budget), or only by a stage before the
    # student's: a schedule on one is refused, as the method would go on with one value while the logs showed others
    fixed_when_built: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ce_weight: float = 1.0, layers: dict | None = None):
        super().__init__()
        self._ce_weight = float(ce_weight)
        check("ce_weight", ce_weight, ce_weight >= 0, "a number >= 0")
        layers = dict(layers or {})
        unknown = sorted(set(layers) - {"teacher", "student"})
        if unknown:
            raise ConfigError(f"loss.layers.{unknown[0]}: unknown key; valid: student, teacher")
        self.teacher_layers: list[str] = _names(layers.get("teacher"))
        self.student_layers: list[str] = _names(layers.get("student"))

    @property
    def ce_weight(self) -> float:
        """Weight of the hard-label CE term in the student's total loss."""
        return self._ce_weight

    def default_layers(self, teacher_points: list[str], student_points: list[str]) -> tuple[list[str], list[str]]:
        """Layers used when the config names none: by default the last stage both models share by name."""
        stages = shared_stages(teacher_points, student_points)
        return [stages[-1]], [stages[-1]]

    def build(self, t_shapes: list[torch.Size], s_shapes: list[torch.Size], num_samples: int) -> None:
        """Create adapters once the feature shapes are known (called before training)."""

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Called once after :meth:`build` with the frozen teacher, for methods that read its weights
        (OFD's margins come from the teacher's BatchNorms); nothing by default."""

    def pre_stages(self, teacher: nn.Module, student: nn.Module) -> list[PreStage]:
        """Stages this method trains before the student stage (FT's paraphraser, AB's and FSP's
        initialisation of the student); none by default."""
        return []

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass
class PreStage:
    """A stage that a method trains before the student stage (e.g. FT's paraphraser), run by the pipeline
    like any other stage: stage ``<student stage>_<name>``, checkpointed, resumable, logged, timed.

    ``objective(net, batch, epoch) -> {term: loss}`` (the engine's protocol, ``net`` being ``trainable``
    possibly wrapped) is a context manager around the stage (feature hooks; FT's also freezes its
    paraphraser on exit). ``optim`` overrides ``optim.*`` for this stage; ``lr_key`` names the key that sets its LR.
    """

    name: str
    trainable: nn.Module
    objective: Any  # the engine's objective, and a context manager around the stage
    epochs: int
    optim: dict = field(default_factory=dict)
    lr_key: str = "optim.lr"  # the config key that sets this stage's LR (named when its loss turns non-finite)


LOSSES: Registry[type[DistillLoss]] = Registry("KD method", "loss.name")


def register_loss(name: str | None = None):
    """Register a method under ``name``; the name is also the key of its logged term (``cls.term``)."""

    def deco(cls):
        if "term" not in vars(cls):
            cls.term = name or cls.__name__
        return LOSSES.register(name)(cls)

    return deco


def _constructor_parameters(cls: type) -> list[inspect.Parameter]:
    """The parameters of the constructors of ``cls`` and of its DistillLoss bases."""
    return [
        p
        for klass in cls.__mro__
        if "__init__" in vars(klass) and issubclass(klass, DistillLoss)
        for p in inspect.signature(klass.__init__).parameters.values()
    ]


def constructor_params(cls: type) -> list[str]:
    """The keyword arguments a method's config may set: its constructor's and its bases', sorted."""
    return sorted({p.name for p in _constructor_parameters(cls)} - {"self", "kw", "kwargs"})


def check_numbers(cls: type, kwargs: dict, prefix: str = "loss.") -> None:
    """ConfigError ``loss.KEY=VALUE: must be a number`` for each keyword of ``cls``'s constructor (or its
    DistillLoss bases') whose default is a number and whose given value is not (a word, a list, a mapping): the
    methods' own range checks compare numbers."""
    numeric = {
        p.name
        for p in _constructor_parameters(cls)
        if isinstance(p.default, int | float) and not isinstance(p.default, bool)
    }
    for key, value in kwargs.items():
        if key in numeric and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"{prefix}{key}={value}: must be a number")


def shared_stages(teacher_points: list[str], student_points: list[str]) -> list[str]:
    """The ``stageN`` feature points both models have, in the teacher's order; ConfigError if none."""
    stages = [n for n in teacher_points if _is_stage(n) and n in student_points]
    if not stages:
        raise ConfigError(
            "loss.layers: the models share no stage name; name the layers, loss.layers.teacher=[...] of "
            f"{', '.join(teacher_points)} and loss.layers.student=[...] of {', '.join(student_points)}"
        )
    return stages


def preact_stages(method: str, teacher_points: list[str], student_points: list[str]) -> tuple[list[str], list[str]]:
    """Default layers of methods that match pre-activation features (AB, OFD): every shared ``stageN`` as
    the teacher's ``stageN_preact`` and the student's (its ``stageN_preact`` where it has one); ConfigError
    naming the method when the teacher has no pre-activation points."""
    stages = shared_stages(teacher_points, student_points)
    teacher = [f"{s}_preact" for s in stages]
    missing = [n for n in teacher if n not in teacher_points]
    if missing:
        raise ConfigError(
            f"loss.layers: {method} needs the teacher's pre-activation features but the teacher has no "
            f"{missing[0]} point; use a teacher that exposes stageN_preact (e.g. the CIFAR ResNets) "
            "or set loss.layers.teacher=[...]"
        )
    student = [f"{s}_preact" if f"{s}_preact" in student_points else s for s in stages]
    post = [s for s in student if not s.endswith("_preact")]
    said = f"{method}: the student has no pre-activation point (stageN_preact) for {', '.join(post)}"
    if post and said not in _SAID:  # once a process: the command's checks and the run build the method alike
        _SAID.add(said)
        logging.getLogger("kdrun").warning(
            "%s: it matches those post-activation outputs; the method's authors match pre-activation features "
            "(loss.layers.student=[...] chooses others)",
            said,
        )
    return teacher, student


_SAID: set[str] = set()  # warnings of preact_stages already given in this process


def check(key: str, value, ok: bool, valid: str) -> None:
    """Raise ConfigError ``loss.KEY=VALUE: must be VALID`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"loss.{key}={value}: must be {valid}")


def sum_terms(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of one or more loss terms, in order (``sum`` would start from the integer 0, and return it for none)."""
    return functools.reduce(operator.add, terms)


def shape_str(name: str, shape) -> str:
    """``stage3 [64,8,8]``: a feature's name and per-sample shape, for error messages."""
    return f"{name} [{','.join(str(d) for d in tuple(shape)[1:])}]"


class FeatureLoss(DistillLoss):
    """A method on (teacher, student) feature pairs: ``weight * sum over pairs of pair_loss``.

    Subclasses implement ``pair_loss(i, f_s, f_t, ctx)`` and may override
    ``build_pair`` to check a pair's shapes and return its trainable adapter
    (or None). Teacher features are detached before ``pair_loss`` sees them.
    """

    needs_teacher_features = True
    max_pairs: int | None = None  # None: any number of pairs
    min_pairs = 1  # 2: the method relates consecutive layers (fsp, kdsvd)

    def __init__(self, weight: float = 1.0, **kw):
        super().__init__(**kw)
        check("weight", weight, weight >= 0, "a number >= 0")
        self.weight = float(weight)
        self.adapters = nn.ModuleList()

    def build(self, t_shapes, s_shapes, num_samples):
        self.check_pairs()
        self.adapters = nn.ModuleList()
        for i, (ts, ss) in enumerate(zip(t_shapes, s_shapes)):
            adapter = self.build_pair(i, torch.Size(ts), torch.Size(ss), num_samples)
            self.adapters.append(adapter if adapter is not None else nn.Identity())

    def check_pairs(self) -> None:
        """ConfigError unless the teacher and student layer lists pair up as this method needs (also checked when
        the config is read, for layers the config names)."""
        nt, ns = len(self.teacher_layers), len(self.student_layers)
        if nt != ns or nt == 0:
            raise ConfigError(
                f"loss.layers: {nt} teacher and {ns} student layers; give loss.layers.teacher=[...] "
                "and loss.layers.student=[...] of the same non-zero length"
            )
        if self.max_pairs is not None and nt > self.max_pairs:
            raise ConfigError(f"loss.layers: {nt} layer pairs; {self.term} takes at most {self.max_pairs}")
        if nt < self.min_pairs:
            raise ConfigError(
                f"loss.layers: {self.term} relates consecutive layers and needs at least {self.min_pairs} layer "
                f"pairs, got {nt}; e.g. loss.layers.teacher=[stage1,stage2,stage3] (the same for the student)"
            )

    def build_pair(self, i: int, t_shape: torch.Size, s_shape: torch.Size, num_samples: int) -> nn.Module | None:
        return None

    def shape_error(self, i: int, t_shape, s_shape, why: str) -> ConfigError:
        """The ConfigError for an unusable pair: names both layers with their shapes."""
        return ConfigError(
            f"loss.layers: teacher {shape_str(self.teacher_layers[i], t_shape)} and student "
            f"{shape_str(self.student_layers[i], s_shape)}: {why}"
        )

    def pair_loss(self, i: int, f_s: torch.Tensor, f_t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        total = sum_terms(
            self.pair_loss(i, f_s.float(), f_t.detach().float(), ctx)
            for i, (f_s, f_t) in enumerate(zip(s.feats, t.feats))
        )
        return {self.term: self.weight * total}


class RelationLoss(FeatureLoss):
    """A feature method whose default layer is the penultimate vector (``pre_logits``) of both models."""

    def default_layers(self, teacher_points, student_points):
        if "pre_logits" not in teacher_points or "pre_logits" not in student_points:
            raise ConfigError(
                f"loss.layers: {self.term} uses pre_logits by default but a model has none; "
                "set loss.layers.teacher=[...] and loss.layers.student=[...]"
            )
        return ["pre_logits"], ["pre_logits"]
