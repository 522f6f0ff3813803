"""The paths config group, shell completion of `kdrun train`, and plots in the base install."""

import os
import subprocess
import tomllib
from pathlib import Path

from tests.conftest import KDRUN


def compose(overrides, env=None):
    code = (
        "import sys, json; from kdrun.cli import compose; c = compose(sys.argv[1:], with_hydra=True); "
        "print(json.dumps([c.paths.data, c.paths.output, c.dataset.root, c.store.dir, str(c.hydra.run.dir)]))"
    )
    import json
    import sys

    p = subprocess.run(
        [sys.executable, "-c", code, *overrides],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, **(env or {})),
    )
    return json.loads(p.stdout)


def test_paths_roots_follow_kdrun_data_and_paths_output():
    env = {k: v for k, v in os.environ.items() if k != "KDRUN_DATA"}
    data, out, root, store, run = compose(["dataset=mnist"], env=env | {"KDRUN_DATA": "/datasets"})
    assert (data, root) == ("/datasets", "/datasets")
    assert (out, store) == ("outputs", "outputs/.store") and run.startswith("outputs/train/")
    data, out, root, store, run = compose(["dataset=cifar10", "paths.data=/d", "paths.output=/o"])
    assert (root, store) == ("/d", "/o/.store") and run.startswith("/o/train/")


def test_shell_completion_lists_options_of_kdrun_train(tmp_path):
    env = dict(os.environ, COMP_LINE="kdrun train dataset=", COMP_POINT="20")
    p = subprocess.run(
        [*KDRUN, "-sc", "query=bash"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert {"dataset=digits", "dataset=mnist", "dataset=imagefolder"} <= set(p.stdout.split())
    script = subprocess.run(
        [*KDRUN, "-sc", "install=bash"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert script.rstrip().endswith("hydra_bash_completion kdrun")


def test_matplotlib_is_a_base_dependency():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in project["dependencies"])
