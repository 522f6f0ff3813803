"""The report of a sweep (or of any tree of runs): ``report.md``, ``report.csv`` and PNG plots (drawn by
:mod:`kdrun.sweep_plots`).

A run is any directory holding ``.hydra/overrides.yaml``. Its status is
``complete`` (``metrics.json`` present), ``failed`` (a ``FAILED`` note),
``stopped`` (the ``FAILED`` note of a SIGTERM/SIGINT stop: kdrun train resume=RUN_DIR continues it),
``unreadable`` (a ``metrics.json`` that cannot be parsed), ``running`` (neither yet, and a process at work in it),
``killed`` (neither, and nobody at work in it: SIGKILL, out of memory; :mod:`kdrun.runlock`) or ``incomplete``
(neither, from a kdrun that kept no such record). Keys whose values differ between runs are the swept keys; a key
that a run does not override takes that run's composed value (``.hydra/config.yaml``,
or its config-group choice), so ``trainer.val_fraction=0`` given on the command
line matches a preset that already sets 0. Keys that say only where a run reads or
writes or how fast it runs (:data:`PLACE_KEYS`) never make a setting.
``trainer.seed`` repeats of one setting are aggregated as mean ± std.
A problem with one run or one plot is noted and never stops the rest.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import shlex
import statistics
from dataclasses import dataclass, field

import yaml

from kdrun import io as kio
from kdrun.errors import ConfigError
from kdrun.significance import mean_ci

log = logging.getLogger("kdrun")

SEED_KEY = "trainer.seed"
# where a run reads or writes, how fast and how verbosely it runs: never part of what it trains
PLACE_KEYS = (
    "paths",
    "store",
    "logger",
    "trainer.threads",
    "trainer.log_every",
    "trainer.latency",
    "trainer.eval_batch_size",
    "trainer.checkpoint_every_steps",
    "dataset.root",  # where the data is read from; what it is, is DATA_KEY
    "dataset.download",
    "sweep",  # how a sweep searches (its launcher, sweeper and metric), not what a run trains
)
DATA_KEY = "dataset.content"  # what a run's data is (metrics.json; a copy elsewhere has the same), complete runs only
SKIP_DIRS = {".hydra", "checkpoints", ".submitit", "__pycache__"}
SCORE_COLUMNS = [
    "student_top1",
    "student_top1_at_best_val",
    "student_val_top1",
    "vs_best_val",
    "vs_best_val_p",
    "teacher_top1",
    "baseline_top1",
    "agreement",
    "kd_gain_top1",
    "kd_gain_p",
    "wall_s",
]


@dataclass
class Run:
    """One run directory: its overrides, status and (when complete) its scores."""

    path: str
    name: str
    overrides: dict[str, str]
    status: str
    scores: dict[str, float | None] = field(default_factory=dict)
    note: str = ""
    overrides_read: bool = True
    composed: dict[str, str] = field(default_factory=dict)  # flattened scalar config values and group choices

    def value(self, key: str) -> str:
        """The run's value of ``key``: its override, else its composed value, else ``-``; numbers canonical."""
        if key in self.overrides:
            return canonical(self.overrides[key])
        return self.composed.get(key, "-")


# ---------------------------------------------------------------- finding and reading runs


def find_run_dirs(root: str) -> list[str]:
    """Every directory under ``root`` (itself included) that holds ``.hydra/overrides.yaml``."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if os.path.isfile(os.path.join(dirpath, ".hydra", "overrides.yaml")):
            found.append(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    return sorted(found, key=_natural_key)


def _natural_key(path: str) -> list:
    """Sort ``.../2`` before ``.../10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def parse_overrides(lines: list) -> dict[str, str]:
    """``["a.b=1", "+c=x"]`` -> ``{"a.b": "1", "c": "x"}`` (Hydra's own keys and deletions dropped)."""
    out = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith("hydra."):
            out[key] = value
    return out


def read_overrides(run_dir: str) -> dict[str, str]:
    from omegaconf import OmegaConf

    lines = OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, ".hydra", "overrides.yaml")))
    return parse_overrides(lines if isinstance(lines, list) else [])


def canonical(text) -> str:
    """One spelling per value: ``"0"``, ``0.0``, ``"0.0"`` -> ``"0"``; ``1e-3`` -> ``"0.001"``; ``True`` -> "true";
    a list (or an override's ``[1e-3, 2]``) -> ``"[0.001,2]"``."""
    if isinstance(text, bool):
        return str(text).lower()
    if text is None:
        return "null"
    if isinstance(text, list | tuple):
        return "[" + ",".join(canonical(v) for v in text) + "]"
    if isinstance(text, dict):
        return "{" + ",".join(f"{k}:{canonical(v)}" for k, v in sorted(text.items(), key=str)) + "}"
    text = str(text)
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return canonical(parsed)
    if not is_number(text):
        return text
    number = repr(float(text))
    return number[:-2] if number.endswith(".0") else number


def read_composed(run_dir: str) -> dict[str, str]:
    """Scalar values of ``.hydra/config.yaml`` by dotted key, and config-group choices from ``.hydra/hydra.yaml``.

    Interpolations are resolved within the config (``loss.beta: ${oc.select:pair_defaults.dkd.beta,8.0}`` is 8.0,
    as the run used it, so it pools with a run that overrode ``loss.beta=8``); one that needs the running job
    (``${hydra:...}``) stays as saved. Missing or unreadable files give nothing.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    out: dict[str, str] = {}

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():  # as saved: an integer key (evaluate.logit_bias={3: 3.5}) is not found as "3"
            k = str(key)
            try:
                v = node[key]
            except Exception:  # noqa: BLE001 (an interpolation that cannot be resolved here: as saved)
                v = node._get_node(key)._value()  # type: ignore[union-attr]
            if isinstance(v, DictConfig):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, ListConfig):
                try:
                    out[f"{prefix}{k}"] = canonical(OmegaConf.to_container(v, resolve=True))
                except Exception:  # noqa: BLE001 (an interpolation that cannot be resolved here: as saved)
                    out[f"{prefix}{k}"] = canonical(str(v))
            else:
                out[f"{prefix}{k}"] = canonical(v)

    try:
        composed = OmegaConf.load(os.path.join(run_dir, ".hydra", "config.yaml"))
        if isinstance(composed, DictConfig):
            walk(composed, "")
    except (OSError, yaml.YAMLError, OmegaConfBaseException, AttributeError, TypeError):
        pass
    try:
        with open(os.path.join(run_dir, ".hydra", "hydra.yaml")) as f:
            choices = ((yaml.safe_load(f) or {}).get("hydra") or {}).get("runtime", {}).get("choices") or {}
        out |= {k: canonical(v) for k, v in choices.items() if not k.startswith("hydra/")}
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return out


def is_place_key(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in PLACE_KEYS)


def _last(entry: dict | None) -> dict:
    """Last-epoch scores of a ``metrics.json`` test entry (trained: ``{"last": ...}``; loaded: flat)."""
    if not isinstance(entry, dict):
        return {}
    return entry.get("last", entry)


def scores_of(metrics: dict) -> dict[str, float | None]:
    """The report's score columns from one run's ``metrics.json``."""
    test, roles = metrics.get("test", {}), metrics.get("roles", {})
    student = test.get("student") or test.get(roles.get("student", ""), {})
    teacher = test.get(roles["teacher"]) if "teacher" in roles else None
    baseline = test.get(roles["baseline"]) if "baseline" in roles else None
    scores = {
        "student_top1": _last(student).get("top1"),
        "student_top1_at_best_val": (student.get("best_on_val") or {}).get("top1"),
        "student_val_top1": _student_val_top1(metrics),
        "teacher_top1": _last(teacher).get("top1"),
        "baseline_top1": _last(baseline).get("top1"),
        "agreement": _last(student).get("agreement"),
        "kd_gain_top1": metrics.get("kd_gain_top1"),
        "kd_gain_p": metrics.get("kd_gain_p_value"),
        "wall_s": (metrics.get("timings_s") or {}).get("total"),
    }
    # a figure that is not a finite number (NaN: an empty split; a hand-edited file) is no figure: it stopped the
    # report's means and deviations with a traceback
    return {k: v if isinstance(v, (int, float)) and math.isfinite(v) else None for k, v in scores.items()}


def _student_val_top1(metrics: dict) -> float | None:
    """The distilled student's last-epoch validation top-1, also where it trained in a stage with others
    (``scheme=online``'s peers): what sweepers optimise (:func:`kdrun.objective.value`); None without one."""
    from kdrun import objective

    v = objective.value(metrics, objective.Metric("student", "val_top1"))
    return None if math.isnan(v) else v


STOPPED = re.compile(r"\bstopped by SIG[A-Z]+\b")
NOT_KDRUN = "not a kdrun run's (no trainer settings, or no roles and test scores)"


def load_run(run_dir: str, root: str) -> Run:
    """Read one run directory; any problem becomes its status and note, never an exception."""
    name = os.path.relpath(run_dir, root)
    try:
        overrides = read_overrides(run_dir)
    except Exception as e:
        return Run(run_dir, name, {}, "unreadable", note=f".hydra/overrides.yaml: {e}", overrides_read=False)
    composed = read_composed(run_dir)
    if composed and not any(k.startswith("trainer.") for k in composed):  # another Hydra application's run
        return Run(run_dir, name, {}, "unreadable", note=f".hydra/config.yaml: {NOT_KDRUN}", overrides_read=False)
    run = Run(run_dir, name, overrides, "running", composed=composed)
    metrics_path, failed_path = os.path.join(run_dir, "metrics.json"), os.path.join(run_dir, "FAILED")
    if os.path.isfile(metrics_path):
        try:
            with open(metrics_path) as f:
                metrics = json.load(f)
        except Exception as e:
            run.status, run.note = "unreadable", f"metrics.json: {type(e).__name__}: {e}"
            return run
        if not isinstance(metrics, dict) or not {"roles", "test"} <= metrics.keys():
            return Run(run_dir, name, {}, "unreadable", note=f"metrics.json: {NOT_KDRUN}", overrides_read=False)
        run.status, run.scores, run.note = "complete", scores_of(metrics), ""
        data = metrics.get("dataset")
        data = data if isinstance(data, dict) else {}
        if data.get("content"):  # not the identity of earlier kdruns: it held file times, which a copy changes
            run.composed[DATA_KEY] = str(data["content"])
    elif os.path.isfile(failed_path):
        run.note = first_line(failed_path)
        # stopped by SIGTERM/SIGINT (preemption, Ctrl-C), its checkpoint saved: kdrun train resume=RUN_DIR goes on
        run.status = "stopped" if STOPPED.search(run.note) else "failed"
    else:
        run.status, run.note = _unfinished(run_dir)
    return run


def _unfinished(run_dir: str) -> tuple[str, str]:
    """(status, note) of a run with neither ``metrics.json`` nor a ``FAILED`` note."""
    from kdrun import runlock

    state = runlock.state(run_dir)
    if state == "running":
        return "running", "no metrics.json yet"
    if state == "killed":
        why = "ended without a word (SIGKILL, out of memory, its machine went down)"
        return "killed", f"{why}; kdrun train resume={shlex.quote(run_dir)} continues it"
    if state == "elsewhere":
        return "incomplete", f"no metrics.json; {runlock.holder(run_dir)}: running there, or killed (only it can tell)"
    return "incomplete", "no metrics.json and no FAILED note: running, or killed, under a kdrun that kept no record"


def first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()[:200]
    except OSError as e:
        return str(e)


def collect(root: str) -> list[Run]:
    """All runs under ``root``: complete ones by :func:`rank_key` (best first), then the rest."""
    runs = [load_run(d, root) for d in find_run_dirs(root)]
    paired_with_best(runs)
    key = rank_key(runs)
    return sorted(runs, key=lambda r: _rank(r, key))


# How the complete runs are ordered, best first, and how the report words that order: by the distilled student's
# validation top-1 when every complete run has a validation split (held out of training: a choice may rest on it),
# else by its test top-1, which orders the table for reading but must never choose a setting.
RANKED_BY = {
    "student_val_top1": "the distilled student's last-epoch validation top-1",
    "student_top1": "the distilled student's last-epoch test top-1 (not every run holds a validation split: "
    "an order for reading, not a choice)",
}


def rank_key(runs: list[Run]) -> str:
    """``student_val_top1`` when every complete run has one, else ``student_top1`` (see :data:`RANKED_BY`)."""
    complete = [r for r in runs if r.status == "complete" and r.scores.get("student_top1") is not None]
    if complete and all(r.scores.get("student_val_top1") is not None for r in complete):
        return "student_val_top1"
    return "student_top1"


def top_label(key: str) -> str:
    """What the first run of the order is called: the best on validation, or only the highest on test."""
    return "best by validation top-1" if key == "student_val_top1" else "highest test top-1 (not a choice)"


def paired_with_best(runs: list[Run]) -> None:
    """``vs_best_val`` and ``vs_best_val_p`` of each complete run: its distilled student against the best one on the
    same validation images, image by image from their ``predictions.pt`` (:func:`kdrun.compare.compare`: the
    difference in points, the exact McNemar p-value). Runs without such a file (or a validation split) get neither.

    The best is chosen on the even-numbered validation images and every run is compared with it on the odd-numbered
    ones: chosen and compared on the same images, the best also wins by its luck on them. The p-values of the runs
    compared with one best are Holm-adjusted (:func:`kdrun.significance.holm`). ``scripts/bench_paired_stats.py``:
    of 10 settings of equal accuracy on 2,000 images, 12.6 % came out below the best at p < 0.05 before, 0.2 % now;
    the price is power (a setting 2 points worse is flagged 8.5 % of the time, 91.5 % before)."""
    from kdrun import predictions
    from kdrun.compare import compare
    from kdrun.errors import KdrunError
    from kdrun.significance import holm

    same_images: dict[str, list[tuple[Run, predictions.SplitPredictions, str]]] = {}
    for run in runs:
        if run.status != "complete" or not os.path.isfile(os.path.join(run.path, predictions.FILE)):
            continue
        try:
            p = predictions.read(run.path)
        except KdrunError as e:
            run.note = f"{predictions.FILE}: {e}"
            continue
        val, student = p.splits.get("val"), p.roles.get("student", "")
        if val is not None and student in val.top1 and len(val.labels) >= 2:
            same_images.setdefault(val.images, []).append((run, val, student))
    for members in same_images.values():
        if len(members) < 2:
            continue
        best_run, best, best_student = max(
            members, key=lambda m: float(m[1].every_other(0).correct(m[2]).float().mean())
        )
        judged = best.every_other(1)
        others = []
        for run, val, student in members:
            c = compare(val.every_other(1), student, judged, best_student)
            run.scores["vs_best_val"] = c.difference
            if run is not best_run:
                others.append((run, c.p_value))
        best_run.scores["vs_best_val_p"] = None
        # the table is sorted on the whole split, the best chosen on its even half: it need not be the top row
        best_run.note = best_run.note or f"the best of {len(members)} on these validation images (even-numbered)"
        for (run, _), p_adjusted in zip(others, holm([p for _, p in others]), strict=True):
            run.scores["vs_best_val_p"] = p_adjusted


def _rank(run: Run, key: str) -> tuple:
    top1 = run.scores.get(key)
    return (run.status != "complete", top1 is None, -(top1 or 0.0), _natural_key(run.name))


def swept_keys(runs: list[Run]) -> list[str]:
    """Keys whose value differs between runs (place keys never), in first-seen order: the overridden ones, then any
    composed key that differs between runs those put together (an edited preset, another kdrun's defaults, other
    data: :data:`DATA_KEY`), which would otherwise pool as repeats of one setting."""
    runs = [r for r in runs if r.overrides_read]
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys and not is_place_key(k)]
    swept = [k for k in keys if len({r.value(k) for r in runs}) > 1]
    together = [k for k in swept if k != SEED_KEY]
    hidden: list[str] = []
    for run in runs:
        hidden += [k for k in run.composed if k not in keys and k not in hidden and not is_place_key(k)]
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(setting_of(run, together), []).append(run)
    for key in hidden:
        for members in groups.values():
            # a key some run lacks ("-") splits nothing: a key a later kdrun added, data only complete runs record
            values = {r.value(key) for r in members} - {"-"}
            if len(values) > 1:
                swept.append(key)
                break
    return swept


def common_overrides(runs: list[Run], swept: list[str]) -> dict[str, str]:
    """Overridden keys with one value in every run (whether overridden there or composed)."""
    runs = [r for r in runs if r.overrides_read]
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys and k not in swept]
    values = {k: {r.value(k) for r in runs} for k in keys}
    return {k: v.pop() for k, v in values.items() if len(v) == 1}


def _as_typed(value) -> str:
    """A value as one types it on the command line (``false``, ``null``), not as Python prints it."""
    return {"True": "true", "False": "false", "None": "null"}.get(str(value), str(value))


# ---------------------------------------------------------------- tables


def fmt(value, digits: int = 2) -> str:
    """A table cell: scores with fixed decimals, long numeric override values shortened, ``-`` when absent."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if 0 < abs(value) < 0.01:  # small p-values: significant digits, not 0.00
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return short(str(value))


def fmt_p(value) -> str:
    """A p-value cell (:func:`kdrun.significance.format_p`; ``-`` for none)."""
    from kdrun.significance import format_p

    return "-" if value is None else format_p(value)


def cell(column: str, value) -> str:
    """``column``'s cell of ``value``: p-values (``*_p``) by :func:`fmt_p`, the rest by :func:`fmt`."""
    return fmt_p(value) if column.endswith("_p") and isinstance(value, float) else fmt(value)


def short(text: str) -> str:
    """``"6.4248703846447945"`` -> ``"6.425"`` (Optuna's samples); other text unchanged."""
    if "." in text and len(text) > 6 and is_number(text):
        return f"{float(text):.4g}"
    return text


def run_rows(runs: list[Run], swept: list[str]) -> list[dict]:
    """One flat row per run: name, swept values, status, scores, note."""
    rows = []
    for run in runs:
        row: dict[str, str | float | None] = {"run": run.name or "."}
        row |= {k: run.value(k) for k in swept}
        row["status"] = run.status
        row |= {c: run.scores.get(c) for c in SCORE_COLUMNS}
        row["note"] = run.note
        rows.append(row)
    return rows


def setting_of(run: Run, keys: list[str]) -> tuple:
    return tuple(run.value(k) for k in keys)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value, which has no spread to show)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def group_by_setting(runs: list[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    """Complete runs grouped by their values of ``keys``."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.status == "complete" and run.scores.get("student_top1") is not None:
            groups.setdefault(setting_of(run, keys), []).append(run)
    return groups


def seed_groups(runs: list[Run], swept: list[str]) -> list[dict]:
    """Mean ± std per setting over ``trainer.seed`` repeats; empty unless some setting has several seeds."""
    if SEED_KEY not in swept:
        return []
    keys = [k for k in swept if k != SEED_KEY]
    groups = group_by_setting(runs, keys)
    if all(len(g) < 2 for g in groups.values()):
        return []
    rows = [_group_row(keys, setting, members) for setting, members in groups.items()]
    by = group_rank_key(rows)
    return sorted(rows, key=lambda r: -r[by])


def group_rank_key(groups: list[dict]) -> str:
    """The settings' order, as the runs' (:func:`rank_key`): by the mean validation top-1 when every repeat of every
    setting has one (a choice may rest on it), else by the mean test top-1 (an order for reading)."""
    with_val = bool(groups) and all(g["student_val_top1_n"] == g["n"] for g in groups)
    return "student_val_top1_mean" if with_val else "student_top1_mean"


def distinct(runs: list[Run], swept: list[str]) -> list[Run]:
    """The first run (in the tree's order of names, not by score) of each setting of the swept keys, seed included:
    the same setting and seed found twice in the tree (a sweep run again into another folder) is one repeat, not
    two independent ones, for the means, intervals and plots; the others are named in a warning (the per-run table
    keeps them all). Keeping the higher-scoring copy would bias the means upwards."""
    first: dict[tuple, Run] = {}
    for run in sorted(runs, key=lambda r: _natural_key(r.name)):
        if run.status == "complete":
            first.setdefault(setting_of(run, swept), run)
    out = []
    for run in runs:
        kept = first.get(setting_of(run, swept)) if run.status == "complete" else run
        if kept is not run:
            assert kept is not None
            log.warning("report: %s repeats the setting of %s; counted once", run.name, kept.name)
            continue
        out.append(run)
    return out


def _group_row(keys: list[str], setting: tuple, members: list[Run]) -> dict:
    row: dict = dict(zip(keys, setting))
    row["n"] = len(members)
    for col in ("student_top1", "student_val_top1", "baseline_top1", "teacher_top1", "kd_gain_top1"):
        values = [v for m in members if (v := m.scores.get(col)) is not None]
        mean, std = mean_std(values) if values else (None, None)
        row[f"{col}_mean"], row[f"{col}_std"] = mean, std
    row["student_val_top1_n"] = sum(m.scores.get("student_val_top1") is not None for m in members)
    gains = [g for m in members if (g := m.scores.get("kd_gain_top1")) is not None]
    ci = mean_ci(gains) if gains else None  # Student-t 95% interval of the mean gain over seeds
    row["kd_gain_top1_ci95_low"], row["kd_gain_top1_ci95_high"] = (ci.low, ci.high) if ci else (None, None)
    return row


def pm(mean, std) -> str:
    """``mean ± std``; ``mean (1 run)`` where one run gives no spread (not ``± 0.00``)."""
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} (1 run)"


def interval(low, high) -> str:
    return "-" if low is None or high is None else f"[{low:+.2f}, {high:+.2f}]"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def text_table(rows: list[dict], columns: list[str], limit: int | None = None) -> str:
    """A fixed-width table of ``rows`` for the terminal (the first ``limit`` rows)."""
    shown = rows[:limit] if limit else rows
    cells = [[cell(c, r.get(c)) for c in columns] for r in shown]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    columns = list(rows[0]) if rows else ["run", "status"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=columns)
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    kio.write_text(path, text.getvalue())


def status_counts(runs: list[Run]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def markdown(
    root: str, runs: list[Run], swept: list[str], groups: list[dict], plots: list[str], plot_notes: list[str]
) -> str:
    """The whole ``report.md``."""
    rows = run_rows(runs, swept)
    columns = ["run", *swept, "status", *SCORE_COLUMNS]
    parts = [
        f"# kdrun report: {os.path.abspath(root)}",
        "",
        f"{len(runs)} runs: {status_counts(runs)}. Sorted by {RANKED_BY[rank_key(runs)]}; scores are top-1 "
        "in %; `agreement` is the student's top-1 match rate with the teacher; `student_top1_at_best_val` the test "
        "top-1 of the epoch the validation split chose (a test figure, not a validation one); `student_val_top1` its "
        "last-epoch top-1 on the validation split, `vs_best_val` that minus the best one's on the same validation "
        "images, paired image by image, the best chosen on the even-numbered images and both scored on the "
        "odd-numbered ones, so its luck in being chosen does not count (`vs_best_val_p`: exact McNemar test there, "
        "Holm-adjusted over the runs compared with that best; `kdrun compare` gives the interval); "
        f"`wall_s` is a run's own time (sum over runs: {_total_wall(runs):.1f} s).",
    ]
    common = common_overrides(runs, swept)
    if common:
        parts += ["", "Common overrides: " + " ".join(f"`{k}={_as_typed(v)}`" for k, v in common.items())]
    parts += ["", "## Runs", "", markdown_table(columns, [[cell(c, r[c]) for c in columns] for r in rows])]
    noted = [f"- `{r.name}`: {r.note}" for r in runs if r.status == "complete" and r.note]  # e.g. the chosen best
    parts += ["", *noted] if noted else []
    if groups:
        order = (
            "the distilled student's mean validation top-1"
            if group_rank_key(groups) == "student_val_top1_mean"
            else "the distilled student's mean test top-1 (an order for reading, not a choice)"
        )
        parts += ["", "## Mean ± std over seeds", "", f"Settings by {order}.", "", _group_markdown(groups, swept)]
    parts += _optuna_section(root)
    parts += _notes_section(runs, plot_notes)
    if plots:
        parts += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(parts) + "\n"


def _total_wall(runs: list[Run]) -> float:
    return sum(r.scores.get("wall_s") or 0.0 for r in runs)


def _group_markdown(groups: list[dict], swept: list[str]) -> str:
    keys = [k for k in swept if k != SEED_KEY]
    val = group_rank_key(groups) == "student_val_top1_mean"
    header = [*keys, "n", *(["student val top1"] if val else []), "student top1", "baseline top1", "teacher top1"]
    header += ["kd gain", "kd gain 95% CI"]
    body = [
        [
            *(g[k] for k in keys),
            g["n"],
            *([pm(g["student_val_top1_mean"], g["student_val_top1_std"])] if val else []),
            pm(g["student_top1_mean"], g["student_top1_std"]),
            pm(g["baseline_top1_mean"], g["baseline_top1_std"]),
            pm(g["teacher_top1_mean"], g["teacher_top1_std"]),
            pm(g["kd_gain_top1_mean"], g["kd_gain_top1_std"]),
            interval(g["kd_gain_top1_ci95_low"], g["kd_gain_top1_ci95_high"]),
        ]
        for g in groups
    ]
    return markdown_table(header, body)


def _optuna_section(root: str) -> list[str]:
    """Best parameters of an Optuna sweep (its ``optimization_results.yaml``), when there is one."""
    path = os.path.join(root, "optimization_results.yaml")
    if not os.path.isfile(path):
        return []
    try:
        from omegaconf import OmegaConf

        res = OmegaConf.load(path)
        params = " ".join(f"`{k}={v}`" for k, v in res.best_params.items())
        value = f"{float(res.best_value):.2f}" if is_number(str(res.best_value)) else str(res.best_value)
        # the study maximised sweep.metric, a validation figure (never a test one): the table's are test's
        return ["", "## Optuna", "", f"Best trial: {params} -> {value} (the study's sweep.metric, on validation)"]
    except Exception as e:
        return ["", "## Optuna", "", f"optimization_results.yaml unreadable: {e}"]


def is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def _notes_section(runs: list[Run], plot_notes: list[str]) -> list[str]:
    notes = [f"- `{r.name}`: {r.status}: {r.note}" for r in runs if r.status != "complete"]
    notes += [f"- plot: {n}" for n in plot_notes]
    return ["", "## Not plotted / problems", "", *notes] if notes else []


# ---------------------------------------------------------------- entry point


@dataclass
class Report:
    """What :func:`build` found and wrote."""

    runs: list[Run]
    swept: list[str]
    rows: list[dict]
    groups: list[dict]
    paths: list[str]
    ranked_by: str  # the score that orders the runs (rank_key)


def build(path: str, out: str | None = None) -> Report:
    """Collect the runs under ``path`` and write the report files into ``out`` (default: ``path``)."""
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise ConfigError(f"report {path}: {what}; give a run directory, a multirun directory or a folder holding them")
    runs = collect(path)
    if not runs:
        raise ConfigError(f"report {path}: no kdrun runs found (no .hydra/overrides.yaml in it or below it)")
    if all(NOT_KDRUN in r.note for r in runs):  # nothing written into another application's folders
        raise ConfigError(f"report {path}: no kdrun runs found; {runs[0].name}/{runs[0].note}")
    out = out or path
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"report --out {out}: cannot create it ({e.strerror or type(e).__name__})") from None
    swept = swept_keys(runs)
    unique = distinct(runs, swept)
    rows, groups = run_rows(runs, swept), seed_groups(unique, swept)
    from kdrun.sweep_plots import write_plots  # it imports this module

    md_path, csv_path = os.path.join(out, "report.md"), os.path.join(out, "report.csv")
    earlier = _plots_listed(md_path)
    plots, plot_notes = write_plots(unique, swept, out)
    kio.write_text(md_path, markdown(path, runs, swept, groups, plots, plot_notes))
    for name in earlier - {os.path.basename(p) for p in plots}:  # an earlier report's plots this one did not make
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, name))
    write_csv(rows, csv_path)
    return Report(runs, swept, rows, groups, [md_path, csv_path, *plots], rank_key(runs))


def _plots_listed(md_path: str) -> set[str]:
    """The plot files an earlier ``report.md`` in the same folder lists (its ``![name](name)`` lines)."""
    try:
        with open(md_path) as f:
            text = f.read()
    except OSError:
        return set()
    return set(re.findall(r"^!\[[^\]]*\]\(([^)/\\]+\.png)\)$", text, flags=re.M))


def write_report(path: str, out: str | None = None) -> list[str]:
    """Write ``report.md``, ``report.csv`` and PNG plots for the runs under ``path``; return the paths written.

    ``path`` is a run directory, a multirun directory or any tree of them; the
    files go to ``out`` (default ``path``). Raises :class:`ConfigError` when
    ``path`` is not a directory or holds no runs.
    """
    return build(str(path), None if out is None else str(out)).paths
