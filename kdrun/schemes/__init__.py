"""Distillation schemes: each module registers one function ``fn(run)`` by name (``scheme=NAME``).

A scheme combines the building blocks of :class:`kdrun.train.Run` (``teacher()``,
``distil()``, ``ce_model()``; the services ``run.data`` and ``run.stages``) and returns
its :class:`kdrun.train.Roles` (which model is the teacher, the student, the
baseline) so the report knows which model plays which part. It also says which (teacher, student) model configs
it distils with the configured KD method (``pairs``), so a method that cannot join them is refused before
anything trains (:func:`kdrun.config.validate`).
"""

from collections.abc import Callable
from typing import Any

from kdrun.registry import Registry

SCHEMES: Registry[Callable[[Any], Any]] = Registry("scheme", "scheme.name")  # fn(run: Run) -> Roles

# (teacher's config key, teacher config, student's config key, student config) of one distillation
Pair = tuple[str, Any, str, Any]


def register_scheme(name: str, pairs: Callable[[Any], list[Pair]]):
    """Register ``fn(run) -> Roles`` as scheme ``name``; ``pairs(cfg)``: the model pairs it distils (teacher ->
    student) with the configured KD method, in the order it trains them."""

    def deco(fn):
        fn.pairs = pairs
        return SCHEMES.register(name)(fn)

    return deco


def pairs_of(cfg) -> list[Pair]:
    """The (teacher, student) model pairs ``cfg``'s scheme distils with its KD method."""
    return SCHEMES.get(cfg.scheme.name, "scheme.name").pairs(cfg)  # type: ignore[attr-defined]


def model_cfg(item, student):
    """A model config from a scheme list item: a model name or ``{name: ..., kwargs: {...}}``.

    A bare name equal to the student's model gives the student's own config (with its kwargs).
    """
    from omegaconf import OmegaConf

    if isinstance(item, str):
        if item == student.name:
            return student
        item = {"name": item}
    fields = item if isinstance(item, dict) else OmegaConf.to_container(item, resolve=True)
    return OmegaConf.create({"name": None, "kwargs": {}, "pretrained": None, "source": "kdrun"} | fields)


def note_unused(run, scheme: str, peers: bool = False) -> None:
    """Say which settings a scheme that trains no teacher leaves unused: the teacher's (info: the default config
    always names one) and, with ``peers`` (``scheme=online``: the peers train together on fresh views with their own
    KL), the logit cache's set away from their defaults and the KD method's values that differ from its defaults
    (a warning)."""
    import inspect
    import logging

    from kdrun import distributed
    from kdrun.config import loss_kwargs
    from kdrun.losses import LOSSES
    from kdrun.train import cache_choices

    if not distributed.is_main():  # said once, not by every data-parallel worker
        return
    log = logging.getLogger("kdrun")
    cfg = run.cfg
    log.info(
        "scheme=%s trains no teacher: teacher=%s and trainer.teacher_epochs are not used", scheme, cfg.teacher.name
    )
    if not peers:
        return
    defaults = inspect.signature(LOSSES.get(cfg.loss.name)).parameters
    unused = [f"cache.{k}={v}" for k, v in cache_choices(cfg.cache).items()]
    unused += [f"loss.{k}={v}" for k, v in loss_kwargs(cfg.loss).items() if k in defaults and v != defaults[k].default]
    if unused:
        log.warning(
            "scheme=%s: %s not used (the peers learn from each other on fresh views through their own KL: "
            "scheme.temperature, scheme.kl_weight)",
            scheme,
            ", ".join(unused),
        )


from kdrun.schemes import assistant, offline, online, self_distill  # noqa: E402,F401  (registers)
