"""Smoke test: scripts/reference_kd.py, bench_speed.py and bench_cached_step.py run end to end (no timing assertions).

They run for 2 steps on a synthetic 32x32 JPEG folder of 2 classes in ``tmp_path``; scripts/bench_torchdistill.py
runs one epoch of every side there (skipped when torchdistill is not installed).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / split / c)
            for i in range(12):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i:03d}.jpg")
    return tmp_path


def run(script: str, *args: str, env: dict, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, script), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_reference_and_bench_run(folder, tmp_path):
    env = dict(os.environ, KDRUN_CACHE_DIR=str(tmp_path / "decode-cache"))
    small = [
        "--root",
        str(folder),
        "--subset",
        "20",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch",
        "8",
        "--eval-batch",
        "8",
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
    ]
    out = run("reference_kd.py", *small, "--workers", "0", env=env)
    assert "distillation" in out and "images/s" in out
    out = run("bench_speed.py", *small, "--repeats", "1", "--workers", "0", "--threads", "1", env=env)
    for row in ("teacher (CE)", "cache / teacher pass", "distil (kdrun: cached)", "student alone (CE)"):
        assert row in out, out
    assert "student alone with CE" in out and "target distil" in out


def test_bench_cached_step_runs(folder, tmp_path):
    env = dict(os.environ, KDRUN_CACHE_DIR=str(tmp_path / "decode-cache"))
    args = ["--root", str(folder), "--subset", "24", "--steps", "2", "--warmup", "1", "--batch", "8", "--threads", "1"]
    out = run("bench_cached_step.py", *args, "--teacher", "resnet8", env=env)
    for row in ("CE alone", "cache, 0% rows missing", "cache, 15% rows missing", "cache, 100% rows missing"):
        assert row in out, out
    assert "teacher online" in out and "teacher forward, batch 8 " in out


def test_bench_torchdistill_runs_every_side(folder, tmp_path):
    """scripts/bench_torchdistill.py: kdrun (cache), kdrun (online) and torchdistill each run a whole (tiny) run
    from the same kdrun teacher checkpoint and the table has a row per side; a missing teacher is one line, exit 2."""
    pytest.importorskip("torchdistill")
    import torch

    from kdrun import io as kio
    from kdrun.models import build_model

    script = os.path.join(SCRIPTS, "bench_torchdistill.py")
    proc = subprocess.run(
        [sys.executable, script, "--teacher", str(tmp_path / "none.pt"), "--root", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--teacher" in proc.stderr, proc.stderr

    torch.manual_seed(0)
    teacher = build_model("resnet8", 2, 3, 32)
    ident = {"arch": "resnet8", "source": "kdrun", "kwargs": {}, "num_classes": 2, "in_chans": 3, "image_size": 32}
    ckpt = str(tmp_path / "teacher.pt")
    kio.save({"identity": ident, "model": teacher.state_dict()}, ckpt, "checkpoint")
    small = ["--teacher", ckpt, "--root", str(folder), "--subset", "16", "--test-subset", "12", "--epochs", "1"]
    small += ["--batch", "8", "--eval-batch", "8", "--threads", "1", "--workers", "0"]
    out = run("bench_torchdistill.py", *small, env=dict(os.environ), timeout=1800)  # four processes
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line[0] != " "}
    for side in ("kdrun-cache", "kdrun-online", "torchdistill"):
        assert side in rows and len(rows[side]) == 7, out
    # the same teacher weights, normalisation and test images on every side: the same teacher top-1
    assert rows["kdrun-cache"][4] == rows["kdrun-online"][4] == rows["torchdistill"][4], out
    assert rows["torchdistill"][5:] == ["1.00x", "1.00x"], out
