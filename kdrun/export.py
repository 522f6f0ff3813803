"""``kdrun export RUN_DIR [format=onnx|torchscript] [quantize=int8] [models=student,teacher,baseline]``.

Writes the trained models of a run for deployment, next to the run, in ``RUN_DIR/export/``:

- ``format=onnx`` (default): ``<model>.onnx`` with a dynamic batch dimension (``torch.onnx.export``,
  the ``torch.export``-based exporter, falling back to the TorchScript-based one for models it cannot
  trace). Parity with onnxruntime is checked on up to 256 test images: the largest |delta logit| must
  be <= ``atol`` (1e-4), or the command fails with one line and writes nothing.
- ``quantize=int8``: static post-training quantization with ``onnxruntime.quantization`` (QDQ,
  per-channel int8 weights, int8 activations), calibrated on ``calib`` (256) training images, never
  on test images: ``<model>.int8.onnx``.
- ``format=torchscript``: ``<model>.torchscript.pt`` (``torch.jit.trace``), parity against eager.

Every exported file is evaluated on the whole test split (top-1) and timed on the CPU at batch 1 and
32 against PyTorch eager; ``export.json`` holds every figure and ``kdrun report RUN_DIR`` prints it.
``models=student_best`` exports the epoch a validation split chose (``trainer.val_fraction``).

What a deployer feeds the model (the run's test-time preprocessing: pixels, mean and std, layout) and the
class names of its outputs are in ``export.json`` (``input``) and in each file: the ONNX metadata property
``kdrun.input``, the TorchScript extra file ``kdrun.input.json``, both that same JSON.

Files are built in a temporary folder; only when every check passed does it replace ``export/`` whole, so
the folder never holds a file of an earlier export that ``export.json`` does not describe.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun import io, plugins
from kdrun.errors import ConfigError, KdrunError

if TYPE_CHECKING:
    from kdrun.data.base import DataBundle, FileSet, ImageSet

USAGE = """usage: kdrun export RUN_DIR [format=onnx|torchscript] [quantize=int8] [models=student,teacher,baseline]
                    [atol=1e-4] [calib=256] [threads=N] [dataset.root=DIR] [out=DIR] [opset=13..20]
                    (models=student_best: the epoch a validation split chose; dataset.root: where the
                    run's images are now, when they moved; a relative root is the run's launch folder's;
                    out: the folder to write instead of RUN_DIR/export, new or an earlier export;
                    opset: the ONNX opset, for an older runtime; default the exporter's)

Writes RUN_DIR/export/<model>.onnx (dynamic batch; or <model>.torchscript.pt), checks parity with
onnxruntime on 256 test images (largest |delta logit| <= atol), evaluates test top-1 and CPU latency at
batch 1 and 32 against PyTorch eager; quantize=int8 adds <model>.int8.onnx (static PTQ calibrated on
`calib` training images). Every figure goes to RUN_DIR/export/export.json, with the input a deployer feeds
(pixels, mean/std, layout) and the class names; each export replaces RUN_DIR/export/ (or out=) whole."""

FORMATS = ("onnx", "torchscript")
OPSETS = (13, 20)  # the ONNX opsets export=opset takes (below 18 through the TorchScript-based exporter)
QUANTIZE = ("none", "int8")
log = logging.getLogger("kdrun")
_JIT_DEPRECATION_SAID = [False]  # torch.jit's FutureWarnings (four a model) become one line an export
PARITY_IMAGES = 256
LATENCY_BATCHES = (1, 32)


class ExportError(KdrunError):
    """An export that cannot be made or does not match its PyTorch model."""


@dataclass
class ExportOptions:
    run_dir: str
    format: str = "onnx"
    quantize: str = "none"
    models: list[str] = field(default_factory=lambda: ["student"])
    atol: float = 1e-4
    calib: int = 256
    threads: int | None = None  # CPU threads of both runtimes (None: each runtime's default)
    data_root: str | None = None  # dataset.root=: where the run's images are now (None: as the run read them)
    out: str | None = None  # out=: the folder written (None: RUN_DIR/export)
    opset: int | None = None  # opset=: the ONNX opset written (None: the exporter's default)

    @property
    def out_dir(self) -> str:
        return self.out or os.path.join(self.run_dir, "export")


@dataclass
class Int8Result:
    file: str
    size_mb: float
    top1: float
    top1_drop: float  # fp32 export top-1 minus int8 top-1, percentage points
    agreement: float  # % of the test images on which its top-1 class is the PyTorch model's
    max_abs_diff: float  # largest |delta logit| against PyTorch on the whole test split
    latency_ms: dict[str, float]  # onnxruntime, "b1" and "b32"
    speedup: dict[str, float]  # fp32 onnxruntime latency / int8 latency
    calibration_images: int


@dataclass
class ModelExport:
    name: str  # checkpoint name: student, teacher, baseline, peer1...
    arch: str
    format: str
    file: str
    exporter: str
    opset: int | None  # the ONNX opset of the file (None: TorchScript)
    size_mb: float
    top1_pytorch: float
    top1: float  # the exported model on the whole test split
    agreement: float  # % of the test images on which its top-1 class is the PyTorch model's
    max_abs_diff: float  # largest |delta logit| against PyTorch on the parity images
    parity_images: int
    latency_ms: dict[str, float]  # exported runtime, "b1" and "b32"
    eager_latency_ms: dict[str, float]  # PyTorch eager, same inputs
    int8: Int8Result | None = None


# ---------------------------------------------------------------- command line


def parse_args(args: list[str]) -> ExportOptions:
    """Options from ``RUN_DIR key=value...``; ExportError (one line) on anything else."""
    positional = [a for a in args if "=" not in a]
    if not positional:
        raise ExportError(
            "export: missing RUN_DIR; usage: kdrun export RUN_DIR [format=onnx|torchscript] "
            "[quantize=int8] [models=student,teacher,baseline]"
        )
    if len(positional) > 1 or positional[0].startswith("-"):
        word = positional[0] if positional[0].startswith("-") else positional[1]
        raise ExportError(
            f"export {word}: unexpected argument; valid: RUN_DIR, format=, quantize=, models=, atol=, "
            "calib=, threads=, dataset.root=, out=, opset="
        )
    opts = ExportOptions(run_dir=positional[0])
    for arg in (a for a in args if "=" in a):
        key, _, value = arg.partition("=")
        if key == "format":
            if value not in FORMATS:
                raise ExportError(f"format={value}: unknown format; valid: {', '.join(FORMATS)}")
            opts.format = value
        elif key == "quantize":
            if value not in QUANTIZE:
                raise ExportError(f"quantize={value}: unknown quantization; valid: {', '.join(QUANTIZE)}")
            opts.quantize = value
        elif key == "models":
            opts.models = [m for m in value.split(",") if m]
            if not opts.models:
                raise ExportError("models=: empty; e.g. models=student,teacher")
        elif key == "atol":
            opts.atol = _number(key, value, float, 0.0)
        elif key == "calib":
            opts.calib = _number(key, value, int, 1)
        elif key == "threads":
            opts.threads = _number(key, value, int, 1)
        elif key == "dataset.root":
            if not value.strip():
                raise ExportError("dataset.root=: empty; give the folder the run's data is in now")
            opts.data_root = os.path.abspath(os.path.expanduser(value))
        elif key == "opset":
            opts.opset = _number(key, value, int, OPSETS[0])
            if opts.opset > OPSETS[1]:
                raise ExportError(f"opset={value}: must be a whole number in [{OPSETS[0]}, {OPSETS[1]}]")
        elif key == "out":
            if not value.strip():
                raise ExportError("out=: empty; give the folder to write the export into")
            opts.out = os.path.abspath(os.path.expanduser(value))
        else:
            raise ExportError(
                f"{key}: unknown option; valid: format, quantize, models, atol, calib, threads, dataset.root, out, "
                "opset"
            )
    if opts.opset is not None and opts.format != "onnx":
        raise ExportError(f"opset={opts.opset}: an ONNX opset; it needs format=onnx (got format={opts.format})")
    if opts.quantize == "int8" and opts.format != "onnx":
        raise ExportError(f"quantize=int8: needs format=onnx (got format={opts.format})")
    if opts.quantize != "int8" and any(a.startswith("calib=") for a in args):
        raise ExportError("calib=: the int8 calibration images; it needs quantize=int8")
    return opts


def _number(key: str, value: str, kind, minimum):
    try:
        v = kind(value)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or v < minimum:
        raise ExportError(f"{key}={value}: must be a {'whole ' if kind is int else ''}number >= {minimum}")
    return v


BEST_SUFFIX = "_best.pt"


def checkpoints_of(run_dir: str) -> dict[str, str]:
    """Exportable checkpoints of a run: ``checkpoints/<name>.pt`` (a stage's last epoch), and ``<name>_best``
    for the epoch a validation split chose (``<name>_best.pt``), never the ``_last`` training states."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return {}
    files = sorted(os.listdir(ckpt_dir))
    shipped = [f for f in files if f.endswith(".pt") and not f.endswith(("_last.pt", BEST_SUFFIX))]
    out = {f[:-3]: os.path.join(ckpt_dir, f) for f in shipped}
    for f in shipped:
        if (best := f[:-3] + BEST_SUFFIX) in files:
            out[best[:-3]] = os.path.join(ckpt_dir, best)
    return out


def check_run(opts: ExportOptions) -> dict[str, str]:
    """The checkpoint of each requested model; ExportError naming what is missing."""
    if not os.path.isdir(opts.run_dir):
        raise ExportError(f"export {opts.run_dir}: no such run directory")
    if not os.path.isfile(os.path.join(opts.run_dir, ".hydra", "config.yaml")):
        raise ExportError(f"export {opts.run_dir}: not a kdrun run directory (no .hydra/config.yaml)")
    have = checkpoints_of(opts.run_dir)
    if not have:
        raise ExportError(
            f"export {opts.run_dir}: no checkpoint in {os.path.join(opts.run_dir, 'checkpoints')} "
            f"(did the run finish a stage?)"
        )
    roles = _roles(opts.run_dir)  # a role names its model: scheme=online's student is a peer (peer1)
    names = [m if m in have else roles.get(m, m) for m in opts.models]
    missing = [m for m, name in zip(opts.models, names) if name not in have]
    unfinished = _unfinished(opts.run_dir)
    if missing:
        raise ExportError(
            f"models={','.join(opts.models)}: no checkpoint for {missing[0]} in this run; valid: {', '.join(have)}"
            + (f" ({unfinished})" if unfinished else "")
        )
    if unfinished:
        log.warning("export: %s; its finished stages are exported", unfinished)
    for m, name in zip(opts.models, names):
        if name != m:
            log.info("export: models=%s: the run's %s is %s", m, m, name)
    return {name: have[name] for name in dict.fromkeys(names)}


def _unfinished(run_dir: str) -> str | None:
    """Why the run has not finished (its FAILED note's first line), with how it goes on; None when it has."""
    try:
        with open(os.path.join(run_dir, "FAILED")) as f:
            why = f.readline().strip()
    except OSError:
        return None
    return f"the run did not finish: {why or 'FAILED'}; kdrun train resume={run_dir} goes on"


def _roles(run_dir: str) -> dict[str, str]:
    """``metrics.json``'s roles (role -> model name); none before the run finished."""
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            roles = json.load(f).get("roles", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in roles.items()} if isinstance(roles, dict) else {}


# ---------------------------------------------------------------- data and models


@dataclass
class Images:
    """Normalised float images and labels of one split, on the CPU."""

    x: torch.Tensor
    y: torch.Tensor


def split_images(cfg, split: ImageSet | FileSet, in_chans: int) -> Images:
    """One split (or a subset of one) of the run's dataset, decoded and normalised as the run saw it (no
    augmentation)."""
    from kdrun.data.base import ImageSet
    from kdrun.data.loader import Normalize, TensorLoader
    from kdrun.data.stream import StreamLoader, stream_workers

    norm = Normalize(cfg.dataset.mean, cfg.dataset.std, in_chans, "cpu")
    if isinstance(split, ImageSet):
        loader: TensorLoader | StreamLoader = TensorLoader(split, 512, norm, shuffle=False, views=0)
    else:
        workers = stream_workers(cfg.dataset)
        loader = StreamLoader(split, 256, norm, num_workers=workers, device="cpu", shuffle=False, views=0)
    batches = list(loader.epoch(0))
    return Images(torch.cat([b.x.cpu() for b in batches]), torch.cat([b.y.cpu() for b in batches]))


def load_images(cfg, data: DataBundle | None = None) -> tuple[Images, Images]:
    """(test split, training split) of the run's dataset (``data``: already loaded), normalised as the run saw
    them (no augmentation)."""
    from kdrun.run_data import load_dataset

    data = data if data is not None else load_dataset(cfg.dataset)
    return split_images(cfg, data.test, data.in_chans), split_images(cfg, data.train, data.in_chans)


def input_spec(cfg, data: DataBundle) -> dict:
    """What a deployer feeds the exported model and what comes out: the run's test-time preprocessing, written
    into ``export.json`` and each exported file (ONNX metadata ``kdrun.input``, TorchScript extra file)."""
    size, chans = data.image_size, data.in_chans
    return {
        "name": "images",
        "shape": ["batch", chans, size, size],
        "dtype": "float32",
        "layout": "NCHW" + (", RGB" if chans == 3 else ", grey"),
        "pixels": data.pixels or f"the {data.name} images as they are: {size}x{size}, uint8",
        "normalize": "(pixels / 255 - mean) / std, per channel",
        "mean": [float(v) for v in cfg.dataset.mean],
        "std": [float(v) for v in cfg.dataset.std],
        "output": {"name": "logits", "shape": ["batch", data.num_classes], "classes": list(data.classes)},
    }


def load_model(path: str) -> tuple[nn.Module, dict]:
    """A model rebuilt from the identity stored in its kdrun checkpoint, weights loaded, in eval mode, and that
    identity with the names of the classes it was trained on (``classes``). A stage's best-on-validation weights
    (``<stage>_best.pt``) take the identity and classes of the stage's own checkpoint."""
    from kdrun.models import build_model
    from kdrun.weights import load_weights

    def read(p: str) -> dict:
        try:
            ckpt = io.load(p, "checkpoint")  # weights_only, checksum verified
        except io.DamagedArtifact as e:
            raise ExportError(f"export: {p}: {e.reason}") from None
        return ckpt if isinstance(ckpt, dict) else {}

    ckpt = read(path)
    shipped = path.removesuffix(BEST_SUFFIX) + ".pt"
    if not ckpt.get("identity") and path.endswith(BEST_SUFFIX) and os.path.isfile(shipped):
        ckpt = {**read(shipped), "model": ckpt.get("model")}  # the stage's identity and classes, these weights
    ident = ckpt.get("identity")
    if not ident and path.endswith("_last.pt") and "stage" in ckpt:
        raise ExportError(
            f"export: {path}: a stage's training state (weights, optimiser, ...), not a model to ship; load "
            f"{path.removesuffix('_last.pt')}.pt, the model the stage wrote when it finished"
        )
    if not ident and path.endswith(BEST_SUFFIX):
        raise ExportError(
            f"export: {path}: a best epoch's weights take their model and classes from {os.path.basename(shipped)} "
            "beside it, which is not there; keep the two files together"
        )
    if not ident:
        raise ExportError(f"export: {path}: not a kdrun checkpoint (no 'identity')")
    model = build_model(
        ident["arch"],
        ident["num_classes"],
        ident["in_chans"],
        ident["image_size"],
        source=ident.get("source", "kdrun"),
        **(ident.get("kwargs") or {}),
    )
    load_weights(model, ckpt["model"], f"export: {path}")  # one line when the model definition changed since
    return model.eval(), {**ident, "classes": ckpt.get("classes")}  # classes: None in checkpoints of before


def top1(logits: np.ndarray | torch.Tensor, labels: torch.Tensor) -> float:
    pred = torch.as_tensor(np.asarray(logits)).argmax(1)
    return round(100.0 * (pred == labels).float().mean().item(), 3)


def same_class(logits: np.ndarray, ref: np.ndarray) -> float:
    """% of images on which ``logits`` and ``ref`` [N, C] pick the same class (rounded to 3 places)."""
    return round(100.0 * float((logits.argmax(1) == ref.argmax(1)).mean()), 3) if len(ref) else 100.0


def in_chunks(fn, x: torch.Tensor, size: int = 256) -> np.ndarray:
    """``fn`` (numpy batch -> numpy logits) over ``x`` in chunks."""
    return np.concatenate([fn(x[i : i + size]) for i in range(0, len(x), size)])


def timed_ms(fn, warmup: int = 3, min_time: float = 0.5, max_iters: int = 300) -> tuple[float, float]:
    """(median, best) wall time of ``fn()`` in milliseconds, after warm-up (at least 10 timed calls).

    The median is the typical cost; the best is what the hardware does when nothing else runs (on
    shared cores the median also measures the neighbours)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_time or len(times) < 10):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return round(1000.0 * times[len(times) // 2], 4), round(1000.0 * times[0], 4)


def latencies(fn, x: torch.Tensor) -> dict[str, float]:
    """Milliseconds of ``fn`` on the first 1 and 32 images of ``x``: medians ``b1``, ``b32`` and the
    best calls ``b1_best``, ``b32_best``."""
    out = {}
    for b in LATENCY_BATCHES:
        out[f"b{b}"], out[f"b{b}_best"] = timed_ms(lambda b=b: fn(x[:b]))
    return out


def eager_fn(model: nn.Module):
    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        return model(x).float().numpy()

    return run


# ---------------------------------------------------------------- formats


def _onnx_export(model: nn.Module, example: torch.Tensor, path: str, opset: int | None = None) -> str:
    """Write ``path`` with a dynamic batch dimension in ``opset`` (None: the exporter's default); returns the exporter
    used. Below 18 the TorchScript-based exporter writes it: the dynamo exporter converts its opset-18 graph down and,
    where the conversion fails, keeps 18 without a word."""

    try:
        if opset is not None and opset < 18:
            raise NotImplementedError("the TorchScript-based exporter")
        torch.onnx.export(
            model,
            (example,),
            path,
            input_names=["images"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
            verbose=False,
            optimize=True,
            external_data=False,
            opset_version=opset,  # None: the exporter's default
        )  # one self-contained file (models under 2 GB)
        return "dynamo"
    except Exception:  # noqa: BLE001 (models torch.export cannot trace: the TorchScript-based exporter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                path,
                input_names=["images"],
                output_names=["logits"],
                dynamo=False,
                opset_version=opset or 18,
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
        return "torchscript"


def onnx_opset(path: str) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def ort_fn(path: str, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> np.ndarray:
        return sess.run(None, {name: x.numpy()})[0]

    return run


def _size_mb(path: str) -> float:
    total = os.path.getsize(path)
    data = path + ".data"  # external weights, when the exporter writes them
    if os.path.exists(data):
        total += os.path.getsize(data)
    return round(total / 1e6, 4)


class _Calibration:
    """onnxruntime CalibrationDataReader over normalised training images."""

    def __init__(self, name: str, x: torch.Tensor, batch: int = 32):
        self._batches = iter([{name: x[i : i + batch].numpy()} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(fp32_path: str, out_path: str, calib: torch.Tensor, workdir: str) -> None:
    """Static PTQ (QDQ, per-channel int8 weights, int8 activations, MinMax calibration)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepped = os.path.join(workdir, "prepped.onnx")
    try:
        # shape inference only: the exporter has already folded batch norms into the convolutions
        quant_pre_process(fp32_path, prepped, skip_optimization=True, skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 (pre-processing only helps; quantize the model as exported)
        log.warning("export: quantization pre-processing skipped (%s)", e)
        shutil.copyfile(fp32_path, prepped)
    name = ort.InferenceSession(prepped, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    quantize_static(
        prepped,
        out_path,
        _Calibration(name, calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    os.remove(prepped)


def calibration_images(cfg, data: DataBundle, n: int, seed: int) -> torch.Tensor:
    """``n`` training images drawn with ``seed`` (never test images); only those are decoded, not the split."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[:n]
    return split_images(cfg, data.train.subset(idx), data.in_chans).x


def _tag_onnx(path: str, spec: dict) -> None:
    """Write ``spec`` into the ONNX file's metadata (property ``kdrun.input``, JSON)."""
    import onnx

    model = onnx.load(path)
    props = {p.key: p.value for p in model.metadata_props} | {"kdrun.input": json.dumps(spec)}
    onnx.helper.set_model_props(model, props)
    _name_batch_dim(model.graph)
    onnx.save(model, path)


def _name_batch_dim(graph) -> None:
    """Call the input's first dimension ``batch`` everywhere it appears, as export.json and the README name it (the
    dynamo exporter names it after a symbol of its trace, e.g. ``s77``)."""
    first = graph.input[0].type.tensor_type.shape.dim[0] if graph.input else None
    old = first.dim_param if first is not None else ""
    if not old or old == "batch":
        return
    for info in [*graph.input, *graph.output, *graph.value_info]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = "batch"


def check_fits(name: str, path: str, ident: dict, data: DataBundle) -> None:
    """The checkpoint was trained on data shaped as the run's dataset reads now (classes, channels, size); else
    the exported file would label its logits with classes it was not trained on."""
    have = {"num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size}
    for key, value in have.items():
        if ident.get(key) != value:
            raise ExportError(
                f"export {name}: {path} was trained with {key}={ident.get(key)}, but the run's dataset "
                f"({data.name}) now reads {key}={value}; export it against the data it was trained on"
            )
    trained = ident.get("classes")  # checkpoints before classes were stored have only their count
    if trained is not None and list(trained) != list(data.classes):
        diff = next((i for i, (a, b) in enumerate(zip(trained, data.classes)) if a != b), None)
        what = f"class {diff} was '{trained[diff]}', now '{data.classes[diff]}'" if diff is not None else "its list"
        raise ExportError(
            f"export {name}: {path} was trained on other classes than the run's dataset ({data.name}) now has: "
            f"{what}; export it against the data it was trained on"
        )


def export_model(
    name: str,
    model: nn.Module,
    ident: dict,
    opts: ExportOptions,
    test: Images,
    workdir: str,
    calib: torch.Tensor | None,
    spec: dict | None = None,
) -> ModelExport:
    """Export one model (:func:`load_model`) into ``workdir``, ``spec`` (:func:`input_spec`) written into the file;
    ExportError when parity fails. ``calib``: the int8 calibration images (``quantize=int8``)."""
    eager = eager_fn(model)
    ref = in_chunks(eager, test.x)
    n_par = min(PARITY_IMAGES, len(test.x))
    if opts.format == "onnx":
        file = f"{name}.onnx"
        out = os.path.join(workdir, file)
        exporter = _onnx_export(model, test.x[:2], out, opts.opset)
        opset: int | None = onnx_opset(out)
        if opts.opset is not None and opset != opts.opset:
            raise ExportError(f"opset={opts.opset}: the {exporter} exporter wrote opset {opset}; nothing written")
        if spec is not None:
            _tag_onnx(out, spec)
        run = ort_fn(out, opts.threads)
    else:
        file, exporter, opset = f"{name}.torchscript.pt", "torch.jit.trace", None
        out = os.path.join(workdir, file)
        extra = {"kdrun.input.json": json.dumps(spec)} if spec is not None else {}
        with warnings.catch_warnings(record=True) as said:  # torch.jit's deprecation, once a call: said once below
            warnings.simplefilter("always", FutureWarning)
            with torch.inference_mode():
                torch.jit.save(torch.jit.trace(model, test.x[:2]), out, _extra_files=extra)
            run = eager_fn(torch.jit.load(out).eval())
        deprecated = any(issubclass(w.category, FutureWarning) and "deprecated" in str(w.message) for w in said)
        if deprecated and not _JIT_DEPRECATION_SAID[0]:
            log.warning(
                "export: torch %s deprecates TorchScript (torch.jit); format=onnx is the lasting format",
                torch.__version__.split("+")[0],
            )
            _JIT_DEPRECATION_SAID[0] = True
    got = in_chunks(run, test.x)
    diff = float(np.abs(got[:n_par] - ref[:n_par]).max())
    if not diff <= opts.atol:
        raise ExportError(
            f"export {name}: {opts.format} parity fails on {n_par} test images: largest |delta logit| "
            f"{diff:.3g} > atol={opts.atol:g}; nothing written"
        )
    res = ModelExport(
        name=name,
        arch=ident["arch"],
        format=opts.format,
        file=file,
        exporter=exporter,
        opset=opset,
        size_mb=_size_mb(out),
        top1_pytorch=top1(ref, test.y),
        top1=top1(got, test.y),
        agreement=same_class(got, ref),
        max_abs_diff=diff,
        parity_images=n_par,
        latency_ms=latencies(run, test.x),
        eager_latency_ms=latencies(eager, test.x),
    )
    if opts.quantize == "int8":
        qfile = f"{name}.int8.onnx"
        qout = os.path.join(workdir, qfile)
        assert calib is not None
        try:
            quantize_int8(out, qout, calib, workdir)
        except Exception as e:  # noqa: BLE001 (onnxruntime's quantizer raises what it meets: one line naming it)
            raise ExportError(
                f"export {name}: int8 quantization failed ({type(e).__name__}: {io.first_line(e)}); export it "
                "without quantize=int8; nothing written"
            ) from None
        if spec is not None:
            _tag_onnx(qout, spec)
        qrun = ort_fn(qout, opts.threads)
        qlogits = in_chunks(qrun, test.x)
        qtop1 = top1(qlogits, test.y)
        qlat = latencies(qrun, test.x)
        res.int8 = Int8Result(
            file=qfile,
            size_mb=_size_mb(qout),
            top1=qtop1,
            top1_drop=round(res.top1 - qtop1, 3),
            agreement=same_class(qlogits, ref),
            max_abs_diff=float(np.abs(qlogits - ref).max()),
            latency_ms=qlat,
            calibration_images=len(calib),
            speedup={k: round(res.latency_ms[k] / qlat[k], 3) for k in qlat},
        )
    return res


# ---------------------------------------------------------------- export.json and its table


def _check_installed(opts: ExportOptions) -> None:
    """ExportError naming the missing package (and the extra that brings it) before any work: ONNX export needs
    onnx (and onnxscript on newer torch), parity and int8 need onnxruntime."""
    from importlib.util import find_spec

    needed = ["onnx", "onnxscript", "onnxruntime"] if opts.format == "onnx" else []
    missing = [pkg for pkg in needed if find_spec(pkg) is None]
    if missing:
        raise ExportError(
            f"format={opts.format}: needs {', '.join(missing)}, not installed here; pip install 'kdrun[export]' "
            "(from a checkout: pip install -e '.[export]'), or format=torchscript"
        )


def run_export(opts: ExportOptions) -> dict:
    """Export every requested model; returns the ``export.json`` content (written last)."""

    ckpts = check_run(opts)
    _check_installed(opts)
    check_out(opts)  # before the data and the models are read
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfg = read_config(opts.run_dir)
    plugins.load(cfg.get("plugins"), _launch_dir(opts.run_dir))  # a model of the user's own
    from kdrun.run_data import load_dataset

    if cfg.dataset.get("root") is not None:
        cfg.dataset.root = opts.data_root or _run_root(cfg, opts.run_dir)
    elif opts.data_root:
        raise ExportError(f"dataset.root={opts.data_root}: the run's dataset, {cfg.dataset.name}, reads no folder")
    try:
        data = load_dataset(cfg.dataset)
    except ConfigError as e:
        if opts.data_root or "dataset.root" not in str(e):
            raise
        raise ExportError(f"{e}; export scores the run's test images: give dataset.root=DIR where they are now") from e
    models = {}
    for name, path in ckpts.items():  # before the test images are prepared (float32, all of them)
        models[name] = load_model(path)
        check_fits(name, path, models[name][1], data)
    test = split_images(cfg, data.test, data.in_chans)
    int8 = opts.quantize == "int8"
    calib = calibration_images(cfg, data, opts.calib, int(cfg.trainer.get("seed", 0))) if int8 else None
    spec = input_spec(cfg, data)
    os.makedirs(os.path.dirname(opts.out_dir), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".export-tmp-", dir=os.path.dirname(opts.out_dir))  # beside it: one rename
    final = os.path.join(work, "export")  # becomes RUN_DIR/export (or out=) once every model passed
    os.makedirs(final)
    try:
        results = [
            export_model(name, model, ident, opts, test, work, calib, spec=spec)
            for name, (model, ident) in models.items()
        ]
        for r in results:
            for f in [r.file] + ([r.int8.file] if r.int8 else []):
                for part in (f, f + ".data"):
                    if os.path.exists(os.path.join(work, part)):
                        os.replace(os.path.join(work, part), os.path.join(final, part))
        doc = {
            "run_dir": os.path.abspath(opts.run_dir),
            "dataset": str(cfg.dataset.name),
            "test_images": len(test.x),
            "input": spec,
            "options": {k: v for k, v in asdict(opts).items() if int8 or k != "calib"} | {"run_dir": opts.run_dir},
            "threads": {
                "torch": torch.get_num_threads(),
                "onnxruntime": opts.threads or "default",
                "cpu_count": os.cpu_count(),
            },
            "versions": _versions(),
            "models": [asdict(r) for r in results],
        }
        io.write_json(doc, os.path.join(final, "export.json"))
        _replace_dir(final, opts.out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return doc


def _launch_dir(run_dir: str) -> str | None:
    """The folder the run was launched from (Hydra records it); None without the record."""
    try:
        return str(io.load_yaml(os.path.join(run_dir, ".hydra", "hydra.yaml")).hydra.runtime.cwd)
    except Exception:  # noqa: BLE001 (no record)
        return None


def _run_root(cfg: DictConfig, run_dir: str):
    """``dataset.root`` as the run read it: a relative one is the folder the run was launched from's (Hydra records
    it), not this process's working folder."""
    root = OmegaConf.select(cfg, "dataset.root", default=None)
    if not isinstance(root, str) or not root or os.path.isabs(os.path.expanduser(root)):
        return root
    launched = _launch_dir(run_dir)
    return root if launched is None else os.path.join(launched, root)  # no record: this folder's, as before


def read_config(run_dir: str) -> DictConfig:
    """The run's ``.hydra/config.yaml``; one line naming the file when it cannot be read or lacks what export
    needs (e.g. emptied or edited by hand)."""
    path = os.path.join(run_dir, ".hydra", "config.yaml")
    cfg = io.load_yaml(path)
    needed = ("dataset.name", "dataset.mean", "dataset.std", "trainer")
    missing = [k for k in needed if not isinstance(cfg, DictConfig) or OmegaConf.select(cfg, k) is None]
    if missing:
        raise ExportError(f"export: {path}: not a kdrun run's config (no {missing[0]})")
    return cfg


def check_out(opts: ExportOptions) -> None:
    """The folder export replaces must be one it may replace and can write beside: RUN_DIR/export, or an ``out=``
    that is new, empty or an earlier export (export.json in it); a folder of other files is never removed."""
    out, parent = opts.out_dir, os.path.dirname(opts.out_dir)
    key = f"out={out}" if opts.out else f"export {opts.run_dir}"
    if opts.out and os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise ExportError(f"{key}: not a folder; give a new folder or an earlier export's")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "export.json")):
            raise ExportError(
                f"{key}: holds files that are no export (no export.json), which export would replace; "
                "give a new folder or an earlier export's"
            )
    existing = parent
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not io.can_create_in(existing):
        if opts.out:
            raise ExportError(f"{key}: cannot write there; give a folder you can write")
        raise ExportError(
            f"{key}: cannot write there (export writes RUN_DIR/export); copy the run folder somewhere writable and "
            "export the copy, or give out=DIR"
        )


# True while the new export is put in place: a SIGTERM/Ctrl-C then lets those renames finish (between them there
# would be no export at all, the earlier one renamed aside and the new one in the folder the stop removes)
_PLACING = [False]


def _replace_dir(new: str, dest: str) -> None:
    """Put folder ``new`` at ``dest``, replacing what was there (renamed aside first, then removed)."""
    old = None
    _PLACING[0] = True
    try:
        if os.path.lexists(dest):
            old = io.temp_name(dest, "old-tmp")
            os.replace(dest, old)
        os.replace(new, dest)
    finally:
        _PLACING[0] = False
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:  # a file (or link) named export: removed as well
            os.remove(old)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": str(torch.__version__)}
    for pkg in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _ms(lat: dict, b: int) -> str:
    """``median/best`` ms at batch ``b`` (older export.json files hold the median only)."""
    best = lat.get(f"b{b}_best")
    return f"{lat[f'b{b}']:.3f}" + (f"/{best:.3f}" if best is not None else "")


def export_table(doc: dict) -> str:
    """One row per exported file: top-1, size, runtime latency at batch 1/32, PyTorch eager latency."""
    w, fw = 15, 16
    head = (
        f"{'model':<22} {'format':<{fw}} {'top1':>6} {'drop':>5} {'agree':>6} {'MB':>7} {'runtime b1':>{w}} "
        f"{'runtime b32':>{w}} {'eager b1':>{w}} {'eager b32':>{w}} {'max|d|':>8}"
    )
    lines = [head]
    for m in doc["models"]:
        lat, eag = m["latency_ms"], m["eager_latency_ms"]
        label = f"{m['name']} {m['arch']}"[:22]
        lines.append(
            f"{label:<22} {m['format'] + ' fp32':<{fw}} {m['top1']:6.2f} {'':>5} {_agree(m):>6} {m['size_mb']:7.3f} "
            f"{_ms(lat, 1):>{w}} {_ms(lat, 32):>{w}} {_ms(eag, 1):>{w}} {_ms(eag, 32):>{w}} "
            f"{m['max_abs_diff']:8.1e}"
        )
        q = m.get("int8")
        if q:
            ql = q["latency_ms"]
            q_diff = f"{q['max_abs_diff']:8.1e}" if "max_abs_diff" in q else ""
            lines.append(
                f"{'':<22} {'onnx int8':<{fw}} {q['top1']:6.2f} {q['top1_drop']:5.2f} {_agree(q):>6} "
                f"{q['size_mb']:7.3f} {_ms(ql, 1):>{w}} {_ms(ql, 32):>{w}} {'':>{w}} {'':>{w}} {q_diff}"
            )
    rt = "onnxruntime CPU" if any(m["format"] == "onnx" for m in doc["models"]) else "TorchScript"
    drop = "drop = int8 top-1 loss in points; " if any(m.get("int8") for m in doc["models"]) else ""
    lines.append(
        f"test split of {doc['dataset']} ({doc['test_images']} images); runtime = {rt}; {drop}agree = % of test "
        "images given the PyTorch model's class; max|d| = largest |delta logit| against it; latency = median/best "
        f"ms per batch, {_threads_text(doc, rt)} of {doc['threads']['cpu_count']} CPU cores" + _busy_note(doc)
    )
    return "\n".join(lines)


def _threads_text(doc: dict, runtime: str) -> str:
    """``2 thread(s)``, or each runtime's own count where ``threads=`` set none (onnxruntime then takes one per
    physical core)."""
    threads = doc["threads"]
    if runtime.startswith("onnxruntime") and threads.get("onnxruntime") == "default":
        return f"eager {threads['torch']} thread(s), onnxruntime its default (one per physical core)"
    return f"{threads['torch']} thread(s)"


def _busy_note(doc: dict) -> str:
    """``"; timed on busy cores: medians up to 7.0x the best ..."`` when a median call took over
    :data:`~kdrun.models.report.BUSY_SPREAD` times the fastest (other work shared the cores), else ``""``."""
    from kdrun.models import report as mr

    tables = [m[k] for m in doc["models"] for k in ("latency_ms", "eager_latency_ms") if m.get(k)]
    tables += [m["int8"]["latency_ms"] for m in doc["models"] if (m.get("int8") or {}).get("latency_ms")]
    spreads = [t[f"b{b}"] / t[f"b{b}_best"] for t in tables for b in LATENCY_BATCHES if t.get(f"b{b}_best")]
    c = mr.Contention(max(spreads, default=1.0), None)
    return f"; {c.note()}: compare the best calls" if c.busy else ""


def _agree(m: dict) -> str:
    """The agreement column (exports written before it was recorded have none)."""
    return f"{m['agreement']:6.2f}" if "agreement" in m else "-"


def read_export(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "export", "export.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def export_main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    opts = parse_args(args)
    out_dir = opts.out_dir
    before = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    with _stopped_by_signals():
        doc = run_export(opts)
    print(export_table(doc))
    print(input_line(doc["input"]))
    print(f"written: {out_dir}/ ({', '.join(_files(doc))}, export.json)")
    gone = sorted(before - set(os.listdir(out_dir)))
    if gone:
        print(f"removed, with the earlier export.json they belonged to: {', '.join(gone)}")
    return 0


class Stopped(KdrunError):
    exit_code = 130


class _Signalled(BaseException):
    """Raised by the signal handler: a BaseException, so no ``except Exception`` on the way (the exporter's
    fallback) takes it for a failure and goes on."""


@contextmanager
def _stopped_by_signals():
    """SIGTERM or SIGINT (Ctrl-C) end the export with one line, its temporary folder removed and the earlier
    export left as it was (SIGTERM killed it where it stood, leaving ``.export-tmp-*`` in the run folder; Ctrl-C
    printed a traceback)."""
    import signal

    def stop(signum, frame):
        if not _PLACING[0]:
            raise _Signalled(signal.Signals(signum).name)
        name = signal.Signals(signum).name  # a few renames from done: finished, and said (os.write: safe here)
        os.write(2, f"\nkdrun: {name} received while the new export is put in place: finishing that\n".encode())

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except _Signalled as e:
        raise Stopped(f"export: stopped by {e}; nothing written, the earlier export kept") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def input_line(spec: dict) -> str:
    """The preprocessing a deployer needs, on one line (all of it is in export.json's ``input``)."""
    mean, std = (", ".join(f"{v:.4g}" for v in spec[k]) for k in ("mean", "std"))
    return (
        f"input '{spec['name']}': {spec['dtype']} {spec['layout']} {spec['shape']} = {spec['normalize']}, "
        f"mean [{mean}], std [{std}]; pixels: {spec['pixels']}; output '{spec['output']['name']}': "
        f"{len(spec['output']['classes'])} classes (names in export.json)"
    )


def _files(doc: dict) -> list[str]:
    return [f for m in doc["models"] for f in [m["file"]] + ([m["int8"]["file"]] if m.get("int8") else [])]
