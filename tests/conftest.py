import os
import subprocess
import sys
import tempfile

import pytest

KDRUN = [sys.executable, "-m", "kdrun.cli"]
# runs started by tests keep their outputs/ (and the default artifact store) out of the repository
WORKDIR = tempfile.mkdtemp(prefix="kdrun-tests-")
# the smallest whole run: embedded digits, resnet8 teacher and student, a step or two per stage, no store
SMOKE_RUN = ("trainer=smoke", "teacher=resnet8", "student=resnet8", "store.enabled=false")


def run_kdrun(*args: str, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the ``kdrun`` command line in a subprocess (as a user would)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("HYDRA_FULL_ERROR", None)
    if env and "HYDRA_FULL_ERROR" in env:
        full_env["HYDRA_FULL_ERROR"] = env["HYDRA_FULL_ERROR"]
    return subprocess.run(
        [*KDRUN, *args], cwd=cwd or WORKDIR, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_smoke(run_dir, *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
    """A :data:`SMOKE_RUN` training run into ``run_dir`` with ``overrides``; its process and ``metrics.json``
    (asserted to have finished)."""
    import json

    p = run_kdrun("train", *SMOKE_RUN, *overrides, f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]
    return p, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def kdrun():
    return run_kdrun


@pytest.fixture
def kdrun_here(monkeypatch, capsys):
    """The ``kdrun`` command line in this process, for bad input refused before anything runs: about 0.1 s where a
    subprocess spends 5 s importing torch and Hydra. Reaching training fails the test (the error was not found up
    front); an exception escaping ``main`` fails it too (a user would have seen a traceback)."""
    from kdrun import cli, task

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(WORKDIR)
    monkeypatch.setattr(task, "hydra_train", lambda: pytest.fail("reached training: the error was not found up front"))

    def run(*args: str) -> subprocess.CompletedProcess:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run
