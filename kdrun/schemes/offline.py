"""Offline distillation (Hinton et al. 2015): a trained, frozen teacher teaches the student."""

from kdrun.schemes import register_scheme
from kdrun.train import Roles


@register_scheme("offline", pairs=lambda cfg: [("teacher", cfg.teacher, "student", cfg.student)])
def offline(run) -> Roles:
    """teacher (train or reuse) -> logit cache -> distilled student; plus the CE-only baseline."""
    teacher = run.teacher()
    run.distil("student", run.cfg.student, teacher)
    if run.cfg.baseline:
        run.ce_model("baseline", run.cfg.student, views=run.student_views)
    return Roles(student="student", teacher="teacher", baseline="baseline" if run.cfg.baseline else None)
