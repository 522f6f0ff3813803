"""Figures of a run: evaluation, model statistics, ``metrics.json`` and the summary table."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys

import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun.engine import StageResult, accuracy, predict


def stable_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_summary(res: StageResult) -> dict:
    out = {"epochs": len(res.history), "seconds": round(res.seconds, 3),
           "images_per_s": round(res.images_per_s, 1)}
    if res.history:
        out["final_train_loss"] = res.history[-1]["loss"]
    if res.best_epoch is not None:
        out["best_epoch"], out["best_val_top1"] = res.best_epoch, res.best_val_top1
    return out


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    top1, top5 = accuracy(logits, labels)
    out = {"top1": round(top1, 3), "errors": int((logits.argmax(1) != labels.cpu()).sum())}
    if logits.shape[1] > 5:
        out["top5"] = round(top5, 3)
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Top-1 match rate of two models' predictions, in percent."""
    return round(100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item(), 3)


def evaluate_all(teacher, student, baseline, test_loader, run_dir: str, stages: dict, build) -> dict:
    """Test-set scores of the last-epoch weights, and of the validation-chosen best epoch where one exists."""
    labels = test_loader.labels
    t_logits = predict(teacher, test_loader)
    out = {"teacher": _scores(t_logits, labels)}
    for name, model in (("student", student), ("baseline", baseline)):
        if model is None:
            continue
        logits = predict(model, test_loader)
        out[name] = {"last": _scores(logits, labels) | {"agreement": agreement(logits, t_logits)}}
        best = stages.get(name, {}).get("best_epoch")
        if best is not None:  # chosen on the held-out validation split, never on test
            m = build()
            ckpt = torch.load(os.path.join(run_dir, "checkpoints", f"{name}_best.pt"), map_location="cpu",
                              weights_only=True)
            m.load_state_dict(ckpt["model"])
            logits = predict(m, test_loader)
            out[name]["best_on_val"] = _scores(logits, labels) | {"agreement": agreement(logits, t_logits),
                                                                 "epoch": best}
    return out


def model_stats(model: nn.Module, input_shape: tuple, name: str, latency: bool = True) -> dict:
    from kdrun.models import report as mr

    model = model.eval()
    stats = {"name": name, "params": mr.count_params(model), "flops": mr.count_flops(model, input_shape),
             "size_mb": round(mr.size_on_disk_mb(model), 4)}
    if latency:
        cpu_model = _cpu_copy(model)
        stats["latency_ms_cpu_b1"] = round(mr.latency_ms(cpu_model, input_shape, batch=1, device="cpu"), 4)
    return stats


def _cpu_copy(model: nn.Module) -> nn.Module:
    p = next(model.parameters(), None)
    if p is None or p.device.type == "cpu":
        return model
    import copy
    return copy.deepcopy(model).cpu()


def versions() -> dict:
    import hydra
    import torchvision

    return {"kdrun": _kdrun_version(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": hydra.__version__}


def _kdrun_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdrun")
    except PackageNotFoundError:
        return "unknown"


def assemble(cfg, data, results: dict, stages: dict, timings: dict, device) -> dict:
    t, s = results["models"]["teacher"], results["models"]["student"]
    ratios = {"compression_params": round(t["params"] / s["params"], 3),
              "compression_size": round(t["size_mb"] / s["size_mb"], 3),
              "flops_ratio": round(t["flops"] / max(s["flops"], 1), 3)}
    if "latency_ms_cpu_b1" in t:
        ratios["speedup_cpu_b1"] = round(t["latency_ms_cpu_b1"] / s["latency_ms_cpu_b1"], 3)
    metrics = {
        "status": "complete",
        "seed": cfg.trainer.seed,
        "device": str(device),
        "dataset": {"name": data.name, "identity": data.identity, "num_classes": data.num_classes,
                    "train": len(data.train), "test": len(data.test),
                    "val_fraction": float(cfg.trainer.val_fraction)},
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "test": {k: v for k, v in results.items() if k != "models"},
        "models": results["models"],
        "ratios": ratios,
        "stages": stages,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    if "baseline" in results:
        metrics["kd_gain_top1"] = round(results["student"]["last"]["top1"] - results["baseline"]["last"]["top1"], 3)
    return metrics


def write_json(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def summary_table(m: dict) -> str:
    """The short table printed at the end of a run."""
    test, models, r = m["test"], m["models"], m["ratios"]

    def row(label, scores, stats=None):
        top5 = f"{scores['top5']:6.2f}" if "top5" in scores else "     -"
        agree = f"{scores['agreement']:6.2f}" if "agreement" in scores else "     -"
        extra = ""
        if stats:
            lat = f"{stats['latency_ms_cpu_b1']:8.3f}" if "latency_ms_cpu_b1" in stats else "       -"
            extra = f" {stats['params'] / 1e6:8.3f} {stats['flops'] / 1e6:9.2f} {stats['size_mb']:8.3f} {lat}"
        return f"{label:<22} {scores['top1']:6.2f} {top5} {scores['errors']:6d} {agree}{extra}"

    lines = [f"{'':<22} {'top1':>6} {'top5':>6} {'errors':>6} {'agree':>6} {'params M':>8} "
             f"{'MFLOPs':>9} {'MB':>8} {'ms/img':>8}",
             row(f"teacher {models['teacher']['name']}", test["teacher"], models["teacher"]),
             row(f"student {models['student']['name']} (KD)", test["student"]["last"], models["student"])]
    if "best_on_val" in test["student"]:
        b = test["student"]["best_on_val"]
        lines.append(row(f"  best-on-val (ep {b['epoch']})", b))
    if "baseline" in test:
        lines.append(row("baseline (CE only)", test["baseline"]["last"]))
        if "best_on_val" in test["baseline"]:
            b = test["baseline"]["best_on_val"]
            lines.append(row(f"  best-on-val (ep {b['epoch']})", b))
    tail = (f"test split of {m['dataset']['name']} ({m['dataset']['test']} images), last epoch; "
            f"compression {r['compression_params']:.1f}x params")
    if "speedup_cpu_b1" in r:
        tail += f", CPU speed-up {r['speedup_cpu_b1']:.2f}x at batch 1"
    if "kd_gain_top1" in m:
        tail += f", KD gain {m['kd_gain_top1']:+.2f} pt top-1"
    tail += f"; {m['timings_s']['total']:.1f} s"
    return "\n".join(lines + [tail])
