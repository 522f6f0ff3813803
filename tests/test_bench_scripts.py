"""Smoke test: scripts/reference_kd.py and scripts/bench_speed.py run end to end (no timing assertions).

Both run for 2 steps on a synthetic 32x32 JPEG folder of 2 classes in ``tmp_path``.
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


def run(script: str, *args: str, env: dict) -> str:
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, script), *args], capture_output=True, text=True, env=env, timeout=600
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
