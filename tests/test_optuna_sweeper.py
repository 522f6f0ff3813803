"""kdrun's Optuna sweeper (hydra_plugins/kdrun_optuna): persistent studies on optuna >= 4."""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
from hydra_plugins.kdrun_optuna.sweeper import (  # noqa: E402 (after importorskip)
    FINGERPRINT_ATTR,
    HEARTBEAT_ATTR,
    WORKER_ATTR,
    Heartbeat,
    fail_stale_trials,
    fingerprint,
    fixed_config,
    open_storage,
    search_space,
)
from tests.conftest import KDRUN  # noqa: E402

TINY = [
    "trainer=smoke",
    "teacher=resnet8",
    "student=resnet8",
    "baseline=false",
    "trainer.threads=1",
]
DEAD_PID = 4_000_000  # above Linux's pid_max: no such process


def hydra_cfg(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True).hydra


def test_optuna_preset_selects_the_persistent_sweeper():
    sw = hydra_cfg(["sweep=optuna", "paths.output=/somewhere"]).sweeper
    assert sw._target_ == "hydra_plugins.kdrun_optuna.sweeper.KdrunOptunaSweeper"
    assert sw.storage == "journal:/somewhere/optuna/kdrun_kd.journal"
    assert sw.direction == "maximize" and sw.sampler._target_ == "optuna.samplers.TPESampler"
    assert sw.max_failures is None and sw.grace_period > sw.heartbeat_interval > 0
    assert int(optuna.__version__.split(".")[0]) >= 4


def test_hydra_optuna_sweeper_is_not_needed():
    """The old plugin pins optuna < 3; nothing of kdrun imports it any more."""
    from importlib.util import find_spec

    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)]
    assert "hydra_plugins.kdrun_optuna.sweeper.KdrunOptunaSweeper" in names
    assert find_spec("hydra_plugins.hydra_optuna_sweeper") is None


def test_search_space_from_hydra_override_grammar():
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    space, fixed = search_space(
        {
            "a": "choice(1, 2, 4)",
            "b": "interval(0.1, 0.9)",
            "c": "tag(log, interval(1e-4, 1e-1))",
            "d": "7",
        },
        ["e=range(2, 10, 2)", "f=tag(int, interval(1, 5))", "d=8"],
    )
    assert space["a"] == CategoricalDistribution([1, 2, 4])
    assert space["b"] == FloatDistribution(0.1, 0.9)
    assert space["c"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert space["e"] == IntDistribution(2, 8, step=2)
    assert space["f"] == IntDistribution(1, 5)
    assert fixed == {"d": "8"}  # the command line wins


def sweep(out, *args, env=None, background=False, check=True, timeout=900):
    cmd = [*KDRUN, "train", "-m", "sweep=optuna", *TINY, f"paths.output={out}", *args]
    full_env = dict(os.environ, **(env or {}))
    if not env or "HYDRA_FULL_ERROR" not in env:
        full_env.pop("HYDRA_FULL_ERROR", None)  # errors must be the one line users see
    if background:
        return subprocess.Popen(
            cmd,
            cwd=out,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    p = subprocess.run(
        cmd,
        check=False,
        cwd=out,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def load(out):
    return optuna.load_study(
        study_name="kdrun_kd",
        storage=open_storage(f"journal:{out}/optuna/kdrun_kd.journal"),
    )


def test_interrupted_study_resumes_its_trial_count(tmp_path):
    sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=first")
    study = load(tmp_path)
    assert [t.number for t in study.trials] == [0, 1]
    # a process killed in the middle of trial 2 leaves it RUNNING in the journal
    stale = study.ask(
        {
            "loss.temperature": optuna.distributions.FloatDistribution(1, 10),
            "loss.alpha": optuna.distributions.FloatDistribution(0.1, 0.9),
        }
    )
    stale.set_user_attr(WORKER_ATTR, f"{os.uname().nodename}:{DEAD_PID}")

    sweep(tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=second")  # the same study, resumed
    trials = load(tmp_path).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]  # numbering continues
    assert trials[2].state == optuna.trial.TrialState.FAIL  # the killed trial
    assert trials[3].params == trials[2].params  # ... queued again and run
    assert [t.state for t in trials if t.number != 2] == [optuna.trial.TrialState.COMPLETE] * 3
    assert sorted(os.listdir(tmp_path / "second")).count("3") == 1  # job directory = trial number
    assert trials[3].user_attrs["run_dir"] == str(tmp_path / "second" / "3")  # where its checkpoints are
    results = (tmp_path / "second" / "optimization_results.yaml").read_text()
    assert "n_trials_complete: 3" in results and "best_params" in results


def test_a_continued_study_proposes_new_trials_not_its_first_ones_again(tmp_path):
    """The sampler's seed (0 in the preset) would replay the first process's random start in the second."""
    sweep(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=first")
    sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=second")
    first, second = load(tmp_path).trials
    assert second.state == optuna.trial.TrialState.COMPLETE and second.params != first.params


def test_two_processes_share_one_study(tmp_path):
    procs = [
        sweep(
            tmp_path,
            "hydra.sweeper.n_trials=4",
            f"hydra.sweep.dir=w{i}",
            f"hydra.sweeper.sampler.seed={i}",
            background=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    trials = load(tmp_path).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(complete) <= 5  # both stop once the study holds 4 (one may already be running then)
    assert len({t.number for t in trials}) == len(trials)
    workers = {t.user_attrs[WORKER_ATTR] for t in complete}
    assert len(workers) == 2  # each process ran trials of the same study


SPACE = {
    "loss.temperature": optuna.distributions.FloatDistribution(1, 10),
    "loss.alpha": optuna.distributions.FloatDistribution(0.1, 0.9),
}


@pytest.mark.parametrize(("budget", "jobs"), [(["hydra.sweeper.n_trials=2"], 2), (["hydra.sweeper.max_failures=1"], 1)])
def test_a_sweep_whose_trials_all_fail_stops(tmp_path, budget, jobs):
    """Failed trials do not count toward n_trials: the sweep stops after max_failures of them (null: n_trials),
    with exit code 1 as any sweep with failed jobs (it used to start trial after trial until killed)."""
    p = sweep(
        tmp_path,
        "dataset=mnist",
        f"dataset.root={tmp_path / 'no_such_data'}",  # every job fails at once: its files are not there
        "hydra.sweep.dir=s",
        *budget,
        check=False,
        timeout=120,
    )
    assert p.returncode == 1, p.stderr[-3000:]
    assert f"optuna: stopped after {jobs} failed trials (hydra.sweeper.max_failures={jobs})" in p.stdout + p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"kdrun: error: {jobs} of {jobs} sweep jobs failed; job 0: ")
    assert sorted(d.name for d in (tmp_path / "s").iterdir() if d.is_dir()) == [str(i) for i in range(jobs)]
    assert [t.state for t in load(tmp_path).trials] == [optuna.trial.TrialState.FAIL] * jobs


def test_a_study_refuses_a_sweep_of_another_experiment(tmp_path):
    """The study records the fixed config of the sweep that made it; a sweep of another experiment on the same
    study (another student here) is refused before it runs anything, instead of reporting the other's best."""
    sweep(tmp_path, "hydra.sweeper.n_trials=0", "hydra.sweep.dir=a")  # creates the study, runs nothing
    assert FINGERPRINT_ATTR in load(tmp_path).user_attrs
    p = sweep(tmp_path, "student=mbv2_tiny", "hydra.sweeper.n_trials=1", "hydra.sweep.dir=b", check=False)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("kdrun: error: hydra.sweeper.study_name=kdrun_kd: ")
    assert "student.name: resnet8 there, mbv2_tiny here" in p.stderr and "hydra.sweeper.study_name=NAME" in p.stderr
    assert not (tmp_path / "b").exists() and load(tmp_path).trials == []
    p = sweep(
        tmp_path, "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=0", "hydra.sweep.dir=c", check=False
    )
    assert p.returncode == 2 and "was made to maximize its objective" in p.stderr


def test_the_fingerprint_ignores_the_search_space_and_where_outputs_go():
    from hydra import compose, initialize_config_module

    def fp(*overrides, params=None):
        """The fingerprint a sweep with these command-line overrides records (sweep ones go to the sweeper)."""
        plain = [o for o in overrides if "(" not in o]
        with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=["sweep=optuna", *TINY, *plain], return_hydra_config=True)
        merged = {**dict(cfg.hydra.sweeper.params), **(params or {})}
        space, fixed = search_space(merged, [o for o in overrides if not o.startswith("hydra.")])
        return fingerprint(fixed_config(cfg, space, {k: fixed[k] for k in merged if k in fixed}))

    base = fp()
    assert fp("paths.output=/elsewhere", "trainer.threads=2", "hydra.sweeper.sampler.seed=3") == base
    assert fp("hydra.sweeper.n_trials=50", "loss.temperature=choice(1,2,4)") == base  # searched otherwise
    assert fp("loss.temperature=4") != base  # fixed instead of searched
    assert fp("student=mbv2_tiny") != base and fp("trainer.epochs=2") != base
    assert fp(params={"loss.alpha": "0.5"}) != base  # a fixed value in params is part of the experiment


def test_a_silent_running_trial_is_failed_and_queued_again():
    """A trial left RUNNING by a process on another host (killed with its node) is failed once it has shown no
    heartbeat for grace_period seconds; trials with a recent heartbeat (or start) are left alone."""
    study = optuna.create_study(direction="maximize")
    dead, alive, just_started = (study.ask(SPACE) for _ in range(3))
    for t in (dead, alive, just_started):
        t.set_user_attr(WORKER_ATTR, "node17:4242")
    dead.set_user_attr(HEARTBEAT_ATTR, time.time() - 3600)
    alive.set_user_attr(HEARTBEAT_ATTR, time.time() - 10)

    assert fail_stale_trials(study, grace_period=600) == [dead.number]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "RUNNING", "WAITING"]  # the retry, queued
    retry = study.ask(SPACE)
    assert retry.params == trials[0].params and retry.user_attrs["retry_of"] == dead.number


def test_a_heartbeat_stamps_the_running_trials():
    study = optuna.create_study(direction="maximize")
    trial = study.ask(SPACE)
    with Heartbeat([trial], interval=0.05):
        first = study.trials[0].user_attrs[HEARTBEAT_ATTR]
        time.sleep(0.3)
        later = study.trials[0].user_attrs[HEARTBEAT_ATTR]
    assert later > first
    time.sleep(0.15)
    assert study.trials[0].user_attrs[HEARTBEAT_ATTR] == later  # stopped with the block
    study.tell(trial, 1.0)
    with Heartbeat([trial], interval=0.05):  # a finished trial is not stamped, and that is no error
        time.sleep(0.1)


def test_a_trial_left_running_on_another_node_does_not_block_the_budget(tmp_path):
    """A preempted job requeued elsewhere left trial 0 RUNNING (another host); its heartbeat stopped an hour
    ago: the sweep fails it, runs its parameters again and completes the study."""
    study = optuna.create_study(
        study_name="kdrun_kd",
        storage=open_storage(f"journal:{tmp_path}/optuna/kdrun_kd.journal"),
        direction="maximize",
    )
    stale = study.ask(SPACE)
    stale.set_user_attr(WORKER_ATTR, "node17:4242")
    stale.set_user_attr(HEARTBEAT_ATTR, time.time() - 3600)
    sweep(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=s")
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0


def test_a_trial_stopped_by_sigterm_goes_on_in_its_folder(tmp_path):
    """A preempted sweep (SIGTERM: the job checkpoints and the process exits 75) left trial 0 RUNNING; the same
    command again fails it, and its retry resumes in trial 0's folder from the checkpoint instead of training from
    scratch in a new one (which left the stopped job's FAILED note in the sweep: exit 1 once all trials were done)."""
    args = ("hydra.sweeper.n_trials=1", "hydra.sweep.dir=s", "trainer.epochs=2")
    p = sweep(tmp_path, *args, env={"KDRUN_KILL_AT": "student:2:TERM"}, check=False)
    assert p.returncode == 75, p.stderr[-3000:]
    p = sweep(tmp_path, *args)
    assert "student: resuming from" in p.stdout + p.stderr
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].params == trials[0].params
    assert trials[1].user_attrs["run_dir"] == str(tmp_path / "s" / "0")
    assert sorted(d.name for d in (tmp_path / "s").iterdir() if d.is_dir()) == ["0"]
    assert (tmp_path / "s" / "0" / "metrics.json").exists() and not (tmp_path / "s" / "0" / "FAILED").exists()


def test_a_retry_in_another_sweep_directory_runs_there(tmp_path):
    """The default sweep directory is new each time: a retry sent back to the stopped trial's folder in the old
    one ran outside this sweep's report and exit code (a failure there let the sweep exit 0)."""
    p = sweep(
        tmp_path,
        "hydra.sweeper.n_trials=1",
        "hydra.sweep.dir=s1",
        "trainer.epochs=2",
        check=False,
        env={"KDRUN_KILL_AT": "student:2:TERM"},
    )
    assert p.returncode == 75, p.stderr[-3000:]
    sweep(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=s2", "trainer.epochs=2")
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs["run_dir"] == str(tmp_path / "s2" / "1")
    assert (tmp_path / "s1" / "0" / "FAILED").exists() and (tmp_path / "s2" / "1" / "metrics.json").exists()
    results = (tmp_path / "s2" / "optimization_results.yaml").read_text()
    assert f"best_run_dir: {tmp_path / 's2' / '1'}" in results, results


def test_processes_that_made_a_study_together_share_its_sweep_directory(tmp_path):
    """Each process that found the new study without an id set one (the last write stays): one that wrote the
    directory's record first holds another id than the study's; adopted while the directory holds no runs."""
    import json

    from hydra_plugins.kdrun_optuna.sweeper import STUDY_ID_ATTR, STUDY_MARK, KdrunOptunaSweeper

    storage = f"journal:{tmp_path}/optuna/kdrun_kd.journal"
    study = optuna.create_study(study_name="kdrun_kd", storage=open_storage(storage), direction="maximize")
    study.set_user_attr(STUDY_ID_ATTR, "second")
    (tmp_path / "s").mkdir()
    mark = {"study_id": "first", "study_name": "kdrun_kd", "storage": storage}
    (tmp_path / "s" / STUDY_MARK).write_text(json.dumps(mark))
    sweeper = KdrunOptunaSweeper(study_name="kdrun_kd", storage=storage)
    sweeper.claim_sweep_dir(study, str(tmp_path / "s"))
    assert json.loads((tmp_path / "s" / STUDY_MARK).read_text())["study_id"] == "second"
    (tmp_path / "s" / STUDY_MARK).write_text(json.dumps(mark))
    (tmp_path / "s" / "0" / ".hydra").mkdir(parents=True)  # a run of the study that wrote the record: refused
    with pytest.raises(SystemExit):
        sweeper.claim_sweep_dir(study, str(tmp_path / "s"))


def test_an_in_memory_study_swept_into_a_directory_again_says_why_it_is_refused(tmp_path):
    args = ("hydra.sweeper.storage=null", "hydra.sweeper.n_trials=0", "hydra.sweep.dir=s")
    sweep(tmp_path, *args)
    p = sweep(tmp_path, *args, check=False)
    assert p.returncode == 2 and "an in-memory study (hydra.sweeper.storage=null) is a new one each time" in p.stderr


def test_a_sweep_directory_of_another_study_is_refused(tmp_path):
    """Job folders are named by trial number, so a second study's trial 0 would meet the first's run in 0/ (and
    Hydra would rewrite its .hydra/ before the run refused to resume): refused before anything runs."""
    sweep(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=s")
    before = (tmp_path / "s" / "0" / ".hydra" / "overrides.yaml").read_text()
    p = sweep(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweep.dir=s", "hydra.sweeper.study_name=other", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-3000:]
    assert p.stderr.startswith(f"kdrun: error: hydra.sweep.dir={tmp_path / 's'}: holds the trials of study kdrun_kd ")
    assert (tmp_path / "s" / "0" / ".hydra" / "overrides.yaml").read_text() == before
    assert sorted(d.name for d in (tmp_path / "s").iterdir() if d.is_dir()) == ["0"]
    sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=s")  # its own study goes on there
    assert sorted(d.name for d in (tmp_path / "s").iterdir() if d.is_dir()) == ["0", "1"]


def test_a_typo_in_the_direction_is_one_line(tmp_path):
    p = sweep(tmp_path, "hydra.sweeper.direction=maximise", "hydra.sweep.dir=s", check=False, timeout=120)
    assert p.returncode == 2
    assert p.stderr == "kdrun: error: hydra.sweeper.direction=maximise: unknown direction; valid: maximize, minimize\n"
    assert sorted(os.listdir(tmp_path)) == []  # no sweep directory, no study


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "hydra.sweeper.params.loss.temperature=choice(1,2,4,8)",
            "hydra.sweeper.params.loss: hydra.sweeper.params' keys hold dots, so no override can address one; give "
            "the key as a sweep override ('loss.temperature=choice(1,2,4,8)')",
        ),
    ],
    ids=["dotted-params-key"],
)
def test_a_params_key_no_override_can_address_is_one_line(tmp_path, override, message):
    p = sweep(tmp_path, override, "hydra.sweep.dir=s", check=False, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith(f"kdrun: error: {message}") and p.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == []


def test_the_search_space_examples_of_the_preset_work(tmp_path):
    """The command lines in sweep/optuna.yaml's comments pass kdrun's checks and change the search space as they
    say (``hydra.sweeper.params.loss.temperature=...`` cannot: Hydra cannot address a key holding a dot)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from kdrun.cli import precheck

    preset = Path(__file__).parents[1] / "kdrun" / "configs" / "sweep" / "optuna.yaml"
    examples, line = [], ""
    for comment in (ln[1:].strip() for ln in preset.read_text().splitlines() if ln.startswith("#")):
        line = f"{line} {comment}".strip() if line.endswith("\\") or comment.startswith("kdrun train") else ""
        if line and not line.endswith("\\"):
            examples.append(line.replace("\\", " "))
            line = ""
    for example in examples:
        args = [a for a in shlex.split(example)[2:] if a != "-m"] + [f"paths.output={tmp_path}"]
        precheck(args, "train", multirun=True)  # raises kdrun's one-line error on a form Hydra cannot apply
        plain = [o.input_line for o in OverridesParser.create().parse_overrides(args) if not o.is_sweep_override()]
        space, _ = search_space(dict(hydra_cfg(plain).sweeper.params), [a for a in args if not a.startswith("hydra.")])
        assert space["loss.temperature"] == CategoricalDistribution([1, 2, 4, 8]), example
        assert space["loss.alpha"] == FloatDistribution(0.1, 0.9), example
    assert len(examples) == 2  # a sweep override of the key, and params={key:"..."}
