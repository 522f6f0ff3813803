"""Model registry.

A model factory has the signature ``fn(num_classes, in_chans, img_size, **kwargs)``
and returns an ``nn.Module`` whose forward maps images ``[B, C, H, W]`` to logits
``[B, num_classes]``. Each model sets ``model.feature_points``: a dict from
stable names (``stage1`` .. ``stageN``, ``pre_logits``, ``logits``) to the module
path whose output is that feature (``"layer3"``), or ``"path:input"`` for the
input of a module (``"fc:input"`` is the pooled feature before the classifier).
Feature- and relation-based losses ask for features by these names, or by any
module path; see :mod:`kdrun.models.features`.

Factories that reject a keyword value raise ``ConfigError("kwargs.NAME=VALUE: ...")``;
:func:`build_model` prefixes the config group (``student.kwargs.NAME=...``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from kdrun.errors import ConfigError
from kdrun.registry import Registry

ModelFn = Callable[..., nn.Module]

MODELS: Registry[ModelFn] = Registry("model", "model.name")
register_model = MODELS.register
SOURCES = ("kdrun", "timm")
# kdrun model name -> the torchvision builder whose pretrained weights it takes (``weights=...``)
PRETRAINED_FROM: dict[str, str] = {}


def feature_points(model: nn.Module) -> dict[str, str]:
    """The model's ``feature_points`` (empty for a model that names none)."""
    points = getattr(model, "feature_points", None)
    return points if isinstance(points, dict) else {}


def set_feature_points(model: nn.Module, points: dict[str, str]) -> None:
    # nn.Module.__setattr__'s annotation admits only Tensor | Module; at run time it stores any other value as is
    model.feature_points = points  # type: ignore[assignment]


def sets_from_data(name: str, source: str = "kdrun") -> bool:
    """Whether model ``name`` sets part of itself from training images before training (``init_from_data``);
    its factory says so with a ``sets_from_data = True`` attribute."""
    return source == "kdrun" and name in MODELS.names() and bool(getattr(MODELS.get(name), "sets_from_data", False))


def set_new_parameters(model: nn.Module, names: list[str]) -> None:
    """Mark what pretrained weights did not provide (a classifier for another class count): a teacher built so
    is not used untrained (``trainer.teacher_epochs=0`` is refused)."""
    model.new_parameters = names  # type: ignore[assignment]


def build_model(
    name: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    key: str = "model.name",
    source: str = "kdrun",
    weights: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build model ``name`` from ``source`` ("kdrun": this registry; "timm": ``timm.create_model``).

    ``weights``: pretrained weights to start from (torchvision weights names for the torchvision
    models, a pretrained tag for timm models); the classifier is new, for ``num_classes``."""
    group = key.rsplit(".", 1)[0]
    if source == "timm":
        from kdrun.models.timm_models import build_timm

        model = build_timm(name, num_classes, in_chans, key, weights=weights, **kwargs)
    elif source == "kdrun":
        fn = MODELS.get(name, key)
        _check_kwargs(fn, name, group, kwargs)
        if weights:
            check_weights(name, source, weights, group)
            kwargs["weights"] = weights
        try:
            model = fn(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
        except ConfigError as e:
            if str(e).startswith(("kwargs.", "weights=")):
                raise ConfigError(f"{group}.{e}") from None
            raise
    else:
        raise ConfigError(f"{group}.source={source}: unknown model source; valid: {', '.join(SOURCES)}")
    points = feature_points(model)
    points.setdefault("logits", "")  # "" = the model's own output
    set_feature_points(model, points)
    return model


def check_weights(name: str, source: str, weights: str, group: str = "model") -> None:
    """ConfigError ``{group}.weights=...`` when model ``name`` has no pretrained weights of that name
    (checked without loading or downloading anything)."""
    if source == "timm":
        from kdrun.models.timm_models import pretrained_tags

        tags = pretrained_tags(name, group)
        if weights not in tags:
            raise ConfigError(
                f"{group}.weights={weights}: no such pretrained tag for timm model {name}; "
                f"valid: {', '.join(tags) or '(none)'}"
            )
        return
    MODELS.get(name, f"{group}.name")  # ConfigError for an unknown name
    tv_name = PRETRAINED_FROM.get(name)
    if tv_name is None:
        with_weights = sorted(PRETRAINED_FROM)
        raise ConfigError(
            f"{group}.weights={weights}: model {name} has no pretrained weights; models with "
            f"weights: {', '.join(with_weights)} (or source=timm)"
        )
    import torchvision.models as tv

    valid = [w.name for w in tv.get_model_weights(tv_name)] + ["DEFAULT"]
    if weights not in valid:
        raise ConfigError(
            f"{group}.weights={weights}: not a torchvision weights name of {name}; valid: {', '.join(valid)}"
        )


def weights_name(name: str, source: str, weights: str) -> str:
    """The pretrained weights ``weights`` of model ``name`` by a name that always means the same file:
    torchvision's ``DEFAULT`` resolved to the weights it stands for in this torchvision version."""
    tv_name = PRETRAINED_FROM.get(name) if source != "timm" else None
    if tv_name is None:
        return weights
    from kdrun.models.torchvision_models import resolved_weights

    return resolved_weights(tv_name, weights)


def model_kwargs(fn: ModelFn) -> list[str] | None:
    """The keyword options a factory accepts beyond num_classes/in_chans/img_size (None: any)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("num_classes", "in_chans", "img_size", "weights")]


def _check_kwargs(fn: ModelFn, name: str, group: str, kwargs: dict) -> None:
    valid = model_kwargs(fn)
    if valid is None:
        return
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ConfigError(
            f"{group}.kwargs.{unknown[0]}: not an option of model {name}; valid: {', '.join(valid) or '(none)'}"
        )
