"""Teacher-assistant distillation (Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant").

teacher -> assistant1 -> ... -> student: each link is an offline distillation
with the configured KD method, the previous link's model as the teacher. The
assistants are models of intermediate size (``scheme.assistants=[resnet14]``, or
items ``{name: mlp, kwargs: {hidden: [300, 300]}}``).
With ``scheme.direct=true`` the same student is also distilled straight from the
teacher (``student_direct``), so the run says what the assistants bought.
Each link teaches frozen (eval mode, no autograd: :func:`kdrun.distill.freeze`), whether
its logits are cached or it runs online (feature methods, ``cache.enabled=false``).
"""

from kdrun.distill import freeze
from kdrun.errors import ConfigError
from kdrun.schemes import model_cfg, register_scheme


@register_scheme("assistant")
def assistant(run) -> None:
    names = list(run.cfg.scheme.assistants or [])
    if not names:
        raise ConfigError("scheme.assistants: give at least one assistant model, e.g. scheme.assistants=[resnet14]")
    teacher = run.teacher()
    prev, prev_name, prev_key = teacher, "teacher", run.teacher_key
    for i, item in enumerate(names, start=1):
        mcfg = model_cfg(item, run.cfg.student)
        stage = f"assistant{i}"
        prev = run.distil(
            stage, mcfg, freeze(prev), teacher_name=prev_name, teacher_key=prev_key, who=f"scheme.assistants[{i - 1}]"
        )
        prev_name, prev_key = stage, None
    run.distil("student", run.cfg.student, freeze(prev), teacher_name=prev_name)
    run.roles["student"] = "student"
    if run.cfg.scheme.direct:
        run.distil("student_direct", run.cfg.student, teacher, teacher_key=run.teacher_key)
    if run.cfg.baseline:
        run.ce_model("baseline", run.cfg.student, views=run.student_views)
        run.roles["baseline"] = "baseline"
