"""The sweep report (kdrun.sweep_report, ``kdrun report``) and the sweep presets (configs/sweep/).

Most tests build fake run directories; three run real tiny sweeps in a
subprocess (basic launcher, Optuna, submitit_local) with a shared artifact
store so that the teacher is trained once.
"""

from __future__ import annotations

import csv
import json
import os
import socket

import pytest
import yaml

from kdrun import runlock, sweep_plots, sweep_report
from kdrun.errors import ConfigError
from kdrun.report_cli import report_main
from kdrun.sweep_report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = [
    "trainer=smoke",
    "teacher=mlp",
    "student=mlp",
    "+teacher.kwargs.hidden=[64]",
    "+student.kwargs.hidden=[32]",
    "trainer.batch_size=256",
    "baseline=false",
]


# ---------------------------------------------------------------- fake runs


def fake_metrics(
    student: float, baseline: float = 60.0, teacher: float = 95.0, seed: int = 0, best: float | None = None
) -> dict:
    """A ``metrics.json`` shaped like kdrun.report.assemble writes it."""
    student_entry = {"last": {"top1": student, "errors": 3, "agreement": 88.5}}
    if best is not None:
        student_entry["best_on_val"] = {"top1": best, "errors": 2, "epoch": 3}
    return {
        "status": "complete",
        "seed": seed,
        "scheme": "offline",
        "roles": {"teacher": "teacher", "student": "student", "baseline": "baseline"},
        "test": {
            "teacher": {"top1": teacher, "errors": 1},
            "student": student_entry,
            "baseline": {"last": {"top1": baseline, "errors": 9, "agreement": 70.0}},
        },
        "kd_gain_top1": round(student - baseline, 3),
        "ratios": {},
        "models": {},
        "timings_s": {"total": 12.5},
        "loss": {"name": "kd"},
    }


def make_run(
    root,
    name: str,
    overrides: list[str],
    metrics: dict | None = None,
    failed: str | None = None,
    curves: bool = True,
    config: dict | None = None,
    choices: dict | None = None,
) -> str:
    """A run directory: .hydra/overrides.yaml (and the composed config.yaml and group choices when given),
    then metrics.json, a FAILED note, or nothing (running, killed or incomplete: see kdrun.runlock)."""
    run = os.path.join(str(root), name)
    os.makedirs(os.path.join(run, ".hydra"))
    with open(os.path.join(run, ".hydra", "overrides.yaml"), "w") as f:
        yaml.safe_dump(["trainer=smoke", *overrides], f)
    if config is not None:
        with open(os.path.join(run, ".hydra", "config.yaml"), "w") as f:
            yaml.safe_dump(config, f)
    if choices is not None:
        with open(os.path.join(run, ".hydra", "hydra.yaml"), "w") as f:
            yaml.safe_dump({"hydra": {"runtime": {"choices": {"hydra/launcher": "basic", **choices}}}}, f)
    if curves:
        write_curve(run, "student", val=True)
        write_curve(run, "teacher", val=False)
    if metrics is not None:
        with open(os.path.join(run, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    if failed is not None:
        with open(os.path.join(run, "FAILED"), "w") as f:
            f.write(failed + "\n")
    return run


def write_curve(run: str, stage: str, val: bool) -> None:
    """The per-epoch CSV of a stage and, as the default csv logger writes beside it, the per-step one."""
    with open(os.path.join(run, f"metrics_{stage}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "loss_ce", "loss"] + (["val_top1"] if val else []))
        for epoch in range(1, 4):
            w.writerow([epoch, 0.1 / epoch, 2.0 / epoch, 2.0 / epoch] + ([50 + 10 * epoch] if val else []))
    with open(os.path.join(run, f"metrics_{stage}_steps.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_ce", "loss", "lr"])
        w.writerow([50, 1.5, 1.5, 0.1])


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def grid_with_seeds(root, seeds=(0, 1, 2)) -> None:
    """loss.temperature 1,4 x loss.alpha 0.5,0.9 x seeds: student top-1 = base + 2 * seed."""
    job = 0
    for t, a, base in [("1", "0.5", 70.0), ("1", "0.9", 74.0), ("4", "0.5", 80.0), ("4", "0.9", 76.0)]:
        for s in seeds:
            make_run(
                root,
                str(job),
                [f"loss.temperature={t}", f"loss.alpha={a}", f"trainer.seed={s}"],
                fake_metrics(base + 2 * s, seed=s),
            )
            job += 1


def assert_png(path) -> None:
    assert os.path.isfile(path), path
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


# ---------------------------------------------------------------- report from fake runs


def test_rows_sorted_by_student_top1_with_swept_columns(tmp_path):
    for job, (t, top1) in enumerate([("1", 70.0), ("4", 90.0), ("8", 80.0)]):
        make_run(tmp_path, str(job), [f"loss.temperature={t}"], fake_metrics(top1, best=top1 + 1))
    paths = write_report(tmp_path)
    assert paths[:2] == [str(tmp_path / "report.md"), str(tmp_path / "report.csv")]
    rows = read_csv(tmp_path / "report.csv")
    assert [r["loss.temperature"] for r in rows] == ["4", "8", "1"]
    assert [float(r["student_top1"]) for r in rows] == [90.0, 80.0, 70.0]
    assert float(rows[0]["student_top1_at_best_val"]) == 91.0
    assert float(rows[0]["kd_gain_top1"]) == 30.0 and float(rows[0]["teacher_top1"]) == 95.0
    assert float(rows[0]["agreement"]) == 88.5 and float(rows[0]["wall_s"]) == 12.5
    assert "trainer" not in rows[0]  # common to every run: in the header, not a column
    md = (tmp_path / "report.md").read_text()
    assert "`trainer=smoke`" in md and "| 1 | 4 | complete | 90.00 |" in md


def test_mean_std_over_seeds(tmp_path):
    grid_with_seeds(tmp_path)
    write_report(tmp_path)
    groups = sweep_report.seed_groups(
        sweep_report.collect(str(tmp_path)), ["loss.temperature", "loss.alpha", "trainer.seed"]
    )
    assert [(g["loss.temperature"], g["loss.alpha"], g["n"]) for g in groups][0] == ("4", "0.5", 3)
    assert groups[0]["student_top1_mean"] == pytest.approx(82.0)
    assert groups[0]["student_top1_std"] == pytest.approx(2.0)  # sample std of 80, 82, 84
    assert [g["student_top1_mean"] for g in groups] == [82.0, 78.0, 76.0, 72.0]
    # KD gains 20, 22, 24: 22 +- t(0.975, 2) * 2 / sqrt(3), Student's 95% interval (not a 68% one)
    half = 4.302652729911275 * 2 / 3**0.5
    assert (groups[0]["kd_gain_top1_ci95_low"], groups[0]["kd_gain_top1_ci95_high"]) == (
        pytest.approx(22 - half, abs=1e-3),
        pytest.approx(22 + half, abs=1e-3),
    )
    md = (tmp_path / "report.md").read_text()
    assert "## Mean ± std over seeds" in md
    assert "| 4 | 0.5 | 3 | 82.00 ± 2.00 | 60.00 ± 0.00 | 95.00 ± 0.00 | 22.00 ± 2.00 |" in md


def test_a_value_one_run_takes_by_interpolation_pools_with_another_run_overriding_it(tmp_path):
    """A preset's ``loss.beta: ${oc.select:pair_defaults.dkd.beta,8.0}`` is 8 in the run: the same setting as a run
    with ``loss.beta=8``, so their seeds make one group (read unresolved, they used to be two settings)."""
    beta = "${oc.select:pair_defaults.dkd.beta,8.0}"
    make_run(
        tmp_path, "a", ["trainer.seed=0"], fake_metrics(70.0), config={"loss": {"beta": beta}, "trainer": {"seed": 0}}
    )
    make_run(
        tmp_path,
        "b",
        ["loss.beta=8", "trainer.seed=1"],
        fake_metrics(72.0),
        config={"loss": {"beta": 8}, "trainer": {"seed": 1}},
    )
    runs = sweep_report.collect(str(tmp_path))
    swept = sweep_report.swept_keys(runs)
    assert swept == ["trainer.seed"]
    (group,) = sweep_report.seed_groups(runs, swept)
    assert group["n"] == 2 and group["student_top1_mean"] == pytest.approx(71.0)


def test_a_config_with_integer_keys_is_read(tmp_path):
    """``evaluate.logit_bias={3: 3.5}`` (the hinton_mnist_no3 preset) has an integer key: reading it was a traceback in
    ``kdrun report``, ``kdrun compare`` and the sweep's own report."""
    for seed in (0, 1):
        config = {"evaluate": {"logit_bias": {3: 3.5}}, "trainer": {"seed": seed}}
        make_run(tmp_path, f"r{seed}", [f"trainer.seed={seed}"], fake_metrics(70.0 + seed), config=config)
    (run,) = [r for r in sweep_report.collect(str(tmp_path)) if r.composed.get("trainer.seed") == "0"]
    assert run.composed["evaluate.logit_bias.3"] == "3.5"
    assert sweep_report.swept_keys(sweep_report.collect(str(tmp_path))) == ["trainer.seed"]


@pytest.mark.parametrize(
    "differs, key",
    [
        ({"loss": {"temperature": 20.0}}, "loss.temperature"),  # a preset edited between the runs
        ({"teacher": {"kwargs": {"hidden": [1200, 1200]}}}, "teacher.kwargs.hidden"),  # a list value
        ({"dataset": {"content": "other"}}, "dataset.content"),  # other data (metrics.json), not its place
    ],
)
def test_runs_that_differ_where_no_command_line_set_anything_are_not_repeats_of_one_setting(tmp_path, differs, key):
    """Two seeds of what the command lines call one setting, whose configs differ elsewhere: two settings of one run
    each (the key a column of its own), not one setting over two seeds; `kdrun compare` does not call them seeds."""
    from kdrun.compare import caveats

    def config(seed: int, changed: bool) -> dict:
        cfg = {"loss": {"temperature": 4.0}, "teacher": {"kwargs": {"hidden": [800, 800]}}, "trainer": {"seed": seed}}
        cfg["dataset"] = {"root": f"/copy{seed}"}  # where the data is read from is never a setting
        if changed and "dataset" not in differs:
            cfg |= {k: v | cfg.get(k, {}) if k == "trainer" else differs[k] for k, v in differs.items()}
        return cfg

    for seed, changed in ((0, False), (1, True)):
        metrics = fake_metrics(70.0 + seed)
        metrics["dataset"] = {"content": "other" if changed and "dataset" in differs else "same"}
        make_run(tmp_path, str(seed), [f"trainer.seed={seed}"], metrics, config=config(seed, changed))
    runs = sweep_report.collect(str(tmp_path))
    swept = sweep_report.swept_keys(runs)
    assert swept == ["trainer.seed", key]
    assert sweep_report.seed_groups(runs, swept) == []
    assert not any(
        "differ only in trainer.seed" in line for line in caveats(str(tmp_path / "0"), str(tmp_path / "1"), 9)
    )
    runs[0].composed.pop(key)  # a key only one run has (a later kdrun added it): seeds of one setting
    assert sweep_report.swept_keys(runs) == ["trainer.seed"]


def test_a_seed_found_twice_is_one_repeat(tmp_path, caplog):
    """The same sweep twice in the tree (e.g. run again into another folder): each seed counts once."""
    grid_with_seeds(tmp_path / "first")
    grid_with_seeds(tmp_path / "again")
    report = sweep_report.build(str(tmp_path))
    groups = report.groups
    assert len(report.rows) == 24  # the per-run table lists every run
    assert [g["n"] for g in groups] == [3, 3, 3, 3]
    assert groups[0]["student_top1_std"] == pytest.approx(2.0)  # 80, 82, 84 as with one sweep
    assert sum("counted once" in r.getMessage() for r in caplog.records) == 12


def test_of_a_setting_found_twice_the_first_by_name_counts_not_the_higher_scoring(tmp_path, caplog):
    """A rerun of the same setting and seed (GPU nondeterminism) scoring higher used to be the one counted, as the
    runs were already sorted by score: the mean kept the luckier copy."""
    for name, score in (("a", 70.0), ("b", 72.0)):
        for seed in (0, 1):
            make_run(tmp_path / name, str(seed), [f"trainer.seed={seed}"], fake_metrics(score + seed, seed=seed))
    (group,) = sweep_report.build(str(tmp_path)).groups
    assert group["n"] == 2 and group["student_top1_mean"] == pytest.approx(70.5)
    assert "b/0 repeats the setting of a/0; counted once" in caplog.text


def test_canonical_spellings():
    assert [sweep_report.canonical(v) for v in ("0", 0.0, "0.0", "1e-3", "5.0e-4", "4", 8)] == [
        "0",
        "0",
        "0",
        "0.001",
        "0.0005",
        "4",
        "8",
    ]
    assert [sweep_report.canonical(v) for v in (True, None, "[64]", "resnet9", "6.4248703846447945")] == [
        "true",
        "null",
        "[64]",
        "resnet9",
        "6.4248703846447945",
    ]


def seed_runs(root, with_composed: bool) -> list[str]:
    """Two seeds of one setting run by hand: run 0 repeats the preset's val_fraction (0.0) and its teacher on the
    command line, run 1 does not; they write to different stores with different thread counts."""
    composed = {"trainer": {"val_fraction": 0.0, "seed": 0, "threads": 1}, "teacher": {"name": "resnet9"}}
    runs = [
        ["trainer.seed=0", "trainer.val_fraction=0", "teacher=resnet9", "store.dir=/a/store", "trainer.threads=1"],
        ["trainer.seed=1", "store.dir=/b/store", "trainer.threads=2"],
    ]
    for seed, overrides in enumerate(runs):
        make_run(
            root,
            f"s{seed}",
            overrides,
            fake_metrics(80.0 + seed, teacher=90.0 - seed, seed=seed),
            config=composed if with_composed else None,
            choices={"teacher": "resnet9", "student": "mbv2_cifar"} if with_composed else None,
        )
    return sweep_report.swept_keys(sweep_report.collect(str(root)))


def test_seeds_pool_when_other_keys_only_repeat_the_composed_value_or_name_a_place(tmp_path):
    assert seed_runs(tmp_path, with_composed=True) == ["trainer.seed"]
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| 2 | 80.50 ± 0.71 | 60.00 ± 0.00 | 89.50 ± 0.71 |" in md
    assert "`trainer.val_fraction=0`" in md and "`teacher=resnet9`" in md  # common to both
    assert "store.dir" not in md  # differs, but says only where a run writes


def test_without_a_composed_config_an_override_only_one_run_gives_is_swept(tmp_path):
    assert seed_runs(tmp_path, with_composed=False) == ["trainer.seed", "trainer.val_fraction", "teacher"]
    write_report(tmp_path)
    assert "Mean ± std" not in (tmp_path / "report.md").read_text()


def test_no_group_table_without_seed_repeats(tmp_path):
    make_run(tmp_path, "0", ["loss.temperature=1", "trainer.seed=0"], fake_metrics(70.0))
    make_run(tmp_path, "1", ["loss.temperature=4", "trainer.seed=1"], fake_metrics(80.0))
    write_report(tmp_path)
    assert "Mean ± std" not in (tmp_path / "report.md").read_text()


def test_failed_running_and_unreadable_runs_listed_not_plotted(tmp_path, monkeypatch):
    make_run(tmp_path, "0", ["loss.temperature=1"], fake_metrics(70.0))
    make_run(tmp_path, "1", ["loss.temperature=4"], fake_metrics(80.0))
    make_run(tmp_path, "2", ["loss.temperature=8"], failed="RuntimeError: out of memory")
    running = make_run(tmp_path, "3", ["loss.temperature=16"])
    bad = make_run(tmp_path, "4", ["loss.temperature=32"])
    with open(os.path.join(bad, "metrics.json"), "w") as f:
        f.write("{truncated")
    stop = "student: stopped by SIGTERM at epoch 1, step 3; checkpoint saved, rerun the same command to resume"
    make_run(tmp_path, "5", ["loss.temperature=64"], failed=stop)
    killed = make_run(tmp_path, "6", ["loss.temperature=128"])
    with open(os.path.join(killed, runlock.FILE), "w") as f:  # what a SIGKILLed run leaves: its lock file, unheld
        f.write(f"process 12 on {socket.gethostname()}, since Sun Nov 29 10:00:00 2026")
    make_run(tmp_path, "7", ["loss.temperature=256"])  # a kdrun that kept no record of its runs at work
    elsewhere = make_run(tmp_path, "8", ["loss.temperature=512"])  # another host's lock this host cannot see
    with open(os.path.join(elsewhere, runlock.FILE), "w") as f:
        f.write("process 12 on node-b7, since Sun Nov 29 10:00:00 2026")
    plotted = []
    original = sweep_plots.plot_accuracy_vs
    monkeypatch.setattr(sweep_plots, "plot_accuracy_vs", lambda runs, *a: plotted.extend(runs) or original(runs, *a))
    with runlock.held(running):
        write_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert [(r["run"], r["status"]) for r in rows] == [
        ("1", "complete"),
        ("0", "complete"),
        ("2", "failed"),
        ("3", "running"),
        ("4", "unreadable"),
        ("5", "stopped"),  # preempted, checkpoint saved: not a failure, the same command continues it
        ("6", "killed"),  # its lock file left, held by nobody
        ("7", "incomplete"),
        ("8", "incomplete"),
    ]
    holder = "process 12 on node-b7, since Sun Nov 29 10:00:00 2026"
    assert rows[8]["note"] == f"no metrics.json; {holder}: running there, or killed (only it can tell)"
    assert f"kdrun train resume={tmp_path / '6'} continues it" in rows[6]["note"]
    assert rows[2]["note"] == "RuntimeError: out of memory" and rows[2]["student_top1"] == ""
    assert sorted(r.name for r in plotted) == ["0", "1"]
    md = (tmp_path / "report.md").read_text()
    assert "`2`: failed: RuntimeError: out of memory" in md and "`3`: running" in md and "`4`: unreadable" in md
    assert "9 runs: 2 complete, 1 failed, 2 incomplete, 1 killed, 1 running, 1 stopped, 1 unreadable" in md
    assert f"`5`: stopped: {stop}" in md


def test_unreadable_overrides_do_not_invent_swept_keys(tmp_path):
    make_run(tmp_path, "0", ["loss.temperature=1"], fake_metrics(70.0))
    make_run(tmp_path, "1", ["loss.temperature=4"], fake_metrics(80.0))
    broken = make_run(tmp_path, "2", ["loss.temperature=8"], fake_metrics(99.0))
    with open(os.path.join(broken, ".hydra", "overrides.yaml"), "w") as f:
        f.write("- [unclosed")
    write_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert list(rows[0])[:3] == ["run", "loss.temperature", "status"]
    assert (rows[-1]["run"], rows[-1]["status"]) == ("2", "unreadable")


def test_plots_written_as_png(tmp_path):
    grid_with_seeds(tmp_path, seeds=(0, 1))
    paths = write_report(tmp_path)
    names = {os.path.basename(p) for p in paths}
    assert {
        "student_vs_loss_temperature.png",
        "student_vs_loss_alpha.png",
        "heatmap_loss_temperature_x_loss_alpha.png",
        "curves_first.png",  # ranked by test top-1 (no validation split): an order, not a choice
    } <= names
    assert "student_vs_trainer_seed.png" not in names
    for p in paths:
        if p.endswith(".png"):
            assert_png(p)
            assert f"]({os.path.basename(p)})" in (tmp_path / "report.md").read_text()


def test_a_report_written_again_into_a_folder_removes_the_earlier_report_s_plots_only(tmp_path):
    """`kdrun report DIR --out D` twice: the first report's plots of keys no longer swept stayed beside the new
    report.md; files the reports did not write stay."""
    grid_with_seeds(tmp_path / "a", seeds=(0, 1))
    out = tmp_path / "out"
    first = {os.path.basename(p) for p in write_report(tmp_path / "a", out) if p.endswith(".png")}
    assert "heatmap_loss_temperature_x_loss_alpha.png" in first
    (out / "mine.png").write_bytes(b"a user's own")
    make_run(tmp_path / "b", "0", ["loss.temperature=1"], fake_metrics(70.0))
    make_run(tmp_path / "b", "1", ["loss.temperature=4"], fake_metrics(80.0))
    second = {os.path.basename(p) for p in write_report(tmp_path / "b", out) if p.endswith(".png")}
    assert {n for n in os.listdir(out) if n.endswith(".png")} == second | {"mine.png"}, os.listdir(out)
    assert "heatmap_loss_temperature_x_loss_alpha.png" not in second


def test_curves_read_epoch_files_not_the_per_step_logs(tmp_path):
    run = make_run(tmp_path, "0", [], fake_metrics(80.0))
    curves = sweep_plots.read_curves(run)
    assert set(curves) == {"student", "teacher"} and [r["epoch"] for r in curves["student"]] == [1.0, 2.0, 3.0]


def test_random_search_gets_a_scatter_not_a_heatmap(tmp_path):
    for job, (t, a, top1) in enumerate([("1.37", "0.21", 70.0), ("6.02", "0.55", 80.0), ("9.5", "0.83", 75.0)]):
        make_run(tmp_path, str(job), [f"loss.temperature={t}", f"loss.alpha={a}"], fake_metrics(top1))
    names = {os.path.basename(p) for p in write_report(tmp_path)}
    assert "scatter_loss_temperature_x_loss_alpha.png" in names
    assert not any(n.startswith("heatmap_") for n in names)
    assert_png(tmp_path / "scatter_loss_temperature_x_loss_alpha.png")


def test_a_key_plotted_outside_a_grid_shows_each_run_not_a_mean_over_other_settings(tmp_path, monkeypatch):
    """One seed at four (T, alpha) points: no line of the other key has two values of T, so the plot against T has
    a point per run, not a mean ± std that would be the spread over alpha labelled as seeds."""
    points = [("1", "0.2", 70.0), ("1", "0.7", 74.0), ("4", "0.3", 80.0), ("4", "0.8", 90.0)]
    for job, (t, a, top1) in enumerate(points):
        make_run(tmp_path, str(job), [f"loss.temperature={t}", f"loss.alpha={a}"], fake_metrics(top1))
    figures = {}
    monkeypatch.setattr(sweep_plots, "_save", lambda fig, out, name: figures.setdefault(name, fig) and name)
    write_report(tmp_path)
    ax = figures["student_vs_loss_temperature.png"].axes[0]
    student, baseline = (
        line for line in ax.lines if line.get_label() in ("student, one point per run", "baseline (CE only)")
    )
    assert sorted(zip(student.get_xdata(), student.get_ydata())) == [(1, 70), (1, 74), (4, 80), (4, 90)]
    assert list(baseline.get_ydata()) == [60.0] * 4 and not ax.containers  # no error bars
    assert ax.get_ylabel() == "test top-1 (%), one point per run"


@pytest.mark.parametrize("seeds, spread", [((0,), "one run per cell"), ((0, 1), "mean ± std over seeds")])
def test_plot_labels_say_mean_over_seeds_only_where_seeds_repeat(tmp_path, monkeypatch, seeds, spread):
    grid_with_seeds(tmp_path, seeds=seeds)
    figures = {}
    monkeypatch.setattr(sweep_plots, "_save", lambda fig, out, name: figures.setdefault(name, fig) and name)
    write_report(tmp_path)
    heatmap = next(f for n, f in figures.items() if n.startswith("heatmap_"))
    assert heatmap.axes[0].get_title() == f"distilled student test top-1 ({spread})"
    lines = next(f for n, f in figures.items() if n.startswith("student_vs_"))
    assert lines.axes[0].get_ylabel() == f"test top-1 (%), {spread.replace('one run per cell', 'one point per run')}"


def test_heatmap_cells_are_means_over_seeds(tmp_path):
    grid_with_seeds(tmp_path, seeds=(0, 1))
    runs = sweep_report.collect(str(tmp_path))
    rows, cols, cells = sweep_plots.heat_matrix(runs, "loss.temperature", "loss.alpha")
    assert rows == ["1", "4"] and cols == ["0.5", "0.9"]
    assert cells[1][0] == pytest.approx((81.0, 2**0.5, 2))


def test_one_failing_plot_does_not_stop_the_report(tmp_path, monkeypatch):
    grid_with_seeds(tmp_path, seeds=(0,))

    def broken(*args):
        raise ValueError("no colours left")

    monkeypatch.setattr(sweep_plots, "plot_heatmap", broken)
    paths = write_report(tmp_path)
    assert any(p.endswith("curves_first.png") for p in paths)
    assert "heat map: ValueError: no colours left" in (tmp_path / "report.md").read_text()


def test_tree_of_sweeps_and_single_run(tmp_path):
    make_run(tmp_path / "sweepA", "0", ["loss.temperature=1"], fake_metrics(70.0))
    make_run(tmp_path / "sweepA", "1", ["loss.temperature=4"], fake_metrics(75.0))
    make_run(tmp_path / "deep" / "sweepB", "0", ["loss=dkd"], fake_metrics(72.0), curves=False)
    write_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert [r["run"] for r in rows] == ["sweepA/1", "deep/sweepB/0", "sweepA/0"]
    single = str(tmp_path / "sweepA" / "1")
    paths = write_report(single)
    assert read_csv(os.path.join(single, "report.csv"))[0]["run"] == "."
    assert_png(os.path.join(single, "curves_first.png"))
    assert paths == [os.path.join(single, n) for n in ("report.md", "report.csv", "curves_first.png")]


# ---------------------------------------------------------------- kdrun report


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path):
    make_run(tmp_path / "runs", "0", ["loss.temperature=1"], fake_metrics(70.0))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^report --out .*file/sub: cannot create it \(Not a directory\)$"):
        report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "file" / "sub")])


def test_report_command_prints_table_and_paths(tmp_path, capsys):
    make_run(tmp_path / "runs", "0", ["loss.temperature=1"], fake_metrics(70.0))
    make_run(tmp_path / "runs", "1", ["loss.temperature=4"], fake_metrics(80.0))
    out = tmp_path / "elsewhere"
    assert report_main([str(tmp_path / "runs"), "--out", str(out), "--top", "1"]) == 0
    text = capsys.readouterr().out
    assert "2 runs under" in text and "loss.temperature" in text
    assert "80.00" in text and "70.00" not in text  # --top 1
    assert str(out / "report.md") in text
    assert (out / "report.csv").is_file() and not (tmp_path / "runs" / "report.md").exists()
    make_run(tmp_path / "runs", "2", ["loss.temperature=8"], failed="RuntimeError: out of memory")
    assert report_main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert "\n  2: RuntimeError: out of memory\n" in capsys.readouterr().out  # a row's note, under the table


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing"], "no such directory"),
        (["{tmp}"], "no kdrun runs found"),
        (["{tmp}", "--bogus"], "unknown option"),
        (["{tmp}", "--top", "zero"], "--top zero"),
        ([], "missing DIR"),
    ],
)
def test_report_command_bad_input(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message) as info:
        report_main([a.format(tmp=tmp_path) for a in args])
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- presets


def hydra_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True).hydra


def test_presets_select_the_plugins():
    optuna = hydra_cfg(["sweep=optuna"]).sweeper
    assert optuna._target_.endswith("OptunaSweeper") and optuna.direction == "maximize"
    assert optuna.sampler._target_ == "optuna.samplers.TPESampler" and optuna.sampler.seed is not None
    assert set(optuna.params) == {"loss.temperature", "loss.alpha"} and optuna.n_jobs == 1
    slurm = hydra_cfg(["sweep=slurm"]).launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.gpus_per_node >= 1 and slurm.cpus_per_task >= 1 and slurm.mem_gb and slurm.timeout_min > 0
    assert hydra_cfg(["sweep=slurm_local"]).launcher._target_.endswith("LocalLauncher")


# ---------------------------------------------------------------- real tiny sweeps


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One artifact store for the real sweeps: the tiny teacher is trained once."""
    return str(tmp_path_factory.mktemp("store"))


def sweep(kdrun, tmp_path, store, *args):
    """Run ``kdrun train -m`` tiny in tmp_path; return the sweep directory."""
    sweep_dir = tmp_path / "sweep"
    res = kdrun("train", "-m", *TINY, f"store.dir={store}", f"hydra.sweep.dir={sweep_dir}", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep_dir


def test_multirun_writes_its_report(kdrun, tmp_path, store):
    sweep_dir = sweep(kdrun, tmp_path, store, "loss.temperature=1,4")
    rows = read_csv(sweep_dir / "report.csv")
    assert sorted(r["loss.temperature"] for r in rows) == ["1", "4"]
    assert all(r["status"] == "complete" and float(r["student_top1"]) > 0 for r in rows)
    assert float(rows[0]["student_top1"]) >= float(rows[1]["student_top1"])
    assert "| loss.temperature |" in (sweep_dir / "report.md").read_text()
    assert_png(sweep_dir / "student_vs_loss_temperature.png")


def test_optuna_preset_runs_trials(kdrun, tmp_path, store):
    sweep_dir = sweep(kdrun, tmp_path, store, "sweep=optuna", "hydra.sweeper.n_trials=3")
    jobs = sorted(p for p in os.listdir(sweep_dir) if p.isdigit())
    assert jobs == ["0", "1", "2"]
    assert all((sweep_dir / j / "metrics.json").is_file() for j in jobs)
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    vals = [
        json.loads((sweep_dir / j / "metrics.json").read_text())["stages"]["student"]["final_val_top1"] for j in jobs
    ]  # the objective: validation top-1, never test
    assert result["best_value"] == pytest.approx(max(vals), abs=1e-3)  # maximised, not minimised
    assert set(result["best_params"]) == {"loss.temperature", "loss.alpha"}
    assert "## Optuna" in (sweep_dir / "report.md").read_text()


def test_slurm_local_preset_runs_through_submitit(kdrun, tmp_path, store):
    pytest.importorskip("submitit", reason="submitit is not installed")
    sweep_dir = sweep(kdrun, tmp_path, store, "sweep=slurm_local")
    assert (sweep_dir / "0" / "metrics.json").is_file()
    assert (sweep_dir / ".submitit").is_dir()
    assert read_csv(sweep_dir / "report.csv")[0]["status"] == "complete"


def test_slurm_tasks_of_a_sweep_refuse_trainer_devices_of_their_own(kdrun, tmp_path):
    """Two SLURM tasks per job with trainer.devices=2: the tasks' group was used and the key ignored, silently."""
    pytest.importorskip("submitit", reason="submitit is not installed")
    p = kdrun(
        "train",
        "-m",
        "sweep=slurm_local",
        "hydra.launcher.tasks_per_node=2",
        "trainer.devices=2",
        "trainer=smoke",
        "teacher=resnet8",
        "student=resnet8",
        "trainer.latency=false",
        "store.enabled=false",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert p.returncode == 1, p.stderr[-2000:]
    assert (tmp_path / "0" / "FAILED").read_text().startswith("trainer.devices=2: a launcher (torchrun, SLURM)")


def test_multirun_end_reports_failed_jobs_and_the_exit_code_says_so(tmp_path, capsys):
    """The end-of-multirun callback writes the report listing a failed job; ``kdrun train -m`` then exits 1."""
    from omegaconf import OmegaConf

    from kdrun import callbacks
    from kdrun.cli import EXIT_SWEEP_FAILED, sweep_exit_code

    make_run(tmp_path, "0", ["loss.temperature=1"], fake_metrics(80.0))
    make_run(tmp_path, "1", ["loss.temperature=4"], failed="student: non-finite loss (nan) at epoch 1, step 3")
    make_run(tmp_path, "2", ["loss.temperature=8"], fake_metrics(82.0))
    callbacks.SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert callbacks.LAST_SWEEP.failed == [("1", "student: non-finite loss (nan) at epoch 1, step 3")]
    assert "`1`: failed: student: non-finite loss" in (tmp_path / "report.md").read_text()
    assert sweep_exit_code() == EXIT_SWEEP_FAILED == 1
    assert capsys.readouterr().err.strip() == (
        "kdrun: error: 1 of 3 sweep jobs failed; job 1: student: non-finite loss (nan) at epoch 1, step 3; "
        f"the other jobs completed; see {tmp_path / 'report.md'}"
    )
    assert sweep_exit_code() == 0  # the outcome is consumed once


def test_a_figure_that_is_not_a_number_is_no_figure(tmp_path):
    """A NaN gain in one run's metrics.json (json allows it) stopped the seeds' means with a traceback."""
    for seed, gain in ((0, 1.0), (1, float("nan")), (2, 3.0)):
        metrics = fake_metrics(70.0 + seed) | {"kd_gain_top1": gain}
        make_run(tmp_path, str(seed), [f"trainer.seed={seed}"], metrics)
    runs = sweep_report.collect(str(tmp_path))
    assert {r.name: r.scores["kd_gain_top1"] for r in runs} == {"0": 1.0, "1": None, "2": 3.0}
    (group,) = sweep_report.seed_groups(runs, sweep_report.swept_keys(runs))
    assert group["kd_gain_top1_mean"] == pytest.approx(2.0)
    write_report(tmp_path)


def test_a_failed_job_counts_when_the_report_cannot_read_the_jobs(tmp_path, monkeypatch, capsys):
    """A report that could not read the jobs (a config it failed on) let a sweep with a FAILED job exit 0."""
    from omegaconf import OmegaConf

    from kdrun import callbacks
    from kdrun.cli import sweep_exit_code

    make_run(tmp_path, "0", ["loss.temperature=1"], fake_metrics(80.0))
    make_run(tmp_path, "1", ["loss.temperature=4"], failed="student: non-finite loss (nan) at epoch 1, step 3")
    monkeypatch.setattr(sweep_report, "collect", lambda root: 1 / 0)
    callbacks.SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert callbacks.LAST_SWEEP.failed == [("1", "student: non-finite loss (nan) at epoch 1, step 3")]
    assert callbacks.LAST_SWEEP.jobs == 2
    assert sweep_exit_code() == 1
    assert capsys.readouterr().err.strip().startswith("kdrun: error: 1 of 2 sweep jobs failed; job 1: ")


def test_a_multirun_whose_jobs_all_failed_says_none_completed(tmp_path, capsys):
    from omegaconf import OmegaConf

    from kdrun import callbacks
    from kdrun.cli import sweep_exit_code

    for job in ("0", "1"):
        make_run(tmp_path, job, [f"loss.temperature={job}"], failed="dataset.root=/nope: no such directory")
    callbacks.SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert sweep_exit_code() == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("kdrun: error: 2 of 2 sweep jobs failed; job 0: dataset.root=/nope")
        and "; none completed;" in err
    )


def test_multirun_without_failures_exits_0(tmp_path):
    from omegaconf import OmegaConf

    from kdrun import callbacks
    from kdrun.cli import sweep_exit_code

    make_run(tmp_path, "0", ["loss.temperature=1"], fake_metrics(80.0))
    callbacks.SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert callbacks.LAST_SWEEP.jobs == 1 and sweep_exit_code() == 0


def write_predictions(run: str, student_ok: list[bool], images: str = "d/val(val_fraction=0.1, seed=0)") -> None:
    """A predictions.pt whose student gets the validation images right where ``student_ok`` says (label 0)."""
    import torch

    from kdrun.predictions import RunPredictions, SplitPredictions, write

    labels = torch.zeros(len(student_ok), dtype=torch.long)
    top1 = {"student": torch.tensor([0 if ok else 1 for ok in student_ok], dtype=torch.int32)}
    splits = {"val": SplitPredictions(images, labels, top1), "test": SplitPredictions("d/test", labels, top1)}
    write(run, RunPredictions({"student": "student"}, splits))


def test_runs_on_the_same_validation_images_are_paired_with_the_best(tmp_path):
    """Each student against the best one on the same validation images, image by image: 20 images, the best
    right on 18; another right on 12 of them. Scored on the 10 odd-numbered images: 9 against 6 right (3 only the
    best, 0 only the other: p = 2 / 2^3)."""
    best = make_run(tmp_path, "0", ["loss.temperature=4"], fake_metrics(80.0))
    worse = make_run(tmp_path, "1", ["loss.temperature=1"], fake_metrics(85.0))
    other = make_run(tmp_path, "2", ["loss.temperature=8"], fake_metrics(70.0))
    make_run(tmp_path, "3", ["loss.temperature=16"], fake_metrics(60.0))  # no predictions.pt: no paired column
    write_predictions(best, [True] * 18 + [False] * 2)
    write_predictions(worse, [True] * 12 + [False] * 8)
    write_predictions(other, [True] * 20, images="d/val(val_fraction=0.1, seed=1)")  # other images: unpaired
    write_report(tmp_path)
    rows = {r["loss.temperature"]: r for r in read_csv(tmp_path / "report.csv")}
    assert float(rows["4"]["vs_best_val"]) == 0.0 and rows["4"]["vs_best_val_p"] == ""
    assert float(rows["1"]["vs_best_val"]) == pytest.approx(-30.0)
    assert float(rows["1"]["vs_best_val_p"]) == pytest.approx(2 / 2**3)
    for t in ("8", "16"):
        assert rows[t]["vs_best_val"] == "" and rows[t]["vs_best_val_p"] == ""
    report = (tmp_path / "report.md").read_text()
    assert "`vs_best_val` that minus the best one's" in report
    # which run is the best the others are measured against (report.csv's note; report.md had no word of it)
    assert "- `0`: the best of 2 on these validation images (even-numbered)" in report.split("## Runs")[1]


def test_the_best_is_chosen_on_half_the_validation_images_and_judged_on_the_other_half(tmp_path):
    """Chosen and compared on the same images, the best also wins by its luck in being chosen. Here "lucky" is
    right on every even-numbered image and half the odd ones; "steady" on 9 of 10 of each: lucky is chosen (10 of
    10 against 9), and on the odd images steady is ahead of it (9 against 5). Two other runs are compared with the
    same best: their p-values are Holm-adjusted over the three comparisons."""
    from kdrun.significance import exact_mcnemar_p, holm

    def pattern(even: list[bool], odd: list[bool]) -> list[bool]:
        return [x for pair in zip(even, odd, strict=True) for x in pair]

    runs = {
        "lucky": pattern([True] * 10, [True] * 5 + [False] * 5),
        "steady": pattern([True] * 9 + [False], [True] * 9 + [False]),
        "poor": pattern([True] * 5 + [False] * 5, [False] * 10),
        "same": pattern([True] * 8 + [False] * 2, [True] * 5 + [False] * 5),
    }
    for i, (name, ok) in enumerate(runs.items()):
        write_predictions(make_run(tmp_path, str(i), [f"+tag={name}"], fake_metrics(80.0)), ok)
    write_report(tmp_path)
    rows = {r["tag"]: r for r in read_csv(tmp_path / "report.csv")}
    assert rows["lucky"]["vs_best_val_p"] == "" and float(rows["lucky"]["vs_best_val"]) == 0.0
    assert rows["lucky"]["note"] == "the best of 4 on these validation images (even-numbered)"
    assert float(rows["steady"]["vs_best_val"]) == pytest.approx(40.0)  # 9 - 5 of the 10 odd images
    raw = [exact_mcnemar_p(4, 0), exact_mcnemar_p(0, 5), 1.0]  # steady, poor, same against lucky, odd images
    for name, p in zip(("steady", "poor", "same"), holm(raw), strict=True):
        assert float(rows[name]["vs_best_val_p"]) == pytest.approx(p), name
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def with_val(test: float, val: float) -> dict:
    """fake_metrics with the student's last-epoch validation top-1 (a run with a validation split)."""
    return fake_metrics(test) | {"stages": {"student": {"final_val_top1": val}}}


def test_the_curves_file_says_best_only_where_validation_ranked_the_runs(tmp_path):
    make_run(tmp_path / "val", "0", ["loss.temperature=1"], with_val(90.0, 70.0))
    make_run(tmp_path / "val", "1", ["loss.temperature=4"], with_val(80.0, 75.0))
    assert "curves_best.png" in {os.path.basename(p) for p in write_report(tmp_path / "val")}
    make_run(tmp_path / "test", "0", ["loss.temperature=1"], fake_metrics(90.0))
    assert "curves_first.png" in {os.path.basename(p) for p in write_report(tmp_path / "test")}


def test_runs_are_ranked_on_validation_and_test_never_names_a_best(tmp_path, monkeypatch, capsys):
    """Run 0 leads on the test images, run 1 on the held-out validation split: run 1 is the best, first in the
    table, the printed list and the curves plot. With a run lacking validation figures the order is test's, and
    the report calls it an order for reading, never the best."""
    make_run(tmp_path, "0", ["loss.temperature=1"], with_val(90.0, 70.0))
    make_run(tmp_path, "1", ["loss.temperature=4"], with_val(80.0, 75.0))
    curves = []
    monkeypatch.setattr(sweep_plots, "plot_curves", lambda run, swept, out, key: curves.append((run.name, key)))
    assert report_main([str(tmp_path)]) == 0
    assert "(best 2 by the distilled student's last-epoch validation top-1)" in capsys.readouterr().out
    assert [r["run"] for r in read_csv(tmp_path / "report.csv")] == ["1", "0"]
    assert curves == [("1", "student_val_top1")]
    assert "Sorted by the distilled student's last-epoch validation top-1;" in (tmp_path / "report.md").read_text()

    make_run(tmp_path, "2", ["loss.temperature=8"], fake_metrics(85.0))
    curves.clear()
    assert report_main([str(tmp_path)]) == 0
    assert "(top 3 by the distilled student's last-epoch test top-1 (not every run" in capsys.readouterr().out
    assert [r["run"] for r in read_csv(tmp_path / "report.csv")] == ["0", "2", "1"]
    assert curves == [("0", "student_top1")]
    assert "an order for reading, not a choice" in (tmp_path / "report.md").read_text()
    assert sweep_report.top_label("student_top1") == "highest test top-1 (not a choice)"


def test_keys_that_change_together_are_not_plotted_alone(tmp_path):
    """Two experiments side by side (8 epochs at batch 128, 20 at batch 32, each with kd and dkd): a plot of
    either key would show the effect of both; the method, crossed with them, is plotted."""
    for name, (epochs, batch) in {"a": (8, 128), "b": (20, 32)}.items():
        for loss in ("kd", "dkd"):
            overrides = [f"loss={loss}", f"trainer.epochs={epochs}", f"trainer.batch_size={batch}"]
            make_run(tmp_path, f"{name}_{loss}", overrides, fake_metrics(70.0 + epochs + len(loss)))
    names = {os.path.basename(p) for p in write_report(tmp_path)}
    assert "student_vs_loss.png" in names
    assert not any("epochs" in n or "batch_size" in n or n.startswith("heatmap_") for n in names), names
    md = (tmp_path / "report.md").read_text()
    assert "trainer.epochs, trainer.batch_size not plotted alone: across these runs they change together" in md


def test_a_folder_of_another_application_is_not_a_run(tmp_path):
    """A Hydra run of another program (overrides, a metrics.json of its own): alone it is one line and nothing is
    written into it; beside kdrun runs it is listed as not a kdrun run and adds no swept key."""
    foreign = make_run(tmp_path / "other", "job", ["lr=0.1"], {"accuracy": 0.9}, curves=False)
    with pytest.raises(ConfigError, match=r"report .*job: no kdrun runs found; \./metrics\.json: not a kdrun run's"):
        write_report(foreign)
    assert sorted(os.listdir(foreign)) == [".hydra", "metrics.json"]
    make_run(tmp_path / "other", "0", ["loss.temperature=1"], fake_metrics(70.0))
    make_run(tmp_path / "other", "1", ["loss.temperature=4"], fake_metrics(80.0))
    write_report(tmp_path / "other")
    rows = read_csv(tmp_path / "other" / "report.csv")
    assert "lr" not in rows[0] and (rows[-1]["run"], rows[-1]["status"]) == ("job", "unreadable")
    assert "`job`: unreadable: metrics.json: not a kdrun run's" in (tmp_path / "other" / "report.md").read_text()


def test_the_optuna_line_gives_the_study_s_validation_figure_rounded(tmp_path):
    make_run(tmp_path, "0", ["loss.temperature=1"], fake_metrics(70.0))
    make_run(tmp_path, "1", ["loss.temperature=4"], fake_metrics(80.0))
    results = {"name": "optuna", "best_params": {"loss.temperature": 4.0}, "best_value": 11.11111119389534}
    (tmp_path / "optimization_results.yaml").write_text(yaml.safe_dump(results))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Best trial: `loss.temperature=4.0` -> 11.11 (the study's sweep.metric, on validation)" in md


def test_a_setting_of_one_run_shows_no_spread_not_plus_minus_zero(tmp_path):
    """Beside settings repeated over seeds, one run alone has no standard deviation: it used to read "± 0.00"."""
    for job, (t, seed) in enumerate((("1", 0), ("1", 1), ("4", 0))):
        make_run(
            tmp_path, str(job), [f"loss.temperature={t}", f"trainer.seed={seed}"], fake_metrics(70.0 + job, seed=seed)
        )
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| 4 ")]
    assert "72.00 (1 run)" in row and "±" not in row, row
    assert "70.50 ± 0.71" in md
    groups = {g["loss.temperature"]: g for g in sweep_report.build(str(tmp_path)).groups}
    assert groups["4"]["n"] == 1 and groups["4"]["student_top1_std"] is None


def test_p_values_keep_three_significant_digits():
    """With two decimals 0.049 and 0.051 both read 0.05, on either side of the usual threshold; with two significant
    digits 0.0496 and 0.0504 did."""
    assert [sweep_report.cell("kd_gain_p", p) for p in (0.049, 0.051, 0.0496, 0.0504, 0.5, 0.0)] == [
        "0.049",
        "0.051",
        "0.0496",
        "0.0504",
        "0.5",
        "< 1e-300",
    ]
    assert sweep_report.cell("kd_gain_top1", 0.049) == "0.05" and sweep_report.cell("vs_best_val_p", None) == "-"


def test_an_online_runs_student_keeps_its_validation_score():
    """scheme=online trains its peers in one stage ("online"): the student's validation top-1 is under that stage's
    val_top1_by_model, not under a stage of its name. Missing, one such run switched the whole order to test top-1."""
    metrics = fake_metrics(80.0) | {
        "roles": {"teacher": "peer1", "student": "peer2"},
        "stages": {"online": {"final_val_top1": 70.0, "val_top1_by_model": {"peer1": 70.0, "peer2": 75.5}}},
    }
    assert sweep_report.scores_of(metrics)["student_val_top1"] == 75.5
    assert sweep_report.scores_of(fake_metrics(80.0))["student_val_top1"] is None


def test_settings_repeated_over_seeds_are_ordered_by_validation_when_every_run_has_it(tmp_path):
    """The runs were ranked by validation top-1 while the settings' table stayed ordered by test top-1, with no
    validation column: a reader choosing from that table chose on the test set."""
    job = 0
    for t, test, val in (("1", 80.0, 70.0), ("4", 75.0, 78.0)):
        for seed in (0, 1):
            metrics = with_val(test + seed, val + seed) | {"seed": seed}
            make_run(tmp_path, str(job), [f"loss.temperature={t}", f"trainer.seed={seed}"], metrics)
            job += 1
    groups = sweep_report.build(str(tmp_path)).groups
    assert [g["loss.temperature"] for g in groups] == ["4", "1"]
    assert groups[0]["student_val_top1_mean"] == pytest.approx(78.5)
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Settings by the distilled student's mean validation top-1." in md and "student val top1" in md
    make_run(tmp_path, str(job), ["loss.temperature=1", "trainer.seed=2"], fake_metrics(82.0, seed=2))  # no val
    assert [g["loss.temperature"] for g in sweep_report.build(str(tmp_path)).groups] == ["1", "4"]
