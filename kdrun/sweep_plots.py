"""The plots of a sweep report (:mod:`kdrun.sweep_report`): the student's top-1 against each varied key, a heat
map (or a scatter) over two keys, and the training curves of the run the report ranks first. Each is a PNG drawn on
matplotlib's Agg canvas; a plot that fails is a note in the report, never the end of it."""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Callable

from kdrun.sweep_report import (
    SEED_KEY,
    Run,
    group_by_setting,
    is_number,
    mean_std,
    rank_key,
    short,
    top_label,
)

log = logging.getLogger(__name__)

HEATMAP_MAX_VALUES = 12  # a heat map needs a grid; more distinct values per axis look like a random search
MAX_SERIES = 8  # more lines than this in an accuracy plot: plot the marginal mean instead
MAX_KEY_PLOTS = 12  # accuracy-vs-key plots at most (a heterogeneous tree of runs varies many keys)


def _figure(ncols: int = 1, width: float = 5.5):
    """A matplotlib figure on the Agg canvas (no pyplot, no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def ordered_values(values: set[str]) -> list[str]:
    """Numeric values by size, others alphabetically."""
    if all(is_number(v) for v in values):
        return sorted(values, key=float)
    return sorted(values)


def _x_positions(values: list[str]) -> tuple[dict[str, float], bool]:
    numeric = all(is_number(v) for v in values)
    return ({v: (float(v) if numeric else float(i)) for i, v in enumerate(values)}, numeric)


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_")


def _mean_std_by(runs: list[Run], key: str, col: str) -> dict[str, tuple[float, float | None]]:
    """Mean ± std of ``col`` for each value of ``key``."""
    out = {}
    for (value,), members in group_by_setting(runs, [key]).items():
        values = [v for m in members if (v := m.scores.get(col)) is not None]
        if values:
            out[value] = mean_std(values)
    return out


def _series(runs: list[Run], key: str, others: list[str]) -> tuple[dict[str, list[Run]], bool]:
    """(line label -> runs, whether they form a grid): one line per setting of the other swept keys.

    Without a grid (too many settings, or a single point per line as in a
    random or Optuna search) all runs form one scatter series, a point per run.
    """
    groups = group_by_setting(runs, others) if others else {(): list(runs)}
    grid = len(groups) <= MAX_SERIES and any(len({r.value(key) for r in g}) > 1 for g in groups.values())
    if not grid:
        return {"student, one point per run": list(runs)}, False
    labels = {s: ", ".join(f"{k}={short(v)}" for k, v in zip(others, s)) or "student" for s in groups}
    return {labels[s]: g for s, g in groups.items()}, True


def plot_accuracy_vs(runs: list[Run], key: str, swept: list[str], out_dir: str) -> str:
    """Student top-1 against the values of ``key``, baseline dashed: in a grid, a line per setting of the other swept
    keys with mean ± std over its seeds; otherwise a point per run (averaging them would mix other settings)."""
    others = [k for k in swept if k not in (key, SEED_KEY)]
    complete = [r for r in runs if r.status == "complete" and r.scores.get("student_top1") is not None]
    values = ordered_values({r.value(key) for r in complete})
    xpos, numeric = _x_positions(values)
    fig = _figure()
    ax = fig.add_subplot()
    series, grid = _series(complete, key, others)
    for label, members in series.items():
        if not grid:
            _points(ax, members, key, "student_top1", xpos, "o", label=label)
            _points(ax, members, key, "baseline_top1", xpos, "s", color="gray", label="baseline (CE only)")
            continue
        line = _errorbar(
            ax,
            _mean_std_by(members, key, "student_top1"),
            xpos,
            label=label,
            fmt="o-" if numeric else "o",  # categories (methods) are not joined: no trend between them
            capsize=3,
        )
        baseline = _mean_std_by(members, key, "baseline_top1")  # the same student's, under these settings only
        if baseline:
            color = "gray" if len(series) == 1 else line.lines[0].get_color()
            name = "baseline (CE only)" if len(series) == 1 else f"{label}: baseline"
            _errorbar(ax, baseline, xpos, label=name, fmt="s--" if numeric else "s", color=color, alpha=0.7, capsize=3)
    if not numeric:
        ax.set_xticks([xpos[v] for v in values], [short(v) for v in values], rotation=20)
    repeated = grid and any(len(group_by_setting(m, [key])) < len(m) for m in series.values())
    spread = "mean ± std over seeds" if repeated else "one point per run"
    ax.set(xlabel=key, ylabel=f"test top-1 (%), {spread}", title=f"distilled student vs {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, f"student_vs_{_safe(key)}.png")


def _points(ax, runs: list[Run], key: str, col: str, xpos: dict[str, float], fmt: str, **kwargs) -> None:
    """One point per run that has ``col``, at its value of ``key``."""
    have = [r for r in runs if r.scores.get(col) is not None]
    if have:
        ax.plot([xpos[r.value(key)] for r in have], [r.scores[col] for r in have], fmt, **kwargs)


def _errorbar(ax, stats: dict[str, tuple[float, float | None]], xpos: dict[str, float], **kwargs):
    """Points with their std as error bars; a point of one run has none (NaN draws no bar)."""
    keys = sorted(stats, key=lambda v: xpos[v])
    err = [math.nan if stats[v][1] is None else stats[v][1] for v in keys]
    return ax.errorbar([xpos[v] for v in keys], [stats[v][0] for v in keys], yerr=err, **kwargs)


def heat_matrix(runs: list[Run], rows_key: str, cols_key: str) -> tuple[list[str], list[str], list[list]]:
    """(row values, column values, cells): each cell ``(mean, std, n)`` of student top-1, or None."""
    groups = group_by_setting(runs, [rows_key, cols_key])
    row_values = ordered_values({s[0] for s in groups})
    col_values = ordered_values({s[1] for s in groups})
    cells = []
    for rv in row_values:
        line = []
        for cv in col_values:
            members = groups.get((rv, cv)) or []
            top1 = [v for m in members if (v := m.scores.get("student_top1")) is not None]
            line.append((*mean_std(top1), len(top1)) if top1 else None)
        cells.append(line)
    return row_values, col_values, cells


def is_grid(row_values: list[str], col_values: list[str], cells: list[list]) -> bool:
    """A small table with at least half its cells measured (not the scattered points of a random search)."""
    filled = sum(c is not None for line in cells for c in line)
    return (
        bool(cells)
        and max(len(row_values), len(col_values)) <= HEATMAP_MAX_VALUES
        and 2 * filled >= len(row_values) * len(col_values)
    )


def plot_two_keys(runs: list[Run], keys: list[str], out_dir: str) -> str | None:
    """A heat map over two swept keys when they form a grid, else a scatter of numeric values coloured by top-1."""
    row_values, col_values, cells = heat_matrix(runs, keys[0], keys[1])
    if is_grid(row_values, col_values, cells):
        return plot_heatmap(keys, row_values, col_values, cells, out_dir)
    if all(is_number(v) for v in row_values + col_values):
        return plot_scatter(runs, keys, out_dir)
    return None


def plot_scatter(runs: list[Run], keys: list[str], out_dir: str) -> str:
    """Each run at (key 1, key 0), coloured by the student's test top-1 (Optuna or random searches); the first run
    of the report's order (:func:`rank_key`) marked as what it is."""
    fig = _figure()
    ax = fig.add_subplot()
    x = [float(r.value(keys[1])) for r in runs]
    y = [float(r.value(keys[0])) for r in runs]
    points = ax.scatter(x, y, c=[r.scores["student_top1"] for r in runs], cmap="viridis", s=60, edgecolors="k")
    fig.colorbar(points, ax=ax, label="student test top-1 (%)")
    key, best = rank_key(runs), runs[0]  # the runs come in the report's order (collect)
    ax.annotate(
        f"{top_label(key)}: {best.scores[key]:.2f}",
        (float(best.value(keys[1])), float(best.value(keys[0]))),
        textcoords="offset points",
        xytext=(6, 6),
        fontsize=8,
    )
    ax.set(xlabel=keys[1], ylabel=keys[0], title="distilled student top-1 per run")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, f"scatter_{_safe(keys[0])}_x_{_safe(keys[1])}.png")


def plot_heatmap(keys: list[str], row_values: list[str], col_values: list[str], cells: list[list], out_dir: str) -> str:
    """An annotated heat map of the student's top-1 (mean ± std over repeats) over two swept keys."""
    grid = [[math.nan if c is None else c[0] for c in line] for line in cells]
    fig = _figure()
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="student test top-1 (%)")
    ax.set_xticks(range(len(col_values)), [short(v) for v in col_values])
    ax.set_yticks(range(len(row_values)), [short(v) for v in row_values])
    repeated = any(c is not None and c[2] > 1 for line in cells for c in line)
    spread = "mean ± std over seeds" if repeated else "one run per cell"
    ax.set(xlabel=keys[1], ylabel=keys[0], title=f"distilled student test top-1 ({spread})")
    _annotate(ax, cells, grid)
    return _save(fig, out_dir, f"heatmap_{_safe(keys[0])}_x_{_safe(keys[1])}.png")


def _annotate(ax, cells: list[list], grid: list[list[float]]) -> None:
    finite = [v for line in grid for v in line if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, line in enumerate(cells):
        for j, cell in enumerate(line):
            if cell is None:
                continue
            mean, std, n = cell
            text = f"{mean:.2f}" if n == 1 else f"{mean:.2f}\n± {std:.2f} (n={n})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if mean > middle else "white")


def read_curves(run_dir: str) -> dict[str, list[dict]]:
    """Per-stage epoch rows of a run's ``metrics_{stage}.csv`` files (numbers as floats); the csv logger's
    per-step ``metrics_{stage}_steps.csv`` files are not epoch rows and are skipped."""
    curves = {}
    for name in sorted(os.listdir(run_dir)):
        m = re.fullmatch(r"metrics_(.+)\.csv", name)
        if m and not m.group(1).endswith("_steps"):
            with open(os.path.join(run_dir, name), newline="") as f:
                curves[m.group(1)] = [{k: _float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return curves


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def plot_curves(run: Run, swept: list[str], out_dir: str, ranked_by: str) -> str | None:
    """Loss, learning rate and (with a validation split) val top-1 per epoch of every stage of ``run``, the first
    of the order ``ranked_by`` (:func:`rank_key`)."""
    from matplotlib.ticker import MaxNLocator

    curves = {s: rows for s, rows in read_curves(run.path).items() if rows}
    if not curves:
        return None
    panels = ["loss", "lr"] + (["val_top1"] if any("val_top1" in r[0] for r in curves.values()) else [])
    fig = _figure(ncols=len(panels), width=4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, column in zip(axes, panels):
        for stage, rows in curves.items():
            points = [(r["epoch"], r.get(column)) for r in rows if r.get(column) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=stage)
        ax.set(xlabel="epoch", ylabel=column, title=column)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    setting = " ".join(f"{k}={short(run.value(k))}" for k in swept)
    split = "validation" if ranked_by == "student_val_top1" else "test"
    figure = f"student {split} top-1 {run.scores[ranked_by]:.2f}"
    fig.suptitle(
        f"training curves of the run with the {top_label(ranked_by)} ({run.name or '.'}: {setting or 'only run'}, "
        f"{figure})",
        fontsize=10,
    )
    # "best" only where a validation split ranked the runs; by test top-1 the first run is an order, not a choice
    return _save(fig, out_dir, "curves_best.png" if ranked_by == "student_val_top1" else "curves_first.png")


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path


def write_plots(runs: list[Run], swept: list[str], out_dir: str) -> tuple[list[str], list[str]]:
    """All plots of the complete runs: (paths written, notes on plots that failed)."""
    complete = [r for r in runs if r.status == "complete" and r.scores.get("student_top1") is not None]
    if not complete:
        return [], []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], ["matplotlib is not installed (pip install matplotlib): no plots"]
    varied = [k for k in swept if k != SEED_KEY and len({r.value(k) for r in complete}) > 1]
    notes = []
    for group in confounded(complete, varied):
        varied = [k for k in varied if k not in group]
        notes.append(
            f"{', '.join(group)} not plotted alone: across these runs they change together, so the effect of one "
            "cannot be told from the others' (runs of different experiments?)"
        )
    if len(varied) > MAX_KEY_PLOTS:
        notes.append(f"only the first {MAX_KEY_PLOTS} of {len(varied)} varied keys plotted")
    jobs: list[tuple[str, Callable[..., str | None], tuple]]
    jobs = [(f"student vs {k}", plot_accuracy_vs, (complete, k, swept, out_dir)) for k in varied[:MAX_KEY_PLOTS]]
    if len(varied) == 2:
        jobs.append(("heat map", plot_two_keys, (complete, varied, out_dir)))
    jobs.append(("training curves", plot_curves, (complete[0], swept, out_dir, rank_key(complete))))
    paths, failures = _run_plot_jobs(jobs)
    return paths, notes + failures


def confounded(runs: list[Run], keys: list[str]) -> list[list[str]]:
    """Groups of ``keys`` whose values pair one to one across ``runs`` while repeating (e.g. trainer.epochs=8
    always with trainer.batch_size=128, and 20 with 32, over several runs each: two experiments side by side). A
    plot of any one of them would show the effect of all; values that never repeat (a random search's) pair one to
    one by chance and are not grouped."""
    groups: list[list[str]] = []
    for key in keys:
        values = [r.value(key) for r in runs]
        if len(set(values)) == len(values):
            continue
        group = next((g for g in groups if _one_to_one([(r.value(g[0]), r.value(key)) for r in runs])), None)
        if group is None:
            groups.append([key])
        else:
            group.append(key)
    return [g for g in groups if len(g) > 1]


def _one_to_one(pairs: list[tuple[str, str]]) -> bool:
    left, right = {a for a, _ in pairs}, {b for _, b in pairs}
    return len(set(pairs)) == len(left) == len(right)


def _run_plot_jobs(jobs: list[tuple[str, Callable[..., str | None], tuple]]) -> tuple[list[str], list[str]]:
    paths, notes = [], []
    for label, func, args in jobs:
        try:
            path = func(*args)
        except Exception as e:
            log.warning("report: %s plot failed: %s", label, e)
            notes.append(f"{label}: {type(e).__name__}: {e}")
            continue
        if path:
            paths.append(path)
    return paths, notes
