"""Several registered methods at once, each with its own settings and logged term.

    kdrun train loss=combo '~loss.terms' '+loss.terms={kd: {alpha: 0.9}, at: {weight: 1000}}' loss.ce_weight=1

    total = ce_weight * CE(y, s) + sum over terms of that method's (already weighted) terms

The CE weight of a combo is its own ``ce_weight`` (default 1, as in
RepDistiller's "method + KD" runs) and nothing else: the sub-methods' CE
weights, including KD's implied 1 - alpha, are ignored, and ``ce_weight`` inside
a term is rejected so that nobody expects it to count. A sub-method keeps its
own weights (KD's alpha still scales the KD term).

Feature layers are the concatenation of the feature-using terms' layers, in the
order of ``terms``; each term gets its own slice of the captured features back.
A term may set its own ``layers``; the others get their method's defaults.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.base import (
    LOSSES,
    DistillLoss,
    Outputs,
    StepContext,
    check_numbers,
    constructor_params,
    register_loss,
)


@contextmanager
def _term_keys(name: str):
    """Re-key ConfigErrors raised by a sub-method from ``loss.X`` to ``loss.terms.NAME.X`` (the keys a message
    suggests too)."""
    try:
        yield
    except ConfigError as e:
        msg = str(e)
        if msg.startswith("loss."):
            msg = re.sub(r"(?<![\w.])loss\.(?!terms\.)", f"loss.terms.{name}.", msg)
        raise ConfigError(msg) from None


@register_loss("combo")
class Combo(DistillLoss):
    def __init__(self, terms: dict | None = None, ce_weight: float = 1.0, layers: dict | None = None):
        super().__init__(ce_weight=ce_weight)
        if layers:
            raise ConfigError("loss.layers: a combo has no layers of its own; set loss.terms.NAME.layers")
        if not terms:
            raise ConfigError(
                f"loss.terms: give at least one method, e.g. {{kd: {{}}, at: {{weight: 1000}}}}; "
                f"valid: {', '.join(self._valid())}"
            )
        self.terms: dict[str, DistillLoss] = nn.ModuleDict()  # type: ignore[assignment]  # of DistillLosses
        for name, kwargs in dict(terms).items():
            if name not in LOSSES or name == "combo":
                raise ConfigError(f"loss.terms.{name}: unknown KD method; valid: {', '.join(self._valid())}")
            kwargs = dict(kwargs or {})
            if "ce_weight" in kwargs:
                raise ConfigError(f"loss.terms.{name}.ce_weight: a combo has one CE weight; set loss.ce_weight")
            cls = LOSSES.get(name)
            valid = constructor_params(cls)
            for key in kwargs:
                if key not in valid:
                    raise ConfigError(
                        f"loss.terms.{name}.{key}: not a parameter of loss '{name}'; valid: {', '.join(valid)}"
                    )
            for key, value in kwargs.items():
                if isinstance(value, dict | DictConfig) and "schedule" in value:
                    raise ConfigError(
                        f"loss.terms.{name}.{key}: a term of a combo takes numbers, not schedules (a schedule "
                        f"sets loss.KEY of a single method)"
                    )
            check_numbers(cls, kwargs, prefix=f"loss.terms.{name}.")
            with _term_keys(name):
                self.terms[name] = cls(**kwargs)
        self.needs_teacher_features = any(m.needs_teacher_features for m in self.terms.values())
        self.trains_student = any(m.trains_student for m in self.terms.values())

    @staticmethod
    def _valid() -> list[str]:
        return [n for n in LOSSES.names() if n != "combo"]

    def _feature_terms(self) -> list[tuple[str, DistillLoss]]:
        return [(n, m) for n, m in self.terms.items() if m.needs_teacher_features]

    def _layers(self, side: str) -> list[str]:
        subs = [m for _, m in self._feature_terms()]
        if any(not (m.teacher_layers or m.student_layers) for m in subs):
            return []  # some term still needs its defaults: the pipeline will call default_layers
        return [n for m in subs for n in getattr(m, side)]

    @property
    def teacher_layers(self) -> list[str]:
        return self._layers("teacher_layers") if "terms" in self._modules else []

    @teacher_layers.setter
    def teacher_layers(self, names) -> None:
        self._check_assigned("teacher", names)

    @property
    def student_layers(self) -> list[str]:
        return self._layers("student_layers") if "terms" in self._modules else []

    @student_layers.setter
    def student_layers(self, names) -> None:
        self._check_assigned("student", names)

    def _check_assigned(self, side: str, names) -> None:
        if list(names) != getattr(self, f"{side}_layers"):
            raise ConfigError(f"loss.layers.{side}: a combo's layers come from its terms; set loss.terms.NAME.layers")

    def default_layers(self, teacher_points, student_points):
        for name, m in self._feature_terms():
            if not (m.teacher_layers or m.student_layers):
                with _term_keys(name):
                    m.teacher_layers, m.student_layers = m.default_layers(teacher_points, student_points)
        return self.teacher_layers, self.student_layers

    def _split(self, items: list, side: str) -> dict[str, list]:
        out, start = {}, 0
        for name, m in self._feature_terms():
            n = len(getattr(m, side))
            out[name], start = items[start : start + n], start + n
        return out

    def build(self, t_shapes, s_shapes, num_samples):
        t_split, s_split = self._split(list(t_shapes), "teacher_layers"), self._split(list(s_shapes), "student_layers")
        for name, m in self.terms.items():
            with _term_keys(name):
                m.build(t_split.get(name, []), s_split.get(name, []), num_samples)

    def bind_teacher(self, teacher: nn.Module) -> None:
        for name, m in self.terms.items():
            with _term_keys(name):
                m.bind_teacher(teacher)

    def pre_stages(self, teacher: nn.Module, student: nn.Module) -> list:
        # two terms' stages of one name would share one checkpoint: those are named by their term (student_ab_init)
        stages = [(term, stage) for term, m in self.terms.items() for stage in m.pre_stages(teacher, student)]
        names = [stage.name for _, stage in stages]
        return [
            dataclasses.replace(stage, name=f"{term}_{stage.name}") if names.count(stage.name) > 1 else stage
            for term, stage in stages
        ]

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        t_feats, s_feats = self._split(t.feats, "teacher_layers"), self._split(s.feats, "student_layers")
        out: dict[str, torch.Tensor] = {}
        for name, m in self.terms.items():
            terms = m(Outputs(s.logits, s_feats.get(name, [])), Outputs(t.logits, t_feats.get(name, [])), ctx)
            clash = (set(terms) & set(out)) | (set(terms) & {"ce"})
            if clash:
                raise ConfigError(f"loss.terms.{name}: its term {min(clash)} clashes with another term's")
            out.update(terms)
        return out
