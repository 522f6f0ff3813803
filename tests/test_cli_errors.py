"""Bad input: exit code 2, one line naming the key or file and what is valid, nothing half-written."""
import os

import pytest


@pytest.mark.parametrize("args, expected", [
    (["teacher=nosuchnet"], "teacher=nosuchnet: unknown option; valid:"),
    (["loss.alpha=1.5"], "loss.alpha=1.5: must be a number in [0, 1]"),
    (["loss.temperature=0"], "loss.temperature=0: must be a number > 0"),
    (["trainer.epochs=-1"], "trainer.epochs=-1: must be an integer >= 0"),
    (["trainer.epohcs=3"], "trainer.epohcs: unknown key; valid keys of trainer:"),
    (["teacher.checkpoint=/nonexistent/teacher.pt"], "teacher.checkpoint=/nonexistent/teacher.pt: file not found"),
    (["teacher.name=nosuchnet"], "teacher.name=nosuchnet: unknown model; valid:"),
    (["loss=nosuchloss"], "loss=nosuchloss: unknown option; valid:"),
    (["-m", "loss.alpha=0.5,2"], "loss.alpha=2: must be a number in [0, 1]"),
])
def test_bad_input_exits_2_with_one_line(kdrun, tmp_path, args, expected):
    run_dir = tmp_path / "run"
    p = kdrun("train", *args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("kdrun: error: " + expected), lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    assert not run_dir.exists()  # nothing written


def test_unknown_option_lists_valid_ones(kdrun, tmp_path):
    p = kdrun("train", "student=nosuchnet", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2
    assert "mbv2_tiny" in p.stderr and "resnet20" in p.stderr


def test_full_error_shows_traceback(kdrun, tmp_path):
    p = kdrun("train", "loss.alpha=1.5", f"hydra.run.dir={tmp_path / 'r'}", env={"HYDRA_FULL_ERROR": "1"})
    assert p.returncode != 0
    assert "Traceback" in p.stderr


def test_unknown_command(kdrun):
    p = kdrun("trian")
    assert p.returncode == 2
    assert p.stderr.strip() == "kdrun: error: unknown command 'trian'; valid: " + ", ".join(
        __import__("kdrun.cli", fromlist=["COMMANDS"]).COMMANDS)
