"""Torchvision's ImageNet classifiers (untrained), adapted to any channel count and small images.

``resnet18/34/50`` (He et al., 2016), ``mbv2`` (MobileNetV2, Sandler et al., 2018),
``mbv3_small/mbv3_large`` (MobileNetV3, Howard et al., 2019) and ``shufflenet_v2``
(ShuffleNetV2 1.0x, Ma et al., 2018), built by ``torchvision.models`` with ``num_classes``;
the stem convolution takes ``in_chans`` channels. The ResNets start with the last BN of each
residual branch at zero (Goyal et al., 2017), which keeps ResNet-50 trained from scratch at
SGD lr 0.05 from diverging in its first steps.

Small-input mode (kwarg ``small_input``; ``null`` = on when ``img_size <= 64``): the stem
is a 3x3 stride-1 convolution, the early max-pool is removed, and a later downsampling
block that would shrink the map below 2x2 runs at stride 1. A 32 px input then ends at
4x4 (ResNets, ShuffleNetV2) or 2x2 (MobileNets); an 8 px input ends at 2x2.

Pretrained weights (``teacher.weights=IMAGENET1K_V1``, a name of torchvision's weights API, or
``DEFAULT``): the architecture stays exactly the one built without weights (so checkpoints, exports
and ``teacher.checkpoint`` work the same) and every pretrained tensor whose shape fits is loaded.
The stem keeps its pretrained kernel when the kernel size matches, adapted to ``in_chans`` (summed
over RGB for one channel, as timm does); the small-input 3x3 stem and the classifier for the
dataset's classes start new. The file comes from torch's hub cache (``$TORCH_HOME/hub/checkpoints``),
downloaded on first use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torchvision.models as tv
from torch import nn

from kdrun.errors import ConfigError
from kdrun.io import first_line, sha256_file
from kdrun.models.registry import PRETRAINED_FROM, register_model, set_new_parameters

log = logging.getLogger("kdrun")

_RESNET_POINTS = {
    "stem": "maxpool",
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "stage4": "layer4",
    "pre_logits": "fc:input",
}


def _stem_conv(old: nn.Conv2d, in_chans: int, small: bool) -> nn.Conv2d:
    k, s = (3, 1) if small else (old.kernel_size[0], old.stride[0])
    conv = nn.Conv2d(in_chans, old.out_channels, k, s, k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _relax_strides(blocks, size: int, min_size: int = 2) -> None:
    """Run each downsampling block at stride 1 once halving would take the map below ``min_size``."""
    for block in blocks:
        strided = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        if not strided:
            continue
        if size // 2 >= min_size:
            size = (size + 1) // 2
        else:
            for m in strided:
                m.stride = (1, 1)


def _resnet(make: Callable, num_classes: int, in_chans: int, img_size: int, small: bool) -> nn.Module:
    model = make(num_classes=num_classes, zero_init_residual=True)
    model.conv1 = _stem_conv(model.conv1, in_chans, small)
    if small:
        model.maxpool = nn.Identity()
        _relax_strides([model.layer2[0], model.layer3[0], model.layer4[0]], img_size)
    model.feature_points = dict(_RESNET_POINTS)
    return model


def _shufflenet(num_classes: int, in_chans: int, img_size: int, small: bool) -> nn.Module:
    model = tv.shufflenet_v2_x1_0(num_classes=num_classes)
    model.conv1[0] = _stem_conv(model.conv1[0], in_chans, small)
    if small:
        model.maxpool = nn.Identity()
        _relax_strides([model.stage2[0], model.stage3[0], model.stage4[0]], img_size)
    model.feature_points = {
        "stem": "maxpool",
        "stage1": "stage2",
        "stage2": "stage3",
        "stage3": "stage4",
        "stage4": "conv5",
        "pre_logits": "fc:input",
    }
    return model


def _mobilenet(
    make: Callable,
    stages: tuple[int, ...],
    pre_logits: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    small: bool,
) -> nn.Module:
    model = make(num_classes=num_classes)
    model.features[0][0] = _stem_conv(model.features[0][0], in_chans, small)
    if small:
        _relax_strides(list(model.features)[1:], img_size)
    model.feature_points = {"stem": "features.0"} | {f"stage{i + 1}": f"features.{j}" for i, j in enumerate(stages)}
    model.feature_points["pre_logits"] = pre_logits  # before the classifier's dropout, as the teacher's is read
    for m in model.classifier.modules():  # MobileNetV3's dropout works in place: pre_logits would be read after it
        if isinstance(m, nn.Dropout):
            m.inplace = False
    # inverted residual blocks end linear (no activation after the projection): each stage's output is its own
    # pre-activation feature (AB, OFD, ReviewKD)
    model.feature_points |= {f"stage{i + 1}_preact": f"features.{j}" for i, j in enumerate(stages)}
    return model


def _small(small_input, img_size: int) -> bool:
    if small_input is None:
        return img_size <= 64
    if not isinstance(small_input, bool):
        raise ConfigError(f"kwargs.small_input={small_input}: not a boolean; valid: true, false, null")
    return small_input


def pretrained_state(tv_name: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision weights ``weights`` of builder ``tv_name`` (from the hub cache, or
    downloaded there); ConfigError ``weights=...`` naming the valid names, the file to provide, or a file
    in the cache that is not torchvision's (its SHA-256 does not begin with the prefix in its name) or
    cannot be read."""
    import contextlib
    import io
    from urllib.error import URLError

    enum = tv.get_model_weights(tv_name)
    valid = [w.name for w in enum]
    if weights not in valid and weights != "DEFAULT":
        raise ConfigError(
            f"weights={weights}: not a torchvision weights name of {tv_name}; valid: {', '.join(valid + ['DEFAULT'])}"
        )
    w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
    cached = os.path.exists(path)
    if cached:  # torch.hub checks the hash of what it downloads, never of a file already in its cache
        check_hub_file(path, f"weights={weights}", w.url)
    else:
        log.info("weights %s: downloading %s to %s", weights, w.url, path)
    try:
        # torch.hub's own "Downloading" line (to stdout); unpickled as tensors alone, on the CPU, like every file
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            state = w.get_state_dict(progress=False, check_hash=True, weights_only=True, map_location="cpu")
    except (URLError, OSError) as e:
        if cached:
            raise ConfigError(f"weights={weights}: {path} cannot be read ({type(e).__name__})") from None
        raise ConfigError(
            f"weights={weights}: {os.path.basename(w.url)} is not in the hub cache and cannot be "
            f"downloaded ({type(e).__name__}); place it at {path} (from {w.url})"
        ) from None
    except Exception as e:  # noqa: BLE001 (a download with another hash, or a file torch cannot read)
        why = f"{type(e).__name__}: {first_line(e)}"
        if not os.path.exists(path):  # torch.hub removes a download whose hash is not the one in its name
            raise ConfigError(
                f"weights={weights}: the file downloaded from {w.url} is not torchvision's ({why}); nothing was "
                f"kept: retry, or place the file at {path}"
            ) from None
        raise ConfigError(
            f"weights={weights}: {path} is not torchvision's file ({why}); remove it and place the one from {w.url}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights={weights}: {path} is not a state_dict; remove it and place the one from {w.url}")
    return state


def check_hub_file(path: str, what: str, url: str) -> None:
    """ConfigError naming ``what`` when the file at ``path`` is not the one its name promises: torch.hub
    names its files ``<name>-<first hex digits of the file's SHA-256>.<ext>``."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    if match is None:
        return
    digest = sha256_file(path)
    if not digest.startswith(match.group(1)):
        raise ConfigError(
            f"{what}: {path} is not torchvision's file (its SHA-256 begins {digest[: len(match.group(1))]}, "
            f"its name says {match.group(1)}: damaged or another file); remove it and place the one from {url}"
        )


def resolved_weights(tv_name: str, weights: str) -> str:
    """The weights' own name: ``DEFAULT`` is whichever weights this torchvision version recommends."""
    return tv.get_model_weights(tv_name).DEFAULT.name if weights == "DEFAULT" else weights


def _adapt_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """An RGB stem kernel for ``in_chans`` input channels: summed for 1, tiled and rescaled otherwise."""
    if in_chans == weight.shape[1]:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def load_fitting(model: nn.Module, state: dict[str, torch.Tensor], in_chans: int) -> list[str]:
    """Copy every tensor of ``state`` whose shape fits ``model`` (stem kernels adapted to ``in_chans``);
    returns the names of the model's tensors left as initialised (new)."""
    own = model.state_dict()
    new = []
    for key, target in own.items():
        src = state.get(key)
        if src is not None and src.dim() == 4 and src.shape[1] == 3 and target.shape[1] == in_chans != 3:
            src = _adapt_channels(src, in_chans)
        if src is not None and src.shape == target.shape:
            own[key] = src.to(target.dtype)
        else:
            new.append(key)
    model.load_state_dict(own)
    return new


def _register(name: str, doc: str, build_fn: Callable, tv_name: str) -> None:
    @register_model(name)
    def build(
        num_classes: int,
        in_chans: int = 3,
        img_size: int = 32,
        small_input: bool | None = None,
        weights: str | None = None,
    ):
        model = build_fn(num_classes, in_chans, img_size, _small(small_input, img_size))
        if weights:
            new = load_fitting(model, pretrained_state(tv_name, weights), in_chans)
            params = {k for k, _ in model.named_parameters()}
            fresh = [k for k in new if k in params]
            set_new_parameters(model, fresh)
            log.info(
                "%s: pretrained %s loaded; new (not in the weights or another shape): %s",
                name,
                weights,
                ", ".join(fresh) or "none",
            )
        return model

    build.__doc__ = doc
    PRETRAINED_FROM[name] = tv_name


def _resnet_builder(make: Callable) -> Callable:
    return lambda n, c, s, small: _resnet(make, n, c, s, small)


def _mobilenet_builder(make: Callable, stages: tuple[int, ...], pre_logits: str) -> Callable:
    return lambda n, c, s, small: _mobilenet(make, stages, pre_logits, n, c, s, small)


_register(
    "resnet18",
    "torchvision ResNet-18 (kwarg small_input: 3x3 stem, no max-pool).",
    _resnet_builder(tv.resnet18),
    "resnet18",
)
_register(
    "resnet34",
    "torchvision ResNet-34 (kwarg small_input: 3x3 stem, no max-pool).",
    _resnet_builder(tv.resnet34),
    "resnet34",
)
_register(
    "resnet50",
    "torchvision ResNet-50, bottleneck (kwarg small_input).",
    _resnet_builder(tv.resnet50),
    "resnet50",
)
# stage ends: the last block at each resolution (strides 4, 8, 16, 32 at ImageNet sizes)
_register(
    "mbv2",
    "torchvision MobileNetV2 1.0x (kwarg small_input).",
    _mobilenet_builder(tv.mobilenet_v2, (3, 6, 13, 17), "classifier:input"),
    "mobilenet_v2",
)
_register(
    "mbv3_small",
    "torchvision MobileNetV3-Small (kwarg small_input).",
    _mobilenet_builder(tv.mobilenet_v3_small, (1, 3, 8, 11), "classifier.2:input"),
    "mobilenet_v3_small",
)
_register(
    "mbv3_large",
    "torchvision MobileNetV3-Large (kwarg small_input).",
    _mobilenet_builder(tv.mobilenet_v3_large, (3, 6, 12, 15), "classifier.2:input"),
    "mobilenet_v3_large",
)
_register(
    "shufflenet_v2",
    "torchvision ShuffleNetV2 1.0x (kwarg small_input).",
    _shufflenet,
    "shufflenet_v2_x1_0",
)
