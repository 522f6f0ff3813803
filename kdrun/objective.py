"""The sweep objective: the one number a sweeper (Optuna) maximises, named by ``sweep.metric``.

``sweep.metric=MODEL.MEASURE`` where MODEL is a role (``student``, ``teacher``,
``baseline``) or a model name of the run (``peer2``, ``gen3``, ``assistant1``,
``student_direct``), and MEASURE is ``val_top1`` (last epoch, on the validation
split held out of the training data with ``trainer.val_fraction > 0``) or
``best_val_top1`` (the best epoch on that split). The default is
``student.val_top1``. Test-set figures are refused: choosing hyperparameters on
the test set makes its accuracy an optimistic estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdrun.errors import ConfigError

DEFAULT = "student.val_top1"
MEASURES = ("val_top1", "best_val_top1")
VALID = f"MODEL.{' or MODEL.'.join(MEASURES)} with MODEL a role (student, teacher, baseline) or a model name"


@dataclass(frozen=True)
class Metric:
    model: str
    measure: str

    def __str__(self) -> str:
        return f"{self.model}.{self.measure}"


def parse(spec: str | None) -> Metric:
    """The metric named by ``sweep.metric`` (None: the default); ConfigError naming the key otherwise."""
    spec = DEFAULT if spec is None else str(spec)
    model, _, measure = spec.rpartition(".")
    if "test" in measure or "test" in model.split("_"):
        raise ConfigError(
            f"sweep.metric={spec}: a test-set metric cannot be optimised (hyperparameters chosen on "
            f"the test set overstate its accuracy); use a validation metric: {VALID}"
        )
    if not model or measure not in MEASURES:
        raise ConfigError(f"sweep.metric={spec}: unknown metric; valid: {VALID}")
    return Metric(model, measure)


def value(metrics: dict, metric: Metric) -> float:
    """The metric's value in a run's ``metrics.json`` content; NaN when the run has no such figure
    (e.g. no validation split), which sweepers treat as a failed trial."""
    name = metrics.get("roles", {}).get(metric.model, metric.model)
    stages = metrics.get("stages", {})
    key = "final_val_top1" if metric.measure == "val_top1" else "best_val_top1"
    v = (stages.get(name) or {}).get(key)
    if v is None and metric.measure == "val_top1":  # models trained together in one stage (scheme=online)
        for stage in stages.values():
            v = (stage.get("val_top1_by_model") or {}).get(name) if isinstance(stage, dict) else None
            if v is not None:
                break
    return float(v) if v is not None else math.nan


def why_missing(metrics: dict, metric: Metric) -> str | None:
    """Why ``metrics`` holds no value of ``metric`` when it names a model the run does not have (e.g. a typo in
    ``sweep.metric``): every trial would fail without a word; None when the model is there."""
    roles = metrics.get("roles", {})
    name = roles.get(metric.model, metric.model)
    models = set(metrics.get("test", {})) | set(metrics.get("stages", {})) | set(roles)
    if name in models:
        return None
    return f"sweep.metric={metric}: this run has no model {metric.model!r}; valid: {', '.join(sorted(models))}"
