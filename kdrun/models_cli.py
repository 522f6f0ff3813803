"""``kdrun models``: list the model zoo, or report one model's size, cost and feature points.

    kdrun models                                  # every registered model
    kdrun models resnet8x4 dataset=digits         # one model at a dataset's input size
    kdrun models mbv2 num_classes=100 image_size=32 in_chans=3

The input size comes from ``kdrun/configs/dataset/NAME.yaml`` (``num_classes``,
``image_size``, ``in_chans``; no data is loaded); explicit arguments override it.
"""

from __future__ import annotations

import os
import re
from importlib import resources

import torch
from omegaconf import OmegaConf

from kdrun.errors import ConfigError

USAGE = """usage: kdrun models [NAME [dataset=NAME] [num_classes=N] [image_size=N] [in_chans=N] [source=kdrun|timm]
                     [threads=N]]

Without NAME: list every registered model. With NAME: parameters, forward FLOPs, size on
disk, CPU (and GPU) latency at batch 1 and 32, as runs time them (the fastest call and the median,
at threads=N CPU threads, default torch's; a warning when the timing was disturbed by other
processes), and every feature point with its shape."""

DEFAULT_DATASET = "digits"
INT_ARGS = ("num_classes", "image_size", "in_chans")  # the input's size
ARGS = ("dataset",) + INT_ARGS + ("source", "threads")
BATCHES = (1, 32)  # the batches a run's summary times (metrics.json latency_ms_*_b1, _b32)


def models_main(args: list[str]) -> int:
    from kdrun.models import MODELS

    if any(a in ("-h", "--help", "help") for a in args):
        print(USAGE)
        return 0
    if not args:
        print_table(MODELS)
        return 0
    name = args[0]
    if "=" in name:
        raise ConfigError(f"models {name}: the first argument is a model name; valid: {', '.join(MODELS.names())}")
    opts = parse_args(args[1:])
    source = opts.pop("source", "kdrun")
    if "threads" in opts:
        torch.set_num_threads(opts.pop("threads"))
    if source == "kdrun":
        MODELS.get(name, "model")
    print_report(name, source, input_spec(opts))
    return 0


def parse_args(args: list[str]) -> dict:
    opts: dict = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in ARGS:
            raise ConfigError(f"models {arg}: not an option; valid: {', '.join(a + '=...' for a in ARGS)}")
        if key in INT_ARGS or key == "threads":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{key}={value}: not a positive integer; valid: e.g. {key}=10")
            opts[key] = int(value)
        else:
            opts[key] = value
    return opts


def dataset_names() -> list[str]:
    folder = resources.files("kdrun.configs").joinpath("dataset")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def dataset_spec(name: str) -> dict:
    """num_classes / image_size / in_chans of a dataset config (missing keys are left out)."""
    path = resources.files("kdrun.configs").joinpath("dataset", f"{name}.yaml")
    if not path.is_file():
        raise ConfigError(f"dataset={name}: unknown dataset; valid: {', '.join(dataset_names())}")
    cfg = OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=False)
    values = cfg if isinstance(cfg, dict) else {}
    return {k: values[k] for k in INT_ARGS if isinstance(values.get(k), int)}


def input_spec(opts: dict) -> dict:
    dataset = opts.get("dataset", DEFAULT_DATASET)
    spec = dataset_spec(dataset) | {k: opts[k] for k in INT_ARGS if k in opts}
    missing = [k for k in INT_ARGS if k not in spec]
    if missing:
        raise ConfigError(f"dataset={dataset}: its config has no {missing[0]}; valid: pass {missing[0]}=N")
    origin = "given" if all(k in opts for k in INT_ARGS) else f"dataset {dataset}"
    return spec | {"origin": origin}


def family(fn) -> str:
    return fn.__module__.rsplit(".", 1)[-1]


def summary(fn) -> str:
    """A model's docstring up to its first sentence's end or its options (``; ``name``: ...``), whole: it may run
    over several lines."""
    paragraph = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<!\bal\.)(?<!\be\.g\.)(?<=\.)\s+(?=[A-Z`(])", paragraph, maxsplit=1)[0]
    return sentence.split("; ``")[0]


def print_table(models) -> None:
    rows = [(n, family(models.get(n)), summary(models.get(n))) for n in models.names()]
    w0, w1 = max(len(r[0]) for r in rows + [("model",)]), max(len(r[1]) for r in rows + [("", "family")])
    print(f"{'model':<{w0}}  {'family':<{w1}}  description")
    for name, fam, doc in rows:
        print(f"{name:<{w0}}  {fam:<{w1}}  {doc}")
    print(f"\n{len(rows)} models; `kdrun models NAME [dataset=D]` for one model's report")


def print_report(name: str, source: str, spec: dict) -> None:
    from kdrun.models import build_model
    from kdrun.models import report as mr
    from kdrun.models.registry import feature_points

    model = build_model(
        name, spec["num_classes"], spec["in_chans"], spec["image_size"], key="model", source=source
    ).eval()
    shape = (spec["in_chans"], spec["image_size"], spec["image_size"])
    flops = mr.count_flops(model, shape)
    print(f"model          {name} (source {source})")
    print(f"input          {'x'.join(map(str, shape))}, {spec['num_classes']} classes ({spec['origin']})")
    print(f"parameters     {mr.count_params(model):,}")
    print(f"forward FLOPs  {flops:,} per image ({flops / 1e6:.2f} MFLOPs; {flops / 2e6:.2f} M multiply-adds)")
    print(f"size on disk   {mr.size_on_disk_mb(model):.3f} MB")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        on_device = model.to(device)
        b1, b32 = (mr.latency_ms(on_device, shape, batch=b, device=device) for b in BATCHES)
        print(
            f"latency {device:<6} {b1.best:.3f} ms at batch 1, {b32.best:.3f} ms at batch 32 "
            f"(fastest calls; medians {b1.median:.3f} and {b32.median:.3f} ms"
            + (f"; {torch.get_num_threads()} thread(s) of {os.cpu_count()} CPU cores)" if device == "cpu" else ")")
        )
        contention = mr.Contention.of([b1, b32])
        if contention.busy:
            print(f"{'':<15}{contention.note()}, {mr.load_text(*mr.cpu_load())}")
    model.cpu()
    shapes = mr.feature_shapes(model, shape)
    print("feature points (shape at batch 1):")
    width = max(len(n) for n in shapes)
    points = feature_points(model)
    for point, dims in shapes.items():
        where = points.get(point) or "(model output)"
        print(f"  {point:<{width}}  {str(dims):<20}  {where}")
