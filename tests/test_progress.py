"""Progress reporting: a tqdm bar in a terminal, plain log lines when stderr is a file or pipe."""

import io
import logging

import pytest
from tqdm import tqdm

from kdrun import progress
from kdrun.errors import ConfigError
from tests.conftest import SMOKE_RUN


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    "env, tty, expected",
    [
        (None, True, "bar"),
        (None, False, "log"),
        ("auto", False, "log"),
        ("bar", False, "bar"),
        ("LOG", True, "log"),
        ("none", True, "none"),
    ],
)
def test_mode(monkeypatch, env, tty, expected):
    if env is None:
        monkeypatch.delenv("KDRUN_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("KDRUN_PROGRESS", env)
    monkeypatch.setattr("sys.stderr", _Stream(tty))
    assert progress.mode() == expected


@pytest.mark.parametrize("var, value", [("KDRUN_PROGRESS", "fancy"), ("KDRUN_PROGRESS_SECONDS", "-1")])
def test_bad_values_refused(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=f"^{var}={value}: "):
        progress.check_env()


def test_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="kdrun")
    bar = progress.LogLines(range(3, 10), total=10, desc="student 2/5", unit="steps", initial=3, every=0.0)
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss="0.5000")
    assert seen == list(range(3, 10))  # the items pass through unchanged
    lines = [r.getMessage() for r in caplog.records]
    # a line after each step but the last (the stage logs its own line when an epoch ends); resumed at step 3
    assert [ln.split(" (")[0] for ln in lines] == [f"student 2/5: {n}/10 steps" for n in range(4, 10)]
    assert lines[-1].startswith("student 2/5: 9/10 steps (90%), ")
    assert lines[-1].endswith(" left, loss=0.5000")
    assert all("\r" not in ln for ln in lines)


def test_log_lines_at_most_every_interval(caplog):
    caplog.set_level(logging.INFO, logger="kdrun")
    bar = progress.LogLines(None, total=1000, desc="cache", unit="img", every=3600.0)
    for _ in range(999):
        bar.update(1)
    assert caplog.records == []


def test_disabled_and_none_say_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kdrun")
    monkeypatch.setenv("KDRUN_PROGRESS", "log")
    monkeypatch.setenv("KDRUN_PROGRESS_SECONDS", "0")
    assert isinstance(progress.progress(total=5, desc="x"), progress.LogLines)
    quiet = progress.progress(range(5), total=5, desc="x", disable=True)  # e.g. DDP ranks other than 0
    assert isinstance(quiet, tqdm) and quiet.disable
    assert list(quiet) == list(range(5))
    monkeypatch.setenv("KDRUN_PROGRESS", "none")
    assert progress.progress(range(5), total=5, desc="x").disable
    assert caplog.records == []


def test_run_logged_to_a_file_has_lines_not_redraws(kdrun, tmp_path):
    """stderr of a subprocess is a pipe: the default gives plain lines, none of tqdm's carriage returns."""
    run_dir = tmp_path / "run"
    p = kdrun("train", *SMOKE_RUN, f"hydra.run.dir={run_dir}", env={"KDRUN_PROGRESS_SECONDS": "0"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\r" not in p.stderr
    assert "] teacher 1/1: 1/12 steps (8%), " in p.stderr, p.stderr[-2000:]
    assert "] student 1/1: 1/2 steps (50%), " in p.stderr
    assert " left" in (run_dir / "train.log").read_text()


def test_bad_value_exits_2(kdrun, tmp_path):
    p = kdrun("train", f"hydra.run.dir={tmp_path / 'r'}", env={"KDRUN_PROGRESS": "fancy"})
    assert p.returncode == 2
    assert p.stderr.strip() == "kdrun: error: KDRUN_PROGRESS=fancy: unknown value; valid: auto, bar, log, none"
    assert not (tmp_path / "r").exists()
