"""Schedules for loss hyperparameters (temperature, alpha, any weight).

In YAML a hyperparameter is either a number or a schedule:

    temperature: {schedule: linear, start: 8, end: 1}            # per epoch (default)
    alpha: {schedule: cosine, start: 0.1, end: 0.9, per: step}
    weight: {schedule: step, values: [0, 1000], milestones: [5]}  # 0 before epoch 5, then 1000

Kinds: ``constant`` (value), ``linear`` and ``cosine`` (start -> end over the
stage), ``step`` (``values[i]`` after ``milestones[i-1]``, in epochs or steps).
With ``per: epoch`` the value changes at each epoch start: epoch e of E has
progress e / (E - 1); with ``per: step`` it changes every optimiser step.
The value in effect is logged in the stage's per-epoch CSV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdrun.errors import ConfigError

KINDS = ("constant", "linear", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    kind: str
    start: float
    end: float
    values: tuple[float, ...] = ()
    milestones: tuple[int, ...] = ()
    per: str = "epoch"

    def at(self, epoch: int, step: int, epochs: int, steps_per_epoch: int) -> float:
        """The value in effect at (0-based) ``epoch``, ``step``."""
        if self.per == "step":
            pos, total = epoch * steps_per_epoch + step, epochs * steps_per_epoch
        else:
            pos, total = epoch, epochs
        if self.kind == "step":
            return self.values[sum(pos >= m for m in self.milestones)]
        t = min(1.0, pos / max(1, total - 1))
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * t))
        return self.start

    def values_reached(self) -> list[float]:
        """Every value the schedule can take at its ends (for range checks)."""
        return list(self.values) if self.kind == "step" else [self.start, self.end]


def parse(key: str, spec) -> Schedule:
    """A schedule from its YAML mapping; errors name ``key``."""
    spec = dict(spec)
    kind = spec.pop("schedule", None)
    if kind not in KINDS:
        raise ConfigError(f"{key}.schedule={kind}: unknown schedule; valid: {', '.join(KINDS)}")
    per = spec.pop("per", "epoch")
    if per not in ("epoch", "step"):
        raise ConfigError(f"{key}.per={per}: must be epoch or step")
    allowed = {
        "constant": {"value"},
        "linear": {"start", "end"},
        "cosine": {"start", "end"},
        "step": {"values", "milestones"},
    }[kind]
    for k in spec:
        if k not in allowed:
            raise ConfigError(
                f"{key}.{k}: not a key of a {kind} schedule; valid: schedule, per, {', '.join(sorted(allowed))}"
            )
    for k in allowed:
        if k not in spec:
            raise ConfigError(f"{key}.{k}: missing; a {kind} schedule needs {', '.join(sorted(allowed))}")

    def num(k, v):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{key}.{k}={v}: must be a number")
        return float(v)

    if kind == "constant":
        v = num("value", spec["value"])
        return Schedule(kind, v, v, per=per)
    if kind == "step":
        values = tuple(num("values", v) for v in spec["values"])
        milestones = tuple(int(m) for m in spec["milestones"])
        if len(values) != len(milestones) + 1 or list(milestones) != sorted(milestones):
            raise ConfigError(
                f"{key}: a step schedule needs increasing milestones and one more value than "
                f"milestones (got {len(values)} values, {len(milestones)} milestones)"
            )
        return Schedule(kind, values[0], values[-1], values, milestones, per)
    return Schedule(kind, num("start", spec["start"]), num("end", spec["end"]), per=per)


def split(kwargs: dict, prefix: str = "loss") -> tuple[dict, dict[str, Schedule]]:
    """Constructor kwargs with each schedule replaced by its first value, and the schedules by name."""
    static, schedules = {}, {}
    for k, v in kwargs.items():
        if isinstance(v, dict) and "schedule" in v:
            schedules[k] = parse(f"{prefix}.{k}", v)
            static[k] = schedules[k].at(0, 0, 1, 1)
        else:
            static[k] = v
    return static, schedules
