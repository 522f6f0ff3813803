"""kdrun's Optuna sweeper (hydra_plugins/kdrun_optuna): persistent studies on optuna >= 4."""

import os
import subprocess

import pytest

optuna = pytest.importorskip("optuna")
from hydra_plugins.kdrun_optuna.sweeper import WORKER_ATTR, open_storage, search_space  # noqa: E402 (after importorskip)
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


def sweep(out, *args, env=None, background=False):
    cmd = [*KDRUN, "train", "-m", "sweep=optuna", *TINY, f"paths.output={out}", *args]
    full_env = dict(os.environ, **(env or {}))
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
        timeout=900,
    )
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
    results = (tmp_path / "second" / "optimization_results.yaml").read_text()
    assert "n_trials_complete: 3" in results and "best_params" in results


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
