"""Offline distillation (Hinton et al. 2015): a trained, frozen teacher teaches the student."""

from kdrun.schemes import register_scheme


@register_scheme("offline")
def offline(run) -> None:
    """teacher (train or reuse) -> logit cache -> distilled student; plus the CE-only baseline."""
    teacher = run.teacher()
    run.distil("student", run.cfg.student, teacher, teacher_key=run.teacher_key)
    run.roles["student"] = "student"
    if run.cfg.baseline:
        run.ce_model("baseline", run.cfg.student, views=run.student_views)
        run.roles["baseline"] = "baseline"
