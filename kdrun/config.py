"""Validation of a composed config: every rule names its key and what is valid.

Runs before anything is written (the CLI composes the config once up front),
so bad input never leaves a half-made run directory behind.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable
from typing import Any, TypeGuard

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun import distributed, loggers, schedules
from kdrun.data.stream import MODES
from kdrun.errors import ConfigError
from kdrun.optim import OPTIMIZERS, SCHEDULES


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_of(names) -> str:
    """``a, b or c``."""
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _bool(v) -> bool:
    return isinstance(v, bool)


def _int(v) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


PRECISIONS = ("fp32", "bf16", "fp16")

# key, type check, range check, what is valid
Rule = tuple[str, Callable[[Any], bool], Callable[[Any], object], str]
RULES: list[Rule] = [
    ("trainer.teacher_epochs", _int, lambda v: v >= 0, "an integer >= 0"),
    ("trainer.epochs", _int, lambda v: v >= 0, "an integer >= 0"),
    ("trainer.pre_stage_epochs", _int, lambda v: v >= 1, "an integer >= 1 (or null: each method's own)"),
    ("trainer.batch_size", _int, lambda v: v > 0, "an integer > 0"),
    ("trainer.eval_batch_size", _int, lambda v: v > 0, "an integer > 0 (or null: 512 on a GPU, 64 on a CPU)"),
    ("trainer.seed", _int, lambda v: v >= 0, "an integer >= 0"),
    ("trainer.val_fraction", _num, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("dataset.student_fraction", _num, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("dataset.eval_crop_fraction", _num, lambda v: 0 < v <= 1, "a number in (0, 1], e.g. 0.875 (or null: resize)"),
    ("dataset.image_size", _int, lambda v: v > 0, "an integer > 0"),
    ("dataset.in_chans", _int, lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    ("dataset.num_classes", _int, lambda v: v >= 2, "an integer >= 2"),
    ("dataset.workers", _int, lambda v: v >= 0, "an integer >= 0 (0: in the main process; or null: the default)"),
    ("dataset.mode", lambda v: isinstance(v, str), lambda v: v in MODES, _one_of(MODES)),
    ("dataset.max_memory_gb", _num, lambda v: v > 0, "a number > 0"),
    ("trainer.log_every", _int, lambda v: v > 0, "an integer > 0"),
    (
        "trainer.device",
        lambda v: isinstance(v, str),
        lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v),
        "auto, cpu, cuda or cuda:N",
    ),
    ("trainer.devices", _int, lambda v: v >= 1, "an integer >= 1"),
    ("trainer.checkpoint_every_steps", _int, lambda v: v >= 0, "an integer >= 0"),
    ("trainer.precision", lambda v: isinstance(v, str), lambda v: v in PRECISIONS, "fp32, bf16 or fp16"),
    ("teacher.precision", lambda v: isinstance(v, str), lambda v: v in PRECISIONS, "fp32, bf16 or fp16 (or null)"),
    ("teacher.label_smoothing", _num, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.1 (0: plain CE)"),
    ("trainer.threads", _int, lambda v: v >= 1, "an integer >= 1 (or null)"),
    ("trainer.ema", _num, lambda v: 0 < v < 1, "a decay in (0, 1), e.g. 0.999 (or null)"),
    ("cache.views", _int, lambda v: v >= 0, "an integer >= 0"),
    ("cache.fill", lambda v: isinstance(v, str), lambda v: v in ("first_use", "pass"), "first_use or pass"),
    ("cache.topk", _int, lambda v: v >= 1, "an integer >= 1 (or null: every logit)"),
    ("loss.temperature", _num, lambda v: v > 0, "a number > 0"),
    ("loss.ce_weight", _num, lambda v: v >= 0, "a number >= 0"),
    ("loss.weight", _num, lambda v: v >= 0, "a number >= 0"),
    ("scheme.temperature", _num, lambda v: v > 0, "a number > 0"),
    ("scheme.kl_weight", _num, lambda v: v >= 0, "a number >= 0"),
    ("scheme.generations", _int, lambda v: v >= 2, "an integer >= 2 (generation 1 is trained with CE)"),
    ("scheme.direct", _bool, lambda v: True, "true or false"),
]

# the optimiser's keys, for optim.* and for the teacher's own overrides teacher.optim.*
OPTIM_RULES: list[Rule] = [
    ("name", lambda v: isinstance(v, str), lambda v: v in OPTIMIZERS, _one_of(OPTIMIZERS)),
    ("lr", _num, lambda v: v > 0, "a number > 0"),
    ("momentum", _num, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("weight_decay", _num, lambda v: v >= 0, "a number >= 0"),
    ("nesterov", _bool, lambda v: True, "true or false"),
    ("schedule", lambda v: isinstance(v, str), lambda v: v in SCHEDULES, _one_of(SCHEDULES)),
    (
        "milestones",
        lambda v: isinstance(v, ListConfig) and all(_int(m) for m in v),
        lambda v: all(m >= 0 for m in v),
        "a list of epochs (integers >= 0), e.g. [150, 180, 210]",
    ),
    ("gamma", _num, lambda v: v > 0, "a number > 0"),
    ("warmup_epochs", _int, lambda v: v >= 0, "an integer >= 0"),
    ("grad_clip", _num, lambda v: v >= 0, "a number >= 0 (or null: no clipping)"),
]
RULES += [
    (f"{prefix}.{key}", parse, ok, valid)
    for prefix in ("optim", "teacher.optim")
    for key, parse, ok, valid in OPTIM_RULES
]


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad value; returns None when the config is usable."""
    for key, type_ok, range_ok, valid in RULES + _method_rules(cfg):
        v = OmegaConf.select(cfg, key, default=None)
        if v is None:
            continue
        if isinstance(v, DictConfig) and key.startswith("loss."):  # a schedule: check every value it reaches
            sched = schedules.parse(key, OmegaConf.to_container(v, resolve=True))
            for x in sched.values_reached():
                if not range_ok(x):
                    raise ConfigError(f"{key}: schedule reaches {x:g}; must be {valid}")
            continue
        if not type_ok(v) or not range_ok(v):
            raise ConfigError(f"{key}={v}: must be {valid}")
    _validate_known_keys(cfg)
    _validate_names(cfg)
    loggers.check(cfg)  # names and packages, before the run folder and the data
    _validate_normalize(cfg.dataset)
    _validate_augment(cfg)
    if cfg.dataset.name == "imagefolder" and not cfg.dataset.get("root"):
        from kdrun.data.imagefolder import ROOT_NOT_SET

        raise ConfigError(ROOT_NOT_SET)  # before the run directory exists (the reader checks it again)
    _validate_classes(cfg)
    _validate_loss(cfg)
    _validate_loss_builds(cfg)
    _validate_sweep(cfg)
    _validate_scheme_lists(cfg)
    _validate_starting_weights(cfg)
    _validate_models(cfg)
    d = cfg.dataset
    if d.get("num_classes") is not None and d.get("image_size"):  # else once the data is read (kdrun.train.run)
        check_method_fits(cfg, int(d.num_classes), int(d.get("in_chans") or 3), int(d.image_size))
    ckpt = cfg.teacher.get("checkpoint")
    if ckpt and os.path.isdir(ckpt):
        raise ConfigError(f"teacher.checkpoint={ckpt}: a directory; give the file, e.g. RUN_DIR/checkpoints/teacher.pt")
    if ckpt and not os.path.isfile(ckpt):
        raise ConfigError(
            f"teacher.checkpoint={ckpt}: file not found (give the path of a kdrun teacher "
            "checkpoint, e.g. RUN_DIR/checkpoints/teacher.pt)"
        )
    for who in ("teacher", "student"):
        pre = cfg[who].get("pretrained")
        if pre and not os.path.isfile(pre):
            raise ConfigError(f"{who}.pretrained={pre}: file not found")
        if cfg[who].get("weights"):  # a pretrained-weights name the model does not have
            from kdrun.models.registry import check_weights

            check_weights(cfg[who].name, cfg[who].get("source", "kdrun"), str(cfg[who].weights), who)
    dev = cfg.trainer.device
    for key in ("trainer.precision", "teacher.precision"):
        if OmegaConf.select(cfg, key, default=None) == "fp16" and not dev.startswith("cuda") and not _cuda_auto(dev):
            raise ConfigError(f"{key}=fp16: needs a CUDA GPU; use bf16 on CPUs")
    if cfg.trainer.get("sync_bn") and not dev.startswith("cuda") and not _cuda_auto(dev):
        raise ConfigError("trainer.sync_bn=true: SyncBatchNorm needs CUDA GPUs; leave it false on CPUs")
    workers = distributed.launched_workers()  # torchrun's or SLURM's, else spawned (trainer.devices)
    if workers == 1:
        workers = int(cfg.trainer.get("devices") or 1)
    if workers > 1 and int(cfg.trainer.batch_size) % workers:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size}: must be a multiple of the {workers} data-parallel "
            "workers, which take equal shares of every batch (else its first images would be drawn twice)"
        )
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={dev}: no CUDA GPU is available here; use trainer.device=cpu or auto")


def _validate_augment(cfg: DictConfig) -> None:
    """``dataset.augment`` and ``teacher.augment``: a kind and keys :func:`kdrun.data.transforms.make_augment` accepts;
    ``evaluate.flip_tta`` only for models trained on mirrored images."""
    from kdrun.data.transforms import make_augment
    from kdrun.run_data import augment_specs

    spec, teacher_spec = augment_specs(cfg)
    augment = make_augment(spec, 0)
    make_augment({**spec, **teacher_spec}, 0, where="teacher.augment")
    tta = (cfg.get("evaluate") or {}).get("flip_tta", False)
    if not isinstance(tta, bool):
        raise ConfigError(f"evaluate.flip_tta={tta}: must be true or false")
    if tta and not augment.flip:
        raise ConfigError(
            f"evaluate.flip_tta=true: dataset={cfg.dataset.name} trains without mirrored images "
            "(dataset.augment.flip=false); valid: false, or dataset.augment.flip=true for images whose mirror "
            "is a valid image of the same class (not digits)"
        )


def _validate_normalize(dcfg: DictConfig) -> None:
    """``dataset.mean`` and ``dataset.std``: one value, or one per channel, of pixels scaled to [0, 1]."""
    chans = int(dcfg.get("in_chans") or 3)
    counts = "1 number" if chans == 1 else f"1 or {chans} numbers"
    for key, in_range, bounds in (("mean", lambda x: 0 <= x <= 1, "[0, 1]"), ("std", lambda x: 0 < x <= 1, "(0, 1]")):
        v = dcfg.get(key)
        ok = isinstance(v, ListConfig) and len(v) in (1, chans) and all(_num(x) and in_range(x) for x in v)
        if not ok:
            raise ConfigError(
                f"dataset.{key}={v}: must be {counts} in {bounds} (of pixels / 255) for dataset.in_chans={chans}, "
                "e.g. the training split's own per-channel statistics"
            )


def _validate_classes(cfg: DictConfig) -> None:
    check_class_indices(cfg, cfg.dataset.get("num_classes"), f"dataset.num_classes={cfg.dataset.get('num_classes')}")


def check_class_indices(cfg: DictConfig, n: int | None, what: str) -> None:
    """Class indices in ``dataset.student_exclude`` and ``evaluate.logit_bias``, and ``cache.topk``, against ``n``
    classes (``what``: where the count comes from). Validation checks the configured ``dataset.num_classes``; an
    image folder's (``num_classes: null``) are known only once it is read, and the run checks them again then."""
    valid = f"class indices in [0, {n})" if n else "class indices >= 0"

    def ok(c) -> bool:
        return _int(c) and c >= 0 and (not n or c < n)

    exclude = cfg.dataset.get("student_exclude") or []
    if not all(ok(c) for c in exclude):
        raise ConfigError(f"dataset.student_exclude={list(exclude)}: must be a list of {valid}")
    if n and set(range(n)) <= set(exclude):
        raise ConfigError(
            f"dataset.student_exclude={list(exclude)}: leaves none of the {n} classes for the student stages"
        )
    topk = (cfg.get("cache") or {}).get("topk")
    if n and _int(topk) and topk >= n:
        raise ConfigError(f"cache.topk={topk}: must be below {what} (null keeps every logit)")
    bias = (cfg.get("evaluate") or {}).get("logit_bias") or {}
    for c, b in bias.items():
        c = int(c) if isinstance(c, str) and c.isdigit() else c
        if not ok(c) or not _num(b):
            raise ConfigError(f"evaluate.logit_bias={dict(bias)}: must map {valid} to numbers, e.g. {{3: 3.5}}")


def _method_rules(cfg: DictConfig) -> list:
    """RULES rows for the ranges the configured KD method declares (``value_rules``, e.g. KD's alpha in [0, 1])."""
    from kdrun.losses import LOSSES

    name = OmegaConf.select(cfg, "loss.name", default=None)
    if name not in LOSSES:
        return []  # reported by _validate_loss
    return [(f"loss.{k}", _num, ok, valid) for k, (ok, valid) in LOSSES.get(name).value_rules.items()]


@functools.cache  # read once per process: validate runs for every point of a sweep
def _known_keys() -> dict[str, list[str]]:
    """The keys ``teacher``, ``student`` and ``trainer`` take: those of ``train.yaml`` and ``trainer/default.yaml``."""
    from importlib.resources import files

    configs = files("kdrun.configs")
    base = OmegaConf.load(str(configs.joinpath("train.yaml")))
    trainer = OmegaConf.load(str(configs.joinpath("trainer", "default.yaml")))
    assert isinstance(base, DictConfig) and isinstance(trainer, DictConfig)
    return {
        "teacher": [str(k) for k in base.teacher],
        "student": [str(k) for k in base.student],
        "trainer": [str(k) for k in trainer if k != "defaults"],
    }


def _validate_known_keys(cfg: DictConfig) -> None:
    """A key added with '+' that kdrun does not read (+student.foo=1, +trainer.epohcs=3) was accepted and ignored."""
    for node, known in _known_keys().items():
        section = cfg.get(node)
        unknown = sorted(str(k) for k in section if str(k) not in known) if isinstance(section, DictConfig) else []
        if unknown:
            raise ConfigError(
                f"{node}.{unknown[0]}: unknown key, read by nothing; valid keys of {node}: {', '.join(known)}"
            )


def _validate_names(cfg: DictConfig) -> None:
    from kdrun.data import DATASETS
    from kdrun.models import MODELS

    for who in ("teacher", "student"):
        source = cfg[who].get("source", "kdrun")
        if source not in ("kdrun", "timm"):
            raise ConfigError(f"{who}.source={source}: unknown model source; valid: kdrun, timm")
        if source == "kdrun":
            MODELS.get(cfg[who].name, f"{who}.name")
    for key in ("peers", "assistants"):
        for i, item in enumerate(cfg.scheme.get(key) or []):
            MODELS.get(item if isinstance(item, str) else item.get("name"), f"scheme.{key}[{i}]")
    DATASETS.get(cfg.dataset.name, "dataset.name")
    from kdrun.schemes import SCHEMES

    SCHEMES.get(cfg.scheme.name, "scheme.name")


def loss_kwargs(loss_cfg) -> dict:
    """The loss config as constructor kwargs (without ``name``)."""
    kw = plain_dict(loss_cfg)
    kw.pop("name", None)
    return kw


def plain_dict(node) -> dict:
    """A config mapping as a plain dict, interpolations resolved."""
    out = OmegaConf.to_container(node, resolve=True)
    assert isinstance(out, dict), f"not a mapping: {node!r}"
    return out


def _validate_loss(cfg: DictConfig) -> None:
    from kdrun.losses import LOSSES
    from kdrun.losses.base import constructor_params

    cls = LOSSES.get(cfg.loss.name, "loss.name")
    valid = constructor_params(cls)  # the method's and its DistillLoss bases' (not nn.Module's *args)
    for k in loss_kwargs(cfg.loss):
        if k not in valid:
            raise ConfigError(f"loss.{k}: not a parameter of loss '{cfg.loss.name}'; valid: {', '.join(valid)}")


def _validate_loss_builds(cfg: DictConfig) -> None:
    """The KD method is built here as the student stage will build it (its own checks run, those of every
    term of a combo too), and each scheduled hyperparameter must be one the method lets a schedule set."""
    from kdrun.losses import LOSSES
    from kdrun.losses.base import FeatureLoss, check_numbers

    name = cfg.loss.name
    static, scheds = schedules.split(loss_kwargs(cfg.loss))
    check_numbers(LOSSES.get(name, "loss.name"), static)
    method = LOSSES.get(name, "loss.name")(**static)
    if method.teacher_layers and not method.needs_teacher_features:  # it would read features no one captures
        raise ConfigError(
            f"loss.layers.teacher: loss '{name}' reads no teacher features (its class has needs_teacher_features "
            "= False); drop the key, or set needs_teacher_features = True in the method"
        )
    if not method.trains_student and method.ce_weight == 0:
        raise ConfigError(
            f"loss.ce_weight=0: loss '{name}' trains the student with CE alone after its own stage (its terms train "
            "only that stage), so the student stage would have no loss; give loss.ce_weight > 0"
        )
    if isinstance(method, FeatureLoss) and (method.teacher_layers or method.student_layers):
        method.check_pairs()  # the pairs the config names, before the teacher trains
    if cfg.scheme.name == "online" and name != "kd":
        raise ConfigError(
            f"loss={name}: scheme=online trains its peers with deep mutual learning's own KL (scheme.temperature, "
            "scheme.kl_weight) and uses no KD method; leave loss at kd"
        )
    for key, sched in scheds.items():
        attr = inspect.getattr_static(method, key, None)
        settable = (
            key in vars(method)
            or (attr is not None and not isinstance(attr, property))
            or (isinstance(attr, property) and attr.fset is not None)
        )
        if attr is None and key not in vars(method):  # a schedule sets the attribute of the key's name, each step
            raise ConfigError(
                f"loss.{key}: cannot follow a schedule in loss '{name}': the method keeps no attribute '{key}' for it "
                f"to set each step (a method stores a schedulable value as self.{key} and reads it in forward)"
            )
        if not settable or key in method.fixed_when_built or not _num(getattr(method, key, None)):
            raise ConfigError(
                f"loss.{key}: cannot follow a schedule in loss '{name}' (fixed when the method is built); give a number"
            )
        if isinstance(getattr(method, key), int):  # a count (KDSVD's k, a warm-up in epochs): a schedule's fractions
            raise ConfigError(
                f"loss.{key}: a whole number in loss '{name}', which a schedule would make fractional; give a number"
            )
        for x in sched.values_reached():  # the method's own range checks, at every value the schedule reaches
            LOSSES.get(name)(**(static | {key: x}))


def _validate_scheme_lists(cfg: DictConfig) -> None:
    """Model lists of the schemes (checked again where the scheme runs, with the same messages)."""
    peers = OmegaConf.select(cfg, "scheme.peers", default=None)
    if cfg.scheme.name == "online" and peers is not None and len(peers) < 2:
        raise ConfigError(f"scheme.peers={list(peers)}: give two or more peer models")
    for key in ("checkpoint", "weights", "pretrained"):
        if cfg.scheme.name in ("self", "online") and OmegaConf.select(cfg, f"teacher.{key}", default=None):
            raise ConfigError(
                f"teacher.{key}={OmegaConf.select(cfg, f'teacher.{key}')}: scheme={cfg.scheme.name} uses no teacher "
                "(its students teach each other); leave it out, or use scheme=offline"
            )
    if cfg.scheme.name == "assistant" and not OmegaConf.select(cfg, "scheme.assistants", default=None):
        raise ConfigError("scheme.assistants: give at least one assistant model, e.g. scheme.assistants=[resnet14]")


def _validate_sweep(cfg: DictConfig) -> None:
    from kdrun import objective

    metric = objective.parse(OmegaConf.select(cfg, "sweep.metric", default=None))
    peer = metric.model == "student" or re.fullmatch(r"peer\d+", metric.model)
    if cfg.scheme.name == "online" and metric.measure == "best_val_top1" and peer:
        raise ConfigError(
            f"sweep.metric={metric}: scheme=online trains its peers in one stage, validated by their mean logits, so "
            f"a peer has no best epoch of its own; use {metric.model}.val_top1 (its last epoch)"
        )


def _validate_starting_weights(cfg: DictConfig) -> None:
    """``pretrained`` (a file) and ``weights`` (the library's named weights) both set: the file replaced every
    weight, and the named ones were read (or downloaded) for nothing."""
    for who in ("teacher", "student"):
        pre, named = cfg[who].get("pretrained"), cfg[who].get("weights")
        if pre and named:
            raise ConfigError(
                f"{who}.pretrained={pre} and {who}.weights={named}: both give the starting weights; keep one "
                f"({who}.pretrained: a state_dict file of your own; {who}.weights: the library's named weights)"
            )


def _validate_models(cfg: DictConfig) -> None:
    """The teacher and the student are built once (CPU) with their options, so a bad ``student.kwargs.*`` is refused
    before the teacher trains; configured feature layers must exist in them, and a ``pretrained`` file must load
    into its model."""
    from kdrun.models import build_model, resolve

    d = cfg.dataset
    if d.get("num_classes") is None or d.get("image_size") is None:
        return  # sizes known only once the data is read; checked then
    layers = cfg.loss.get("layers") or {}
    for who in ("teacher", "student"):
        mcfg = cfg[who]
        if mcfg.get("source", "kdrun") != "kdrun":
            continue  # timm's: its own registry checks its options
        kwargs = plain_dict(mcfg.kwargs) if mcfg.get("kwargs") else {}
        model = build_model(
            mcfg.name, int(d.num_classes), int(d.get("in_chans") or 3), int(d.image_size), key=f"{who}.name", **kwargs
        )
        if (
            mcfg.get("pretrained")
            and os.path.isfile(mcfg.pretrained)
            and not (who == "teacher" and cfg.teacher.checkpoint)
        ):
            _check_pretrained(mcfg.pretrained, model, who, (mcfg.name, kwargs, d.num_classes, d.image_size))
        names = layers.get(who) or []
        for i, name in enumerate([names] if isinstance(names, str) else list(names)):
            try:
                resolve(model, name)
            except ConfigError as e:
                raise ConfigError(f"loss.layers.{who}[{i}]={name}: {e}") from None


_PRETRAINED_FITS: set[str] = set()  # files read into their model by this process: once a sweep, not once a job


def _check_pretrained(path: str, model, who: str, model_key: tuple) -> None:
    """Read ``who.pretrained`` into ``model`` as the stage will (a file that is not a state_dict of it is one line
    before the run directory is made); a file already read into the same model (the same size and time) is not
    read again: a sweep's points and its jobs share it."""
    from kdrun.weights import load_pretrained

    st = os.stat(path)
    key = repr((os.path.abspath(path), st.st_size, st.st_mtime_ns, model_key))
    if key not in _PRETRAINED_FITS:
        load_pretrained(path, model, f"{who}.pretrained={path}")
        _PRETRAINED_FITS.add(key)


def check_method_fits(cfg: DictConfig, num_classes: int, chans: int, size: int) -> None:
    """A feature method is built for every (teacher, student) pair the scheme distils, on the untrained models'
    feature shapes, as the student stage builds it: layers the models lack, or features it cannot pair, are one line
    before the teacher trains, not after it. The models live on PyTorch's meta device (shapes without weights or
    arithmetic: a ResNet-50 pair at 224 pixels costs about 0.3 s, not 1-4 s on the CPU). :func:`validate` calls it
    where the config gives the data's sizes, :func:`kdrun.train.run` once the data is read otherwise. Models of
    other libraries (timm) are checked at their stage."""
    import torch

    from kdrun.distill import probe_shapes
    from kdrun.losses import LOSSES
    from kdrun.models import build_model
    from kdrun.models.registry import feature_points
    from kdrun.schemes import pairs_of

    name = cfg.loss.name
    static, _ = schedules.split(loss_kwargs(cfg.loss))
    if not LOSSES.get(name)(**static).needs_teacher_features:
        return
    x = torch.zeros(2, chans, size, size, device="meta")
    pairs = pairs_of(cfg)
    for t_key, t_cfg, s_key, s_cfg in pairs:
        if "kdrun" != t_cfg.get("source", "kdrun") or "kdrun" != s_cfg.get("source", "kdrun"):
            continue
        kwargs = [plain_dict(m.kwargs) if m.get("kwargs") else {} for m in (t_cfg, s_cfg)]
        method = LOSSES.get(name)(**static)
        try:
            with torch.device("meta"):  # the models, the features and the method's adapters: shapes alone
                t_net, s_net = (
                    build_model(m.name, num_classes, chans, size, key=f"{k}.name", **kw)
                    for k, m, kw in ((t_key, t_cfg, kwargs[0]), (s_key, s_cfg, kwargs[1]))
                )
                if not (method.teacher_layers or method.student_layers):
                    method.teacher_layers, method.student_layers = method.default_layers(
                        list(feature_points(t_net)), list(feature_points(s_net))
                    )
                t_shapes = probe_shapes(t_net, method.teacher_layers, x)
                method.build(t_shapes, probe_shapes(s_net, method.student_layers, x), 2)
                method.bind_teacher(t_net)  # its checks of the teacher (OFD: a BatchNorm before each layer)
        except (RuntimeError, NotImplementedError) as e:  # a value read from meta weights (OFD's margins: .item())
            if "meta" not in str(e):
                raise
        except ConfigError as e:
            where = f"{t_key}={t_cfg.name} -> {s_key}={s_cfg.name}: " if len(pairs) > 1 or t_key != "teacher" else ""
            raise ConfigError(f"{where}{e}") from None


def _cuda_auto(dev: str) -> bool:
    import torch

    return dev == "auto" and torch.cuda.is_available()
