"""Figures of a run: evaluation, model statistics, ``metrics.json`` and the summary table."""

from __future__ import annotations

import copy
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun import io
from kdrun.engine import StageResult, accuracy, predict
from kdrun.errors import KdrunError
from kdrun.evaluation import top1
from kdrun.significance import format_p, mcnemar

if TYPE_CHECKING:
    from kdrun.models import report as mr


def stage_summary(res: StageResult) -> dict:
    out: dict[str, Any] = {
        "epochs": len(res.history),
        "seconds": round(res.seconds, 3),
        "images_per_s": round(res.images_per_s, 1),
    }
    if res.history:
        out["final_train_loss"] = res.history[-1]["loss"]
        if "val_top1" in res.history[-1]:
            out["final_val_top1"] = res.history[-1]["val_top1"]
    if res.best_epoch is not None:
        out["best_epoch"], out["best_val_top1"] = res.best_epoch, res.best_val_top1
    return out


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    right1, right5 = accuracy(logits, labels)
    labels = labels.cpu()
    wrong = top1(logits) != labels
    out: dict[str, Any] = {"top1": round(right1, 3), "errors": int(wrong.sum())}
    if logits.shape[1] > 5:
        out["top5"] = round(right5, 3)
    out["errors_by_class"] = torch.bincount(labels[wrong], minlength=logits.shape[1]).tolist()  # by true class
    return out


def biased(logits: torch.Tensor, bias: dict) -> torch.Tensor:
    """``logits`` with ``bias[c]`` added to class ``c``'s logit (``evaluate.logit_bias``)."""
    shift = torch.zeros(logits.shape[1])
    for c, b in bias.items():
        shift[int(c)] = float(b)
    return logits + shift


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Top-1 match rate of two models' predictions, in percent."""
    pa, pb = top1(a), top1(b)
    return round(100.0 * ((pa == pb) & (pa >= 0)).float().mean().item(), 3)


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured on the test split, by model name."""

    scores: dict  # metrics.json ``test``
    logits: dict[str, torch.Tensor]  # last-epoch logits
    flip_tta: dict[str, torch.Tensor] = field(default_factory=dict)  # the same with flip TTA (evaluate.flip_tta)


def evaluate(cfg, data, stages, roles) -> Evaluation:
    """Test-set scores of every model the run's ``stages`` trained or loaded (last epoch; plus
    best-on-validation where chosen), and every model's last-epoch test logits.

    ``data``: the run's :class:`kdrun.run_data.RunData`; ``stages``: its :class:`kdrun.stages.StageRunner`;
    ``roles``: the scheme's :class:`kdrun.train.Roles`. Agreement is the top-1 match rate with the model in
    the teacher role (or, without one, with the student).
    """
    loader = data.test_loader
    labels = loader.labels
    logits = {name: predict(t.model, loader) for name, t in stages.models.items()}
    ref = roles.teacher or roles.student
    out = {}
    for name, trained in stages.models.items():
        scores = _scores(logits[name], labels)
        if name != ref:
            scores["agreement"] = agreement(logits[name], logits[ref])
        if trained.stage is None:
            out[name] = scores
            continue
        out[name] = {"last": scores}
        best = stages.log.summaries.get(trained.stage, {}).get("best_epoch")
        if best is not None:  # chosen on the held-out validation split, never on test
            m = copy.deepcopy(trained.model)
            path = os.path.join(stages.ckpt_dir, f"{trained.stage}_best.pt")
            ckpt = io.load_checkpoint(path)  # verified
            if ckpt is None:
                raise KdrunError(f"{path}: missing (written when the stage chose epoch {best}); rerun the stage")
            if ckpt.get("epoch") != best:
                raise KdrunError(
                    f"{path}: holds epoch {ckpt.get('epoch')}, but the stage chose epoch {best} on the validation "
                    "split; rerun the stage"
                )
            m.load_state_dict(ckpt["model"])
            best_logits = predict(m, loader)
            out[name]["best_on_val"] = _scores(best_logits, labels) | {"epoch": best}
            if name != ref:
                out[name]["best_on_val"]["agreement"] = agreement(best_logits, logits[ref])
    bias = dict(cfg.get("evaluate", {}).get("logit_bias") or {})
    student = roles.student
    if bias and student in out:  # e.g. Hinton et al. section 3: raise the bias of a class the transfer set lacked
        out[student]["with_logit_bias"] = _scores(biased(logits[student], bias), labels) | {
            "bias": {str(c): float(b) for c, b in bias.items()}
        }
    tta = _score_flip_tta(out, stages, roles, loader, logits) if (cfg.get("evaluate") or {}).get("flip_tta") else {}
    return Evaluation(out, logits, tta)


def _score_flip_tta(out: dict, stages, roles, loader, single: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``evaluate.flip_tta``: every model's last-epoch scores on the mean logits of each test image and its mirror
    (``with_flip_tta``), agreement under the same protocol, and the student's gain over the baseline with its
    paired test; returns the flip-TTA logits. The run's own figures (and the logit caches, and the distillation
    targets) stay single-view."""
    labels = loader.labels
    tta = {name: predict(t.model, loader, flip_tta=True, single=single[name]) for name, t in stages.models.items()}
    ref = roles.teacher or roles.student
    for name, logits in tta.items():
        scores = _scores(logits, labels)
        if name != ref:
            scores["agreement"] = agreement(logits, tta[ref])
        out[name]["with_flip_tta"] = scores
    if roles.baseline is not None:
        s = out[roles.student]["with_flip_tta"]
        paired = mcnemar(tta[roles.student], tta[roles.baseline], labels)
        s["kd_gain_top1"] = paired.gain_top1  # from the counts, not a difference of two rounded figures
        s["kd_gain"] = paired.as_dict()
    return tta


def last(scores: dict) -> dict:
    """The last-epoch scores of a model entry (trained here or loaded)."""
    return scores.get("last", scores)


def model_stats(model: nn.Module, input_shape: tuple, name: str) -> dict:
    from kdrun.models import report as mr

    model = model.eval()
    return {
        "name": name,
        "params": mr.count_params(model),
        "flops": mr.count_flops(model, input_shape),
        "size_mb": round(mr.size_on_disk_mb(model), 4),
    }


@dataclass(frozen=True)
class CpuLatency:
    """What :func:`cpu_latency` measured: each network's :class:`~kdrun.models.report.Timing` at batch 1 and
    32, and the conditions: torch threads, the 1-minute load average when timing began (it lags, and counts
    this run's own training just before), the CPUs this process may use."""

    b1: dict[str, mr.Timing]
    b32: dict[str, mr.Timing]
    threads: int
    load_1min: float | None
    cpus: int

    @property
    def contention(self) -> mr.Contention:
        from kdrun.models import report as mr

        return mr.Contention.of([*self.b1.values(), *self.b32.values()])

    def stats(self, role: str) -> dict:
        """``metrics.json`` keys of one network: ``latency_ms_cpu_b1`` / ``_b32`` the median call (as ever),
        ``latency_ms_cpu_b1_best`` / ``_b32_best`` the fastest, and the torch threads."""
        out: dict[str, Any] = {}
        for b, timing in (("b1", self.b1[role]), ("b32", self.b32[role])):
            out[f"latency_ms_cpu_{b}"] = round(timing.median, 4)
            out[f"latency_ms_cpu_{b}_best"] = round(timing.best, 4)
        return out | {"latency_threads": self.threads}

    def verdict(self) -> dict:
        """``metrics.json`` ``cpu_timing``: what the speed-ups are a ratio of, the conditions, and whether the
        timing was disturbed (:class:`~kdrun.models.report.Contention`)."""
        c = self.contention
        return {
            "speedups_from": "best",  # ratios.speedup_cpu_*: teacher's fastest call over the student's
            "load_1min": self.load_1min,
            "cpus": self.cpus,
            "median_over_best_max": round(c.spread, 3),
            "queued_max": None if c.queued is None else round(c.queued, 3),
            "busy": c.busy,
        }


def cpu_latency(nets: dict[str, nn.Module], input_shape: tuple) -> CpuLatency:
    """Median and best time of one forward pass of each network at batch 1 and 32 on the CPU, and the
    conditions they were timed in. The networks are timed in alternating rounds
    (:func:`kdrun.models.report.latencies_ms`), so their ratio is a fair one. Both batches are reported because
    they rank models differently: at batch 1 a deep, thin student can be bound by per-layer dispatch, while at 32
    its arithmetic counts."""
    from kdrun.models import report as mr

    cpu = {role: _cpu_copy(net) for role, net in nets.items()}
    load, cpus = mr.cpu_load()
    b1 = mr.latencies_ms(cpu, input_shape, batch=1, device="cpu")
    # a large model's batch of 32 takes seconds on a CPU: a few passes, still in alternating rounds
    b32 = mr.latencies_ms(cpu, input_shape, batch=32, device="cpu", warmup=1, rounds=3, min_iters=1)
    return CpuLatency(b1, b32, torch.get_num_threads(), load, cpus)


def _cpu_copy(model: nn.Module) -> nn.Module:
    p = next(model.parameters(), None)
    if p is None or p.device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu()


def versions() -> dict:
    import hydra
    import torchvision

    return {
        "kdrun": _kdrun_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "hydra": hydra.__version__,
    }


def _kdrun_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdrun")
    except PackageNotFoundError:
        return "unknown"


def assemble(cfg, run_data, stages, roles, store_refs: dict, results: dict, logits: dict[str, torch.Tensor]) -> dict:
    """``metrics.json`` of a run (arguments as :func:`evaluate`'s; ``store_refs``: the store entries it used)."""
    data, trained = run_data.data, stages.models
    input_shape = (data.in_chans, data.image_size, data.image_size)
    named = {role: trained[name] for role, name in roles.items() if role in ("teacher", "student")}
    models = {role: model_stats(m.model, input_shape, m.mcfg.name) for role, m in named.items()}
    timing = cpu_latency({role: m.model for role, m in named.items()}, input_shape) if cfg.trainer.latency else None
    if timing is not None:
        for role in models:
            models[role] |= timing.stats(role)
    test = dict(results)
    test.setdefault("student", results[roles.student])  # online: the chosen peer
    metrics = {
        "status": "complete",
        "seed": cfg.trainer.seed,
        "device": str(run_data.device),
        "scheme": cfg.scheme.name,
        "roles": dict(roles.items()),
        "dataset": {
            "name": data.name,
            "identity": data.identity,
            "content": data.content_key(),
            "num_classes": data.num_classes,
            "classes": list(data.classes),  # index -> name: errors_by_class, student_exclude, logit_bias count by index
            "train": len(run_data.train_set),
            "student_train": len(run_data.student_set),
            "val": len(run_data.val_set) if run_data.val_set else 0,
            "student_fraction": float(cfg.dataset.get("student_fraction", 1.0)),
            "test": len(data.test),
            "val_fraction": float(cfg.trainer.val_fraction),
        },
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "test": test,
        "models": models,
        "ratios": ratios(models),
        **({"cpu_timing": timing.verdict()} if timing is not None else {}),
        "stages": stages.log.summaries,
        "timings_s": {k: round(v, 3) for k, v in stages.log.seconds.items()},
        "store": store_refs,
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    if roles.baseline is not None:  # the gain with its uncertainty: a paired test on the test images
        paired = mcnemar(logits[roles.student], logits[roles.baseline], run_data.test_loader.labels)
        metrics["kd_gain_top1"] = paired.gain_top1  # from the counts, not a difference of two rounded figures
        metrics["kd_gain_p_value"] = paired.p_value
        metrics["kd_gain"] = paired.as_dict()
    return metrics


def ratios(models: dict) -> dict:
    """Teacher over student: parameters, size, FLOPs, and ``speedup_cpu_b1`` / ``_b32`` from their fastest calls
    (``latency_ms_cpu_*_best``: a burst of load from elsewhere inflates medians, rarely the best call)."""
    if "teacher" not in models:
        return {}
    t, s = models["teacher"], models["student"]
    out = {
        "compression_params": round(t["params"] / s["params"], 3),
        "compression_size": round(t["size_mb"] / s["size_mb"], 3),
        "flops_ratio": round(t["flops"] / max(s["flops"], 1), 3),
    }
    for b in ("b1", "b32"):
        if f"latency_ms_cpu_{b}_best" in t:
            out[f"speedup_cpu_{b}"] = round(t[f"latency_ms_cpu_{b}_best"] / s[f"latency_ms_cpu_{b}_best"], 3)
    return out


def cpu_timing_note(m: dict) -> str:
    """How the summary qualifies CPU times: fastest calls, and a warning when the cores were busy."""
    from kdrun.models import report as mr

    note = "fastest calls"
    v = m.get("cpu_timing")
    if v and v["busy"]:
        note += "; " + mr.Contention(v["median_over_best_max"], v["queued_max"]).note()
        note += ", " + mr.load_text(v["load_1min"], v["cpus"])
    return note


def write_json(obj: dict, path: str) -> None:
    """``obj`` as JSON at ``path``, written atomically (:func:`kdrun.io.write_json`)."""
    io.write_json(obj, path)


def summary_table(m: dict) -> str:
    """The short table printed at the end of a run: one row per model, roles labelled."""
    test, models, r, roles = m["test"], m["models"], m["ratios"], m["roles"]
    roles_of: dict[str, list[str]] = {}  # a model may hold two (scheme=self: gen1 teaches and is the baseline)
    for role, name in roles.items():
        roles_of.setdefault(name, []).append(role)

    entries = []  # (label, scores, model figures)
    for name, scores in test.items():
        if name == "student" and roles.get("student") != "student":
            continue  # an alias of the chosen peer
        held = roles_of.get(name, [])
        stats = next((models.get(r) for r in held if r in ("teacher", "student") and models.get(r)), None)
        label = name if held in ([], [name]) else f"{name} ({', '.join(held)})"
        if stats:
            label += f" {stats['name']}"
        entries.append((label, last(scores), stats))
        if "best_on_val" in scores:
            b = scores["best_on_val"]
            entries.append((f"  best-on-val (ep {b['epoch']})", b, None))
        if "with_logit_bias" in scores:
            b = scores["with_logit_bias"]
            entries.append(("  with logit bias " + ",".join(f"{c}:{v:+g}" for c, v in b["bias"].items()), b, None))
        if "with_flip_tta" in scores:
            entries.append(("  flip TTA", scores["with_flip_tta"], None))
    width = max([30, *(len(e[0]) for e in entries)])

    def row(label, scores, stats=None):
        top5 = f"{scores['top5']:6.2f}" if "top5" in scores else "     -"
        agree = f"{scores['agreement']:6.2f}" if "agreement" in scores else "     -"
        extra = ""
        if stats:
            lat = f"{stats['latency_ms_cpu_b1_best']:8.3f}" if "latency_ms_cpu_b1_best" in stats else "       -"
            extra = f" {stats['params'] / 1e6:8.3f} {stats['flops'] / 1e6:9.2f} {stats['size_mb']:8.3f} {lat}"
        return f"{label:<{width}} {scores['top1']:6.2f} {top5} {scores['errors']:6d} {agree}{extra}"

    lines = [
        f"{'':<{width}} {'top1':>6} {'top5':>6} {'errors':>6} {'agree':>6} {'params M':>8} "
        f"{'MFLOPs':>9} {'MB':>8} {'ms b1':>8}"
    ]
    lines += [row(*e) for e in entries]
    tail = f"test split of {m['dataset']['name']} ({m['dataset']['test']} images), last epoch"
    if r:
        tail += f"; compression {r['compression_params']:.1f}x params"
    if "speedup_cpu_b1" in r:
        tail += f", CPU speed-up {r['speedup_cpu_b1']:.2f}x at batch 1"
        if "speedup_cpu_b32" in r:
            tail += f", {r['speedup_cpu_b32']:.2f}x at batch 32"
        tail += f" ({cpu_timing_note(m)})"
    if "kd_gain_top1" in m:
        tail += f", KD gain {m['kd_gain_top1']:+.2f} pt top-1 over {roles['baseline']}"
        if "kd_gain" in m:
            g = m["kd_gain"]
            ci = f"95% interval [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}] pt, " if "ci95" in g else ""
            tail += (
                f" ({ci}exact McNemar p = {format_p(g['p_value'])}: {g['student_only']} test images right only with "
                f"KD, {g['baseline_only']} only without; over the draw of these images, not training seeds)"
            )
    tta = test.get("student", {}).get("with_flip_tta", {})
    if "kd_gain" in tta:
        tail += f"; with flip TTA {tta['kd_gain_top1']:+.2f} pt (p = {format_p(tta['kd_gain']['p_value'])})"
    if any(stats for *_, stats in entries):
        tail += "; MFLOPs: 2 a multiply-add; ms b1: the fastest CPU call at batch 1"
    tail += f"; {m['timings_s']['total']:.1f} s"
    return "\n".join(lines + [tail])
