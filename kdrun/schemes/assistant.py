"""Teacher-assistant distillation (Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant").

teacher -> assistant1 -> ... -> student: each link is an offline distillation
with the configured KD method, the previous link's model as the teacher. The
assistants are models of intermediate size (``scheme.assistants=[resnet14]``, or
items ``{name: mlp, kwargs: {hidden: [300, 300]}}``).
With ``scheme.direct=true`` the same student is also distilled straight from the
teacher (``student_direct``), so the run says what the assistants bought.
Each link teaches frozen (eval mode, no autograd; :meth:`kdrun.train.Run.distil` returns it so), whether
its logits are cached or it runs online (feature methods, ``cache.enabled=false``).
"""

from kdrun.errors import ConfigError
from kdrun.schemes import Pair, model_cfg, register_scheme
from kdrun.train import Roles


def chain(cfg) -> list[Pair]:
    """teacher -> assistant1 -> ... -> student (and teacher -> student with ``scheme.direct``)."""
    models = [("teacher", cfg.teacher)]
    models += [
        (f"scheme.assistants[{i}]", model_cfg(item, cfg.student)) for i, item in enumerate(cfg.scheme.assistants)
    ]
    models += [("student", cfg.student)]
    links = [(*a, *b) for a, b in zip(models, models[1:])]
    return links + ([("teacher", cfg.teacher, "student", cfg.student)] if cfg.scheme.direct else [])


@register_scheme("assistant", pairs=chain)
def assistant(run) -> Roles:
    names = list(run.cfg.scheme.assistants or [])
    if not names:
        raise ConfigError("scheme.assistants: give at least one assistant model, e.g. scheme.assistants=[resnet14]")
    teacher = run.teacher()
    prev = teacher
    for i, item in enumerate(names, start=1):
        mcfg = model_cfg(item, run.cfg.student)
        prev = run.distil(f"assistant{i}", mcfg, prev, who=f"scheme.assistants[{i - 1}]")  # returned frozen
    run.distil("student", run.cfg.student, prev)
    if run.cfg.scheme.direct:
        run.distil("student_direct", run.cfg.student, teacher)
    if run.cfg.baseline:
        run.ce_model("baseline", run.cfg.student, views=run.student_views)
    return Roles(student="student", teacher="teacher", baseline="baseline" if run.cfg.baseline else None)
