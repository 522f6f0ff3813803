"""Crash and preemption: a run killed anywhere and resumed ends exactly like one never interrupted."""

import json
import os
import re
import signal
import socket
import subprocess

import pytest
import torch

from kdrun import runlock
from kdrun.errors import ConfigError, KdrunError
from kdrun.preempt import EXIT_PREEMPTED

ARGS = [
    "teacher=resnet8",
    "student=resnet8",
    "trainer.teacher_epochs=2",
    "trainer.epochs=2",
    "trainer.batch_size=128",
    "trainer.checkpoint_every_steps=5",
    "trainer.deterministic=true",
    "trainer.latency=false",
    "store.enabled=false",
    "cache.views=2",
    "dataset.augment.crop_pad=1",
    # the whole engine state: per-step LR (warm-up, then cosine), clipping, the EMA of the weights
    "optim.warmup_epochs=1",
    "optim.grad_clip=5",
    "trainer.ema=0.9",
    "dataset.student_fraction=1.0",
    "loss.temperature={schedule: linear, start: 8, end: 2}",  # a scheduled value: a column of the CSV rows
]  # 12 steps per student epoch: the kill points below fall inside them


def final_state(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    accs = {k: v.get("last", v)["top1"] for k, v in m["test"].items()}
    weights = torch.load(run_dir / "checkpoints" / "student.pt", weights_only=True)["model"]
    ema = torch.load(run_dir / "checkpoints" / "student_ema.pt", weights_only=True)["model"]
    # per-epoch rows (LR at each epoch's first step, every loss term) match too
    accs["csv"] = {p.name: p.read_text() for p in sorted(run_dir.glob("metrics_*.csv"))}
    return accs, weights | {f"ema.{k}": v for k, v in ema.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tests.conftest import run_kdrun

    run_dir = tmp_path_factory.mktemp("resume") / "clean"
    p = run_kdrun("train", *ARGS, f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]
    return final_state(run_dir)


@pytest.mark.parametrize("kill_at", ["teacher:7", "student:8", "student:13", "baseline:12"])
def test_sigkill_then_resume_is_bit_identical(kdrun, tmp_path, uninterrupted, kill_at):
    run_dir = tmp_path / "run"
    p = kdrun("train", *ARGS, f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": kill_at})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (run_dir / "metrics.json").exists()
    assert runlock.state(str(run_dir)) == "killed"  # kdrun report: killed, not running
    # a checkpoint the kill caught mid-write (its temporary name holds the writer's host and process), and one a
    # live process writes: the first goes, the second stays
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    dead = run_dir / "checkpoints" / f"teacher_last.pt.tmp-{host}-{gone.pid}-0123abcd"
    live = run_dir / "checkpoints" / f"other.pt.tmp-{host}-{os.getpid()}-0123abcd"
    dead.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    p = kdrun("train", f"resume={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not dead.exists() and live.exists() and f"removed {dead.name}, left by a process killed" in p.stderr
    live.unlink()
    assert runlock.state(str(run_dir)) is None
    stage = kill_at.split(":")[0]
    assert f"{stage}: resuming from" in p.stderr
    accs, weights = final_state(run_dir)
    want_accs, want_weights = uninterrupted
    assert accs == want_accs
    assert weights.keys() == want_weights.keys()
    for k in weights:
        assert torch.equal(weights[k], want_weights[k]), k


@pytest.mark.parametrize("step", [3, 12])  # 12: the epoch's last step, so the resumed epoch runs no step
def test_sigterm_checkpoints_and_exits_for_requeue(kdrun, tmp_path, uninterrupted, step):
    run_dir = tmp_path / "run"
    p = kdrun("train", *ARGS, f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": f"student:{step}:TERM"})
    assert p.returncode == EXIT_PREEMPTED, p.stderr[-2000:]
    assert f"student: stopped by SIGTERM at epoch 1, step {step}; checkpoint saved" in p.stderr
    assert p.stderr.strip().endswith(f"(exit code {EXIT_PREEMPTED}); kdrun train resume={run_dir} continues it")
    assert "kdrun: student: stopped by SIGTERM" in p.stderr  # a stop asked for, not an error
    ckpt = torch.load(run_dir / "checkpoints" / "student_last.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (0, step)
    assert not (run_dir / "metrics.json").exists()
    p = kdrun("train", *ARGS, f"hydra.run.dir={run_dir}")  # the same command again resumes
    assert p.returncode == 0, p.stderr[-2000:]
    assert "student: resuming from" in p.stderr and "teacher: already finished" in p.stderr
    assert final_state(run_dir)[0] == uninterrupted[0]


def test_sigterm_while_filling_the_cache_in_a_pass_exits_for_requeue(kdrun, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    args = [*ARGS, "cache.fill=pass", "trainer.eval_batch_size=64"]
    p = kdrun("train", *args, f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": "cache:1:TERM"})
    assert p.returncode == EXIT_PREEMPTED, p.stderr[-2000:]
    assert "cache: stopped by SIGTERM after 1 of" in p.stderr and "Traceback" not in p.stderr
    assert not (run_dir / "metrics.json").exists()
    p = kdrun("train", *args, f"hydra.run.dir={run_dir}")  # the same command again: the filled rows are kept
    assert p.returncode == 0, p.stderr[-2000:]
    assert "teacher: already finished" in p.stderr and "64 of " in p.stderr  # rows of the first batch reused
    # the same logits as the run that filled its cache on first use, so the same end
    assert final_state(run_dir)[0] == uninterrupted[0]


def test_ctrl_c_twice_stops_at_once_in_one_line_and_the_run_continues(kdrun, tmp_path, uninterrupted):
    """The second Ctrl-C ended in a traceback, and during a finished run's evaluation it deleted its metrics.json."""
    run_dir = tmp_path / "run"
    p = kdrun("train", *ARGS, f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": "student:3:INT+INT"})
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "kdrun: SIGINT received: stopping at the next safe point" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"kdrun: stopped at once by a second SIGINT (Ctrl-C); kdrun train resume={run_dir} continues it"
    )
    assert (run_dir / "FAILED").read_text().startswith("stopped by SIGINT twice")  # a report counts it stopped
    p = kdrun("train", f"resume={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_state(run_dir)[0] == uninterrupted[0]
    finished = (run_dir / "metrics.json").read_bytes()
    p = kdrun("train", f"resume={run_dir}", env={"KDRUN_KILL_AT": "evaluate:1:INT+INT"})
    assert p.returncode == 130, p.stderr[-2000:]
    assert p.stderr.strip().endswith("(Ctrl-C); the finished run is kept as it was")
    assert (run_dir / "metrics.json").read_bytes() == finished and not (run_dir / "FAILED").exists()


def test_a_stop_requested_outside_a_training_loop_ends_the_sweep_before_the_next_job(monkeypatch):
    """A SIGTERM during a job's evaluation, or between two jobs of a sweep, finds no training loop to stop: the
    flag stays set (installing the handlers for the next job used to clear it) and that job does not start."""
    import signal

    from kdrun import preempt

    monkeypatch.setattr(preempt.STOP, "requested", None)
    monkeypatch.setattr(preempt.STOP, "installed", False)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # pytest keeps its own handlers
    preempt.install_handlers()  # job 1
    preempt.check_stop("job 1 started")
    preempt._handler(signal.SIGTERM, None)  # during job 1's evaluation
    preempt.install_handlers()  # job 2
    with pytest.raises(preempt.Preempted, match=r"^stopped by SIGTERM before job 2 started$"):
        preempt.check_stop("job 2 started")


def test_checkpoint_of_another_config_is_refused(kdrun, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # killed after the step-5 checkpoint
    p = kdrun("train", *ARGS, f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": "teacher:7"})
    assert p.returncode == -signal.SIGKILL
    saved = (run_dir / ".hydra" / "overrides.yaml").read_text()
    p = kdrun("train", *ARGS, "optim.lr=0.2", f"hydra.run.dir={run_dir}")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"kdrun: error: hydra.run.dir={run_dir}: checkpoints/teacher_last.pt was made by a different "
        f"configuration (optim.lr: 0.05 -> 0.2); continue the run as it was (kdrun train resume={run_dir}) or give a "
        "new hydra.run.dir"
    )
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == saved  # refused before Hydra rewrote it
    assert runlock.state(str(run_dir)) == "killed"  # the refused command left the killed run's marker as it was


def test_refused_change_leaves_a_finished_run_intact(tmp_path):
    """`resume=DIR` with another value is refused before anything in DIR changes, and a rerun killed before its end
    leaves the old metrics.json: the run stays complete."""
    from tests.conftest import run_kdrun, run_smoke

    run_dir = tmp_path / "run"
    run_smoke(run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    p = run_kdrun("train", f"resume={run_dir}", "trainer.epochs=3")
    assert p.returncode == 2 and "checkpoints/baseline_last.pt was made by a different configuration" in p.stderr
    assert re.search(r"configuration \(trainer\.epochs: \d+ -> 3\); continue the run as it was", p.stderr), p.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # a rerun killed before it wrote its own metrics.json: the run is still complete, with the figures it had
    metrics = (run_dir / "metrics.json").read_bytes()
    p = run_kdrun("train", f"resume={run_dir}", env={"KDRUN_KILL_AT": "evaluate:1"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (run_dir / "metrics.json").read_bytes() == metrics and not (run_dir / "FAILED").exists()
    p = run_kdrun("train", f"resume={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "student: already finished" in p.stderr and (run_dir / "metrics.json").exists()


def test_a_second_run_in_a_directory_at_work_is_refused_changing_nothing(tmp_path):
    """`resume=DIR` while DIR's run is still at work (in another process, here this one): one line naming it, exit
    code 2, no FAILED note, every file as it was; two writers would interleave their checkpoints."""
    from tests.conftest import run_kdrun, run_smoke

    run_dir = tmp_path / "run"
    run_smoke(run_dir)
    with runlock.held(str(run_dir)):
        assert runlock.state(str(run_dir)) == "running"
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        for args in ([f"resume={run_dir}"], ["trainer=smoke", "loss.temperature=8", f"hydra.run.dir={run_dir}"]):
            p = run_kdrun("train", *args)  # also another run's overrides: refused before Hydra rewrites .hydra/
            assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
            assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
            assert p.stderr.startswith(f"kdrun: error: {run_dir}: a run is at work in this directory (process "), (
                p.stderr
            )
            assert f"(process {os.getpid()} on " in p.stderr and p.stderr.count("\n") == 1
    assert not (run_dir / runlock.FILE).exists() and not (run_dir / "FAILED").exists()


def test_a_command_holds_its_directory_from_its_checks_on(tmp_path):
    """Two commands started at once into one directory both passed the check and both wrote .hydra/ before either
    took the lock: the one refused had rewritten the configuration of the one that ran. The check now takes it."""
    from kdrun import cli
    from tests.conftest import SMOKE_RUN, run_kdrun

    run_dir = tmp_path / "run"
    cli.precheck([*SMOKE_RUN, f"hydra.run.dir={run_dir}"], "train")  # the first command, before its job starts
    try:
        assert runlock.state(str(run_dir)) == "running"
        p = run_kdrun("train", *SMOKE_RUN, "loss.temperature=8", f"hydra.run.dir={run_dir}")
        assert p.returncode == 2 and "a run is at work in this directory" in p.stderr, p.stderr[-2000:]
        assert not (run_dir / ".hydra").exists()
    finally:
        with runlock.held(str(run_dir)):  # the first command's job: it holds the lock its check took, then ends
            assert runlock.state(str(run_dir)) == "running"
    assert runlock.state(str(run_dir)) is None


def test_the_check_makes_no_folder_of_a_time_stamped_run_dir(tmp_path):
    """${now:...} is resolved again by Hydra, perhaps a second later: a folder the check made could stay empty."""
    from kdrun import cli
    from tests.conftest import SMOKE_RUN

    cli.precheck([*SMOKE_RUN, f"paths.output={tmp_path / 'out'}"], "train")
    assert not (tmp_path / "out" / "train").exists()
    with pytest.raises(ConfigError, match=r"^hydra.run.dir: Interpolation key 'oops' not found; give a value"):
        cli.precheck([*SMOKE_RUN, "hydra.run.dir=/tmp/${oops}"], "train")  # was OmegaConf's traceback from Hydra


def test_a_sweep_into_a_folder_of_another_sweep_leaves_its_runs_intact(tmp_path):
    """Job N of a sweep is the folder N/: another sweep into the same hydra.sweep.dir is refused before Hydra
    rewrites a finished job's .hydra/; the same sweep again continues."""
    from tests.conftest import SMOKE_RUN, run_kdrun

    sweep = ["-m", *SMOKE_RUN, "baseline=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    p = run_kdrun("train", *sweep, "loss.temperature=1")
    assert p.returncode == 0, p.stderr[-2000:]
    before = {f: f.read_bytes() for f in (tmp_path / "sweep").rglob("*") if f.is_file()}
    p = run_kdrun("train", *sweep, "loss.temperature=8")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "job 0 there is a run of loss.temperature=1, not of loss.temperature=8; rerun that sweep as it" in p.stderr
    assert {f: f.read_bytes() for f in (tmp_path / "sweep").rglob("*") if f.is_file()} == before
    p = run_kdrun("train", *sweep, "loss.temperature=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "student: already finished" in p.stderr and (tmp_path / "sweep" / "0" / "metrics.json").exists()


def test_a_sweep_given_again_in_another_order_is_continued_or_named_so(tmp_path):
    """Job N of a sweep is its N-th point in the order of its arguments: the same overrides in another order
    within a job are the same run; jobs numbered otherwise are refused with the reason, not "other overrides"."""
    from kdrun.cli import check_sweep_dir, compose

    sweep = tmp_path / "sweep"
    for num, job in enumerate([["loss=kd", "trainer.seed=0"], ["loss=kd", "trainer.seed=1"]]):
        (sweep / str(num) / ".hydra").mkdir(parents=True)
        (sweep / str(num) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in job))
        (sweep / str(num) / "metrics.json").write_text("{}")

    def check(*overrides):
        first = compose(["loss=kd", f"hydra.sweep.dir={sweep}"], with_hydra=True)  # the sweep's first point
        check_sweep_dir(first, [*overrides, f"hydra.sweep.dir={sweep}"])

    check("loss=kd", "trainer.seed=0,1")
    check("trainer.seed=0,1", "loss=kd")  # job N: the same overrides, listed in another order
    with pytest.raises(
        ConfigError,
        match=r"job 1 there is a run of loss=kd trainer.seed=1, not of trainer.seed=0 "
        r"loss=dkd \(the same sweep with its arguments in another order: Hydra numbers",
    ):
        check("trainer.seed=0,1", "loss=kd,dkd")
    with pytest.raises(ConfigError, match=r"job 1 there is a run of trainer.seed=1, not of trainer.seed=2; rerun"):
        check("loss=kd", "trainer.seed=0,2")


def tiny_stage(run_dir, **kw):
    """A stage ``s`` of a 4-weight linear model on 4 tiny images (``kw``: epochs and the rest of train_stage's)."""
    from kdrun import engine
    from tests.test_engine import Linear, optim, tiny_loader

    def objective(net, batch, epoch):
        return {"ce": ((net(batch.x) - batch.y.float()) ** 2).mean()}

    return engine.train_stage("s", Linear(), objective, tiny_loader(n=4), optim_cfg=optim(), run_dir=str(run_dir), **kw)


def test_stage_refuses_a_checkpoint_of_another_config(tmp_path):
    """The stage's own check, for what reaches it without the command line's (e.g. a sweep job rerun in place)."""

    def run(fingerprint):
        tiny_stage(tmp_path, epochs=1, fingerprint=fingerprint)

    run("a")
    run("a")  # the finished stage is taken as it is
    with pytest.raises(KdrunError, match="s_last.pt: made by a different configuration of stage 's'"):
        run("b")


def test_a_run_an_older_recipe_began_is_not_resumed(monkeypatch):
    """Same config, but stages an older kdrun trained on other images (online peers on the whole split): the
    fingerprint a stage's checkpoint must match names the recipe, so such a run is refused, not finished with
    stages of two kinds."""
    from kdrun import stages
    from kdrun.cli import compose

    cfg = compose(["scheme=online"])
    now = stages.resume_fingerprint(cfg)
    assert stages.resume_fingerprint(compose(["scheme=online"])) == now
    monkeypatch.setattr(stages, "RECIPE", stages.RECIPE - 1)
    assert stages.resume_fingerprint(cfg) != now


def test_a_checkpoint_of_a_stage_that_trained_other_parameters_is_one_line(tmp_path):
    """Same configuration, but a kdrun whose stage trains other parameters (AB's adapters are frozen after their
    own stage now): one line, not a traceback from the optimiser."""
    from torch import nn

    from kdrun import engine
    from tests.test_engine import Linear, optim, tiny_loader

    def objective(net, batch, epoch):
        return {"ce": ((net(batch.x) - batch.y.float()) ** 2).mean()}

    tiny_stage(tmp_path, epochs=2, fingerprint="a")
    model = Linear()
    wider = nn.ModuleDict({"m": model, "extra": nn.Linear(2, 2)})
    with pytest.raises(KdrunError, match=r"s_last.pt: does not fit stage 's' as this kdrun builds it"):
        engine.train_stage(
            "s",
            model,
            objective,
            tiny_loader(n=4),
            optim_cfg=optim(),
            run_dir=str(tmp_path),
            epochs=2,
            fingerprint="a",
            trainable=wider,
        )


def test_resume_fingerprint_ignores_where_and_how_not_what():
    from kdrun.cli import compose
    from kdrun.stages import resume_fingerprint

    base = ["dataset=imagefolder", "dataset.root=/data/c10", "store.enabled=false"]
    key = resume_fingerprint(compose(base))
    moved = [
        "paths.data=/elsewhere",
        "paths.output=/o",
        "trainer.eval_batch_size=32",
        "trainer.device=cpu",
        "trainer.log_every=7",
        "trainer.threads=1",
        "trainer.latency=false",
        "logger=[csv]",
        "dataset.root=/data/other",  # where the data lies: the checkpoints check the data itself (its layout)
        "dataset.cache_dir=/c",
        "dataset.workers=1",
    ]
    assert resume_fingerprint(compose([*base, *moved])) == key
    for change in ["optim.lr=0.2", "dataset.mode=stream", "trainer.seed=1", "cache.topk=5", "loss.alpha=0.5"]:
        assert resume_fingerprint(compose([*base, change])) != key, change


def test_a_key_added_later_at_its_default_keeps_the_fingerprint_of_a_run_begun_without_it():
    """A run an older kdrun began (its config has no trainer.pre_stage_epochs) still resumes; setting it does not."""
    from omegaconf import open_dict

    from kdrun.cli import compose
    from kdrun.stages import resume_fingerprint

    cfg = compose(["store.enabled=false"])
    now = resume_fingerprint(cfg)
    with open_dict(cfg):
        del cfg.trainer["pre_stage_epochs"]
    assert resume_fingerprint(cfg) == now
    assert resume_fingerprint(compose(["store.enabled=false", "trainer.pre_stage_epochs=2"])) != now


def test_resume_elsewhere_ignores_paths_and_checkpoint_spacing(kdrun, tmp_path, uninterrupted):
    """Where data and outputs live and how checkpoints are spaced are not the run's configuration: a run moved
    to another machine (another KDRUN_DATA) resumes; a change of what it trains is still refused (above)."""
    run_dir = tmp_path / "run"
    env = {"KDRUN_KILL_AT": "student:3:TERM", "KDRUN_DATA": str(tmp_path / "data_here")}
    p = kdrun("train", *ARGS, f"hydra.run.dir={run_dir}", env=env)
    assert p.returncode == EXIT_PREEMPTED, p.stderr[-2000:]
    p = kdrun(
        "train",
        f"resume={run_dir}",
        "trainer.checkpoint_every_steps=4",
        env={"KDRUN_DATA": str(tmp_path / "data_there")},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "student: resuming from" in p.stderr and "teacher: already finished" in p.stderr
    assert final_state(run_dir)[0] == uninterrupted[0]


def test_best_weights_agree_with_the_checkpoint_after_a_crash(tmp_path, monkeypatch):
    """A new best epoch whose checkpoint was never written (the process died between the two files) is trained
    again on resume; if it is no longer the best, the best weights on disk are still those of the chosen epoch."""
    from kdrun import engine
    from kdrun.io import load_checkpoint
    from tests.test_engine import tiny_loader

    val_top1 = iter([50.0, 60.0, 40.0])  # epoch 1, epoch 2 (a new best), epoch 2 again after the resume
    monkeypatch.setattr(engine, "accuracy", lambda logits, labels: [next(val_top1)] * 2)
    real_save = engine.atomic_save

    def power_cut(obj, path, *args, **kw):
        if path.endswith("s_last.pt") and obj["epoch"] == 2:
            raise RuntimeError("power cut")
        real_save(obj, path, *args, **kw)

    def run():
        return tiny_stage(tmp_path, epochs=2, val_loader=tiny_loader(n=4))

    monkeypatch.setattr(engine, "atomic_save", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        run()
    monkeypatch.setattr(engine, "atomic_save", real_save)
    result = run()
    best = tmp_path / "checkpoints" / "s_best.pt"
    assert result.best_epoch == 1 and load_checkpoint(str(best))["epoch"] == 1
    assert not (tmp_path / "checkpoints" / "s_best.pt.next").exists()


def test_a_checkpoint_resumes_only_on_the_data_it_trained_on(tmp_path):
    """A run killed in its student stage, its image folder then changed (an image moved to another class): the
    resume is refused in one line before the finished teacher is stored or used for data it never saw. The same
    images copied elsewhere (new file times, another dataset.root) resume."""
    import shutil

    from tests.conftest import SMOKE_RUN, run_kdrun
    from tests.test_data import make_folder

    data, copy, run_dir = tmp_path / "data", tmp_path / "copy", tmp_path / "run"
    make_folder(data, per_split={"train": 12, "test": 4}, size=16)
    args = [*SMOKE_RUN, "trainer.latency=false", "dataset=imagefolder", "dataset.image_size=16", "store.enabled=true"]
    args += [f"dataset.cache_dir={tmp_path / 'decoded'}", f"store.dir={tmp_path / 'store'}"]
    p = run_kdrun(
        "train", *args, f"dataset.root={data}", f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": "student:1"}
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    shutil.copytree(data, copy, copy_function=shutil.copyfile)  # the same images, with the copy's own file times
    os.rename(data / "train" / "ant" / "000.png", data / "train" / "bee" / "100.png")
    stored = sorted(f for f in (tmp_path / "store").rglob("*") if f.suffix != ".lock")
    p = run_kdrun("train", f"resume={run_dir}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"kdrun: error: {run_dir}/checkpoints/teacher_last.pt: trained on other data than the dataset holds now "
        "(images added, removed, changed or moved to another class since); give a new hydra.run.dir to train on the "
        "data as it is"
    )
    # the old teacher is not stored under the new data
    assert sorted(f for f in (tmp_path / "store").rglob("*") if f.suffix != ".lock") == stored
    p = run_kdrun("train", f"resume={run_dir}", f"dataset.root={copy}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "teacher: already finished" in p.stderr, p.stderr[-2000:]
    # the finished run, its data changed in turn: refused the same way, and it stays complete
    os.rename(copy / "train" / "cat" / "000.png", copy / "train" / "bee" / "100.png")
    finished = {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file() and ".hydra" not in f.parts}
    p = run_kdrun("train", f"resume={run_dir}", f"dataset.root={copy}")
    assert p.returncode == 2 and "teacher_last.pt: trained on other data" in p.stderr, p.stderr[-2000:]
    after = {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file() and ".hydra" not in f.parts}
    noted = ("train.log", "store_refs.json")  # the log, and the store entry the refused stage looked for
    assert {f: b for f, b in after.items() if f.name not in noted} == {
        f: b for f, b in finished.items() if f.name not in noted
    }
    assert (run_dir / "metrics.json").exists() and not (run_dir / "FAILED").exists()


def test_a_finished_run_run_again_on_missing_data_stays_complete(tmp_path):
    """Its data folder gone (a typo in dataset.root, a share not mounted): one line, and the finished run is as it
    was: metrics.json kept, no FAILED note, and .hydra/ without the bad root, so a plain resume= works again."""
    from tests.conftest import SMOKE_RUN, run_kdrun
    from tests.test_data import make_folder

    data, run_dir = tmp_path / "data", tmp_path / "run"
    make_folder(data, per_split={"train": 12, "test": 4}, size=16)
    args = [*SMOKE_RUN, "trainer.latency=false", "dataset=imagefolder", "dataset.image_size=16", "baseline=false"]
    p = run_kdrun("train", *args, f"dataset.root={data}", f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]
    finished = {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file() and f.name != "train.log"}
    p = run_kdrun("train", f"resume={run_dir}", f"dataset.root={tmp_path / 'typo'}")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kdrun: error: dataset.root={tmp_path / 'typo'}: ") and last.endswith(
        "; the finished run is kept as it was"
    ), last
    after = {f: f.read_bytes() for f in run_dir.rglob("*") if f.is_file() and f.name != "train.log"}
    assert after == finished
    p = run_kdrun("train", f"resume={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_checkpoint_does_not_resume_on_an_image_changed_in_its_class(tmp_path):
    """The same file names and labels, one training image replaced by another picture of its class (decoded into
    memory): refused like any other change of the data."""
    import shutil

    from tests.conftest import SMOKE_RUN, run_kdrun
    from tests.test_data import make_folder

    data, run_dir = tmp_path / "data", tmp_path / "run"
    make_folder(data, per_split={"train": 12, "test": 4}, size=16)
    args = [*SMOKE_RUN, "trainer.latency=false", "dataset=imagefolder", "dataset.image_size=16"]
    args += [f"dataset.root={data}", f"dataset.cache_dir={tmp_path / 'decoded'}", "store.enabled=false"]
    p = run_kdrun("train", *args, f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": "student:1"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    shutil.copyfile(data / "train" / "ant" / "001.png", data / "train" / "ant" / "000.png")
    p = run_kdrun("train", f"resume={run_dir}")
    assert p.returncode == 2 and "teacher_last.pt: trained on other data" in p.stderr, p.stderr[-2000:]


def test_a_checkpoint_saved_before_pixels_counted_is_checked_by_what_it_recorded():
    """Checkpoints of an earlier kdrun hold the layout without its pixels part (before the ``+``)."""
    from kdrun.data.base import layout_matches

    assert layout_matches("0123456789abcdef+fedcba9876543210", "0123456789abcdef+fedcba9876543210")
    assert not layout_matches("0123456789abcdef+fedcba9876543210", "0123456789abcdef+0000000000000000")
    assert layout_matches("0123456789abcdef", "0123456789abcdef+fedcba9876543210")  # saved before pixels counted
    assert not layout_matches("0123456789abcdee", "0123456789abcdef+fedcba9876543210")
    assert layout_matches("0123456789abcdef", "0123456789abcdef")  # streamed data: no pixels part
    assert not layout_matches("0123456789abcdef+fedcba9876543210", "0123456789abcdef")


def test_a_run_begun_before_checkpoints_checked_their_data_resumes(kdrun, tmp_path):
    """Checkpoints written before the data check hold the config's earlier key (dataset.root and the other
    where-keys still in it) and no data layout: such a run, killed, resumes after the upgrade."""
    from kdrun import io as kio
    from kdrun.cli import compose
    from kdrun.stages import resume_fingerprint

    run_dir = tmp_path / "run"
    p = kdrun("train", *ARGS, f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": "student:8"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    earlier = resume_fingerprint(compose(ARGS), before_data_check=True)
    assert earlier != resume_fingerprint(compose(ARGS))
    for last in (run_dir / "checkpoints").glob("*_last.pt"):  # as the earlier kdrun wrote them
        ckpt = kio.load(str(last), "checkpoint")
        stage = last.name.removesuffix("_last.pt")
        ckpt = {k: v for k, v in ckpt.items() if k != "data_layout"} | {"fingerprint": f"{earlier}-{stage}"}
        kio.atomic_save(ckpt, str(last))
    p = kdrun("train", f"resume={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "teacher: already finished" in p.stderr and "student: resuming from" in p.stderr


def resumed_with_teacher_checkpoint_edited(kdrun, tmp_path, **changes):
    """A run killed in its teacher stage, its teacher_last.pt given ``changes`` (a field as another kdrun or another
    launch would write it), then resumed: (run_dir, the resume's process)."""
    from kdrun import io as kio

    run_dir = tmp_path / "run"
    p = kdrun("train", *ARGS, f"hydra.run.dir={run_dir}", env={"KDRUN_KILL_AT": "teacher:7"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    last = run_dir / "checkpoints" / "teacher_last.pt"
    saved = kio.load(str(last), "checkpoint")
    assert saved["workers"] == 1 and set(changes) <= set(saved)
    kio.atomic_save(saved | changes, str(last))
    return run_dir, kdrun("train", f"resume={run_dir}")


def test_a_checkpoint_of_another_kdrun_version_says_so(kdrun, tmp_path):
    """The run's own overrides, but checkpoints this kdrun would train differently (an earlier RECIPE): the line says
    the version differs, instead of advising the resume command just given."""

    run_dir, p = resumed_with_teacher_checkpoint_edited(kdrun, tmp_path, fingerprint="0123456789abcdef-teacher")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"kdrun: error: hydra.run.dir={run_dir}: checkpoints/teacher_last.pt was made by a kdrun that trained this "
        "configuration differently (another version); it cannot be continued by this one: give a new hydra.run.dir "
        "to start the run over"
    )


def test_a_run_resumed_by_another_number_of_workers_is_refused(kdrun, tmp_path):
    """A run begun under torchrun with 2 workers and resumed by 1 process went on: it stored its 2-worker teacher under
    the 1-worker key (later runs took it as theirs) and threw its logit cache away."""
    run_dir, p = resumed_with_teacher_checkpoint_edited(kdrun, tmp_path, workers=2)  # as 2 torchrun workers save it
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"kdrun: error: hydra.run.dir={run_dir}: checkpoints/teacher_last.pt was trained by 2 workers, resumed by 1; "
        "resume it with 2 (torchrun --nproc-per-node, trainer.devices or SLURM tasks), or give a new hydra.run.dir to "
        "start over"
    )
