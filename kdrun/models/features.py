"""Capture intermediate features in one forward pass, by name, with hooks.

Models are never rewritten to return feature dicts: a forward hook on the
module named by ``model.feature_points[name]`` (or any module path such as
``layer3.1.conv2``) stores its output while the normal forward runs.

    with FeatureTap(model, ["stage2", "pre_logits"]) as tap:
        logits = model(x)
    feats = tap.features          # {"stage2": tensor, "pre_logits": tensor}

A training stage registers its taps once (``tap = FeatureTap(model, names).attach()`` ...
``tap.close()``), on the original modules: a ``torch.compile``d or DDP-wrapped model runs the same
submodules, so the hooks fire there too (paths never carry ``_orig_mod.`` or ``module.``).
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn

from kdrun.errors import ConfigError


def unwrap(model: nn.Module) -> nn.Module:
    """The original module under ``torch.compile`` and DDP wrappers (whose paths carry a prefix)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def resolve(model: nn.Module, name: str) -> tuple[str, str]:
    """Map a feature name to (module path, "output"|"input")."""
    model = unwrap(model)
    points = getattr(model, "feature_points", {})
    spec = points.get(name, name)
    path, _, io = spec.partition(":")
    io = io or "output"
    modules = dict(model.named_modules())
    if path not in modules or io not in ("output", "input"):
        valid = sorted(points) + ["<any module path, e.g. " + _example(modules) + ">"]
        raise ConfigError(f"unknown feature layer '{name}' for {type(model).__name__}; valid: {', '.join(valid)}")
    return path, io


def _example(modules: dict) -> str:
    paths = [p for p in modules if p.count(".") >= 1]
    return paths[len(paths) // 2] if paths else next(iter(modules), "")


def _version(t) -> int | None:
    if torch.compiler.is_compiling():  # a compiled graph's counters are not the returned tensor's: no check there
        return None
    try:
        return t._version
    except (AttributeError, RuntimeError):  # not a tensor, or an inference tensor (no version counter)
        return None


class Captured(dict):
    """Feature name -> the tensor its hook captured. Reading one that an in-place operation changed after its
    capture raises instead of handing over another layer's values: e.g. a BatchNorm output in torchvision's
    residual block, where ``out += identity`` and an in-place ReLU follow the tapped module."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[str, int | None] = {}

    def capture(self, name: str, value) -> None:
        self[name] = value
        self.versions[name] = _version(value)

    def __getitem__(self, name: str):
        value = super().__getitem__(name)
        was = self.versions.get(name)
        if was is not None and _version(value) != was:
            raise ConfigError(
                f"feature layer '{name}': an in-place operation later in the forward pass (such as `out += "
                "identity` or ReLU(inplace=True)) changed its output after it was captured, so it would be read "
                "as another layer's; tap the module whose output is final (e.g. the block, not its BatchNorm)"
            )
        return value


class FeatureTap:
    """Context manager recording the named features of ``model`` during forward."""

    def __init__(self, model: nn.Module, names: list[str] | tuple[str, ...]):
        self.model = unwrap(model)
        self.names = list(names)
        self.features = Captured()
        self._handles: list = []
        self._targets = [(n, *resolve(model, n)) for n in self.names]

    def __enter__(self) -> Self:
        return self.attach()

    def attach(self) -> Self:
        """Register the hooks (once; again only after :meth:`close`)."""
        if self._handles:
            return self
        modules = dict(self.model.named_modules())
        for name, path, io in self._targets:
            mod = modules[path]
            if io == "input":
                h = mod.register_forward_pre_hook(self._pre_hook(name))
            else:
                h = mod.register_forward_hook(self._hook(name))
            self._handles.append(h)
        return self

    def _hook(self, name):
        def fn(_mod, _inp, out):
            self.features.capture(name, out)

        return fn

    def _pre_hook(self, name):
        def fn(_mod, inp):
            self.features.capture(name, inp[0])

        return fn

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
