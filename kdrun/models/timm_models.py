"""Models from timm (Wightman, "PyTorch Image Models"), for ``source: timm`` in a model config.

``timm.create_model(name, num_classes=..., in_chans=..., **kwargs)``, untrained, or with
``weights=TAG`` (``teacher.weights``) from timm's pretrained weights ``name.TAG`` (e.g.
``resnet18`` + ``a1_in1k``; ``timm.list_pretrained("resnet18.*")`` lists them): timm loads them from
the Hugging Face hub cache (``$HF_HOME``; downloaded on first use, or ``HF_HUB_OFFLINE=1`` to only read
the cache), makes a new classifier for ``num_classes`` and adapts the stem to ``in_chans``. Feature
points come from the model's ``feature_info`` when it has one (``stem`` for a first entry
at stride <= 2, then ``stage1`` .. ``stageN``), and ``pre_logits`` is the input of the
classifier that ``get_classifier()`` returns.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from torch import nn

from kdrun.errors import ConfigError
from kdrun.io import first_line


def build_timm(
    name: str,
    num_classes: int,
    in_chans: int,
    key: str = "model.name",
    weights: str | None = None,
    **kwargs,
) -> nn.Module:
    group = key.rsplit(".", 1)[0]
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{group}.source=timm: timm is not installed (pip install timm)") from None
    if not timm.is_model(name):
        raise ConfigError(f"{key}={name}: unknown timm model; valid: the names of timm.list_models()")
    full = name
    if weights:
        from kdrun.models.registry import check_weights

        check_weights(name, "timm", weights, group)
        full = f"{name.split('.')[0]}.{weights}"
    try:
        with _quiet_hub():  # its retries log two lines each (a minute of them offline); the failure is one below
            model = timm.create_model(
                full,
                pretrained=bool(weights),
                num_classes=num_classes,
                in_chans=in_chans,
                **kwargs,
            )
    except TypeError as e:
        raise ConfigError(f"{group}.kwargs: not accepted by timm model {name} ({e})") from None
    except Exception as e:  # noqa: BLE001 (not in the hub cache and no network, or a damaged file in it)
        detail = f"{type(e).__name__}: {first_line(e)}"
        if not weights:
            raise ConfigError(f"{group}.name={name}: timm could not build it ({detail})") from None
        cfg = timm.models.get_pretrained_cfg(full)
        repo = getattr(cfg, "hf_hub_id", None) or "?"
        file = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
        raise ConfigError(
            f"{group}.weights={weights}: timm could not load {full} from the Hugging Face hub ({repo}, {file}; "
            f"{detail}); run once online to fill the hub cache ($HF_HOME), then HF_HUB_OFFLINE=1 reads it there "
            f"(remove a damaged file first), or give {group}.kwargs.pretrained_cfg_overlay={{file: PATH}}"
        ) from None
    from kdrun.models.registry import set_feature_points, set_new_parameters

    set_feature_points(model, feature_points(model))
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if weights and pretrained_classes not in (None, num_classes):
        # timm made a new classifier for num_classes: its weights are not the pretrained ones
        set_new_parameters(model, [f"the classifier ({pretrained_classes} classes in the weights)"])
    return model


@contextmanager
def _quiet_hub():
    """huggingface_hub's own log lines (retries, warnings) held back for the block."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        hub.setLevel(level)


def pretrained_tags(name: str, group: str = "model") -> list[str]:
    """The pretrained tags timm knows for model ``name`` (``resnet18`` -> ``a1_in1k``, ``tv_in1k``...)."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{group}.source=timm: timm is not installed (pip install timm)") from None
    arch = name.split(".")[0]
    return [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*") if "." in t]


def feature_points(model: nn.Module) -> dict[str, str]:
    entries = [e for e in (getattr(model, "feature_info", None) or []) if isinstance(e, dict) and e.get("module")]
    points: dict[str, str] = {}
    if len(entries) > 1 and entries[0].get("reduction", 32) <= 2:
        points["stem"] = entries.pop(0)["module"]
    points |= {f"stage{i + 1}": e["module"] for i, e in enumerate(entries)}
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    path = next((p for p, m in model.named_modules() if m is head and p), None)
    if path is not None and isinstance(head, nn.Linear):
        points["pre_logits"] = f"{path}:input"
    return points
