"""Loading weights into models: trained kdrun teachers, pretrained state_dicts, and a model's identity.

Every file is read with ``weights_only=True`` (nothing in it can run code); kdrun checkpoints are
verified against their checksum (:mod:`kdrun.io`); a file that is not what it claims ends the run with
one line naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
import zipfile
from contextlib import nullcontext

import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun import io as kio
from kdrun.data import DataBundle
from kdrun.errors import ConfigError

log = logging.getLogger("kdrun")


def model_identity(mcfg, data: DataBundle) -> dict:
    """What makes a model's weights fit another run: architecture, source, options, classes, input."""
    return {
        "arch": mcfg.name,
        "source": mcfg.get("source", "kdrun"),
        "kwargs": OmegaConf.to_container(mcfg.kwargs, resolve=True) if mcfg.get("kwargs") else {},
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "image_size": data.image_size,
    }


# besides arch and num_classes, what a trained teacher's checkpoint must agree on with the run reusing it
IDENTITY_FIELDS = ("source", "kwargs", "in_chans", "image_size")


def read_checkpoint(path: str, what: str) -> dict:
    """A kdrun model checkpoint (``identity`` and ``model``), checksum verified; one line naming ``what``
    when the file is damaged or not one."""
    try:
        ckpt = kio.load(path, "checkpoint")
    except kio.DamagedArtifact as e:
        raise ConfigError(f"{what}: {e.reason}") from None
    if not isinstance(ckpt.get("identity"), dict) or not isinstance(ckpt.get("model"), dict):
        stage = os.path.basename(path).rpartition("_")[0] if path.endswith(("_last.pt", "_best.pt")) else ""
        hint = f"; this is a training state: give the run's checkpoints/{stage}.pt" if stage else ""
        raise ConfigError(f"{what}: not a kdrun teacher checkpoint (no 'identity' and 'model'){hint}")
    return ckpt


def load_teacher(path: str, model: nn.Module, want: dict, what: str | None = None, run: dict | None = None) -> dict:
    """Load a kdrun teacher checkpoint into ``model`` after verifying its checksum (:mod:`kdrun.io`);
    refuse a damaged file, another architecture, class count, model options (``kwargs``: an MLP's activation,
    a small-input stem...) or input shape; and, against ``run`` (:meth:`kdrun.stages.StageRunner.data_record`
    of this run), other class names or order, or another normalisation. Other data is a warning (a teacher
    trained elsewhere is allowed; its test accuracy is honest only if it never saw these test images).
    ``what`` names the file in errors (default ``teacher.checkpoint=PATH``)."""
    what = what or f"teacher.checkpoint={path}"
    ckpt = read_checkpoint(path, what)
    have = ckpt["identity"]
    if have.get("arch") != want["arch"]:
        raise ConfigError(
            f"{what}: holds {have.get('arch')} for {have.get('num_classes')} classes, but this run's teacher is "
            f"{want['arch']}; give teacher={have.get('arch')} (and the options it was trained with)"
        )
    if have.get("num_classes") != want["num_classes"]:
        raise ConfigError(
            f"{what}: holds {have.get('arch')} for {have.get('num_classes')} classes, but this run's data has "
            f"{want['num_classes']}; give it the data it was trained on"
        )
    differs = _first_difference(have, want)
    if differs:  # options that change what the same weights compute (an activation, a stem's strides...)
        field, theirs, ours = differs
        if field in ("image_size", "in_chans"):  # the data's shape, not the teacher's options
            raise ConfigError(
                f"{what}: was trained on inputs of {field}={theirs}, but this run's have {field}={ours}; give "
                f"dataset.{field}={theirs}"
            )
        raise ConfigError(
            f"{what}: was trained with {field}={theirs}, but this run's teacher has {field}={ours}; "
            "give the teacher the options it was trained with"
        )
    if run is not None:  # after the model's identity: data of another shape is not the first thing to say
        _check_input(ckpt, run, what)
    load_weights(model, ckpt["model"], what)
    return ckpt.get("summary", {})


def _check_input(ckpt: dict, run: dict, what: str) -> None:
    """A checkpoint's classes and normalisation against this run's (when it recorded them)."""
    if "classes" in ckpt and list(ckpt["classes"]) != run["classes"]:
        theirs, ours = list(ckpt["classes"]), run["classes"]
        i = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise ConfigError(
            f"{what}: its output {i} is class {theirs[i] if i < len(theirs) else None!r}, but this run's class {i} "
            f"is {ours[i] if i < len(ours) else None!r} (classes {_short(theirs)} against {_short(ours)}); "
            "give it data with its classes, in its order"
        )
    if "normalize" in ckpt and _rounded(ckpt["normalize"]) != _rounded(run["normalize"]):
        (mean, std), (our_mean, our_std) = ckpt["normalize"], run["normalize"]
        raise ConfigError(
            f"{what}: was trained on images normalised with dataset.mean={mean} dataset.std={std}, but this run "
            f"has dataset.mean={our_mean} dataset.std={our_std}; give the teacher's (the student may use them too)"
        )
    ours = run.get("validation") or {}
    if ours.get("fraction") and ckpt.get("validation") != ours:
        split = ckpt.get("validation")
        trained = (
            "on all the training images"
            if split and not split["fraction"]
            else f"with another validation split ({split})"
            if split
            else "before checkpoints recorded their validation split"
        )
        log.warning(
            "%s: trained %s, so it has seen some of this run's validation images (trainer.val_fraction=%g, "
            "trainer.seed=%d): validation figures of the teacher, and choices made with it, are optimistic",
            what,
            trained,
            ours["fraction"],
            ours["seed"],
        )
    # what the data is (a copy elsewhere is the same data); a checkpoint from before it was recorded: the files' key
    field = "data_content" if "data_content" in ckpt and "data_content" in run else "data"
    if field in ckpt and ckpt[field] != run[field]:
        log.warning(
            "%s: trained on other data (%s) than this run's (%s); its test accuracy here is honest only if it never "
            "saw this run's test images",
            what,
            ckpt[field],
            run[field],
        )


def _rounded(normalize) -> list:
    return [[round(float(v), 6) for v in values] for values in normalize]


def _short(names: list) -> str:
    return "[" + ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "") + "]"


# model options that act only while training (a teacher is used frozen, in eval mode), or that only chose the
# starting weights (timm's pretrained_cfg_overlay={file: ...}): they may differ
TRAINING_ONLY = (
    "dropout",
    "input_dropout",
    "max_norm",
    "drop_rate",
    "drop_path_rate",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
)


def _option_defaults(arch: str, source: str) -> dict:
    """The defaults of a kdrun model factory's options (an option left out equals its default)."""
    import inspect

    from kdrun.models.registry import MODELS

    if source != "kdrun" or arch not in MODELS:
        return {}
    params = inspect.signature(MODELS.get(arch)).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _first_difference(have: dict, want: dict) -> tuple[str, object, object] | None:
    """The first identity field (``kwargs.<key>`` for a model option) where a checkpoint and this run differ."""
    defaults = _option_defaults(str(want["arch"]), str(want.get("source", "kdrun")))
    for field in (f for f in IDENTITY_FIELDS if f in have):
        theirs, ours = have[field], want[field]
        if field == "kwargs" and isinstance(theirs, dict):
            for key in sorted((set(theirs) | set(ours)) - set(TRAINING_ONLY), key=str):
                a, b = theirs.get(key, defaults.get(key)), ours.get(key, defaults.get(key))
                if a != b:
                    return f"teacher.kwargs.{key}", a, b
        elif theirs != ours:
            return field, theirs, ours
    return None


# where a training framework's checkpoint keeps the network's state_dict: kdrun, RepDistiller and mdistiller
# ("model"), Lightning and timm's train.py ("state_dict"; timm's EMA copy, "state_dict_ema", is not taken), and
# hand-written loops following PyTorch's tutorial ("model_state_dict") or the CIFAR repositories ("net")
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "net")


def _is_state_dict(state) -> bool:
    """Parameter and buffer names to tensors (a module's ``get_extra_state()``, under ``*._extra_state``: any value)."""
    return isinstance(state, dict) and all(
        isinstance(v, torch.Tensor) or str(k).endswith("_extra_state") for k, v in state.items()
    )


def _unwrap(state, what: str):
    """The state_dict inside a training checkpoint (:data:`CHECKPOINT_KEYS`), or ``state`` itself."""
    if isinstance(state, dict) and not _is_state_dict(state):
        key = next((k for k in CHECKPOINT_KEYS if _is_state_dict(state.get(k)) and len(state[k])), None)
        if key is not None:
            log.info("%s: the weights under its '%s' key", what, key)
            return state[key]
    return state


def _unwrapped(state: dict) -> dict:
    """Saved from a DDP-wrapped or ``torch.compile``'d model: the same weights without the wrapper's prefix."""
    for prefix in ("module.", "_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _owned(state: dict, model: nn.Module, what: str) -> dict:
    """The weights of the one attribute whose keys are exactly ``model``'s: a Lightning checkpoint holds its
    LightningModule's state_dict, the network under the attribute that holds it (``model.``, ``net.``; wrapped
    there too, ``model._orig_mod.``), next to any other module's (a loss's buffers, a frozen teacher's)."""
    own = set(model.state_dict())
    if set(state) == own:
        return state
    fits = []
    for head in sorted({k.split(".", 1)[0] for k in state if "." in k}):
        sub = _unwrapped({k[len(head) + 1 :]: v for k, v in state.items() if k.startswith(head + ".")})
        if set(sub) == own:
            fits.append((head, sub))
    if len(fits) > 1:
        heads = ", ".join(f"'{head}.'" for head, _ in fits)
        raise ConfigError(f"{what}: holds weights that fit the model under each of {heads}; save the one to use alone")
    if not fits:
        return state
    log.info("%s: the weights under '%s.'", what, fits[0][0])
    return fits[0][1]


def load_weights(model: nn.Module, state, what: str) -> None:
    """``model.load_state_dict(state)``, or one line naming ``what`` when ``state`` does not fit the model.
    ``state`` may be a training checkpoint holding the state_dict (:data:`CHECKPOINT_KEYS`), with the network's
    keys under a wrapper's prefix (DDP, ``torch.compile``) or the attribute of a module that held it (Lightning)."""
    state = _unwrap(state, what)
    if not _is_state_dict(state):
        keys = ", ".join(repr(k) for k in CHECKPOINT_KEYS)
        raise ConfigError(
            f"{what}: not a state_dict (a mapping of parameter names to tensors), nor a checkpoint holding one "
            f"under {keys}"
        )
    state = _owned(_unwrapped(state), model, what)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = (first[1].strip() if len(first) > 1 else first[0])[:200] if first else ""
        raise ConfigError(f"{what}: does not fit the model ({detail})") from None


def load_pretrained(path: str, model: nn.Module, what: str) -> None:
    """Initialise ``model`` from a local state_dict (or a kdrun checkpoint's ``model``), read with
    ``weights_only=True``: a file that is not what it claims is one line naming ``what``."""
    # timm's train.py keeps its command line's argparse.Namespace beside the weights: plain values too
    allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; 2.4 only has the global list
    if allowed is None:
        torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        # torch warns before it refuses some files (a plain pickle's protocol): the one line below says it all
        with allowed([argparse.Namespace]) if allowed is not None else nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated, not torch, or a pickle with more than weights)
        why = type(e).__name__ if zipfile.is_zipfile(path) else "not the zip archive torch.save writes"
        raise ConfigError(
            f"{what}: not a loadable state_dict ({why}; only tensors and plain values are read, never "
            "code: a checkpoint holding other objects, e.g. a config's, loads once its weights are saved alone, "
            "torch.save(net.state_dict(), PATH))"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "header" in state:
        try:  # a kdrun checkpoint: verify its checksum too
            state = kio.load(path, state["header"].get("kind", "checkpoint"))
        except kio.DamagedArtifact as e:
            raise ConfigError(f"{what}: {e.reason}") from None
    load_weights(model, state, what)
