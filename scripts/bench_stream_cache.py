"""Distillation from a streamed image folder: the logit cache (filled on first use) against the teacher online.

    python scripts/bench_stream_cache.py [--root DIR] [--fraction 0.05] [--epochs 3] [--views 2]
                                         [--size 64] [--teacher resnet18] [--student mbv2] [--threads 2]
                                         [--sides cache,topk,online] [--out DIR]

Each side is one ``kdrun train`` process on ``dataset=imagefolder dataset.mode=stream`` (default root:
``$KDRUN_DEV_CACHE/tiny-imagenet-200``, made by ``scripts/prepare_dev_data.py``), the student stages on a
seeded ``--fraction`` of the training images, the teacher untrained (``trainer.teacher_epochs=0``: its
accuracy does not matter here, its cost per image does), no baseline:

- ``cache``: ``cache.views=K``, the teacher fills the cache on first use of each (image, view);
- ``topk``: the same with ``cache.topk=10``;
- ``online``: ``cache.enabled=false``, the teacher runs on every batch.

It prints, per side: the student stage's seconds and images/s (all epochs; the first epochs of the cached
sides include the teacher passes that fill it), the teacher images computed during the stage, the peak
resident memory of the process (``ru_maxrss``), and the cache file's size. One process after another;
say what else ran on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

DEV_CACHE = os.environ.get("KDRUN_DEV_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kdrun-dev"))
SIDES = {
    "cache": [],
    "topk": ["cache.topk=10"],
    "online": ["cache.enabled=false"],
}


def run_side(name: str, a, out: str) -> dict:
    run_dir = os.path.join(out, name)
    args = [
        sys.executable,
        "-m",
        "kdrun.cli",
        "train",
        "dataset=imagefolder",
        f"dataset.root={a.root}",
        "dataset.mode=stream",
        "dataset.test_split=val",
        f"dataset.image_size={a.size}",
        f"dataset.student_fraction={a.fraction}",
        "dataset.mean=[0.48,0.45,0.40]",
        "dataset.std=[0.27,0.26,0.28]",
        f"teacher={a.teacher}",
        f"student={a.student}",
        "trainer.teacher_epochs=0",
        f"trainer.epochs={a.epochs}",
        "trainer.batch_size=128",
        f"trainer.threads={a.threads}",
        "trainer.latency=false",
        "baseline=false",
        f"cache.views={a.views}",
        f"store.dir={os.path.join(out, 'store')}",
        f"hydra.run.dir={run_dir}",
        *SIDES[name],
    ]
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, f"{name}.log")
    with open(log_path, "w") as log:
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
    if os.waitstatus_to_exitcode(status) != 0:
        with open(log_path) as f:
            raise SystemExit(f"{name}: kdrun failed:\n{f.read()[-2000:]}")
    m = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    secs = m["timings_s"]["student"]
    cache = m["stages"].get("cache", {})
    images = m["dataset"]["student_train"] * a.epochs
    return {
        "side": name,
        "seconds": secs,
        "img_s": images / secs,
        "teacher_rows": cache.get("teacher_rows", images if name == "online" else 0),
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "cache_mb": cache.get("size_mb", 0.0),
        "top1": m["test"]["student"]["last"]["top1"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(DEV_CACHE, "tiny-imagenet-200"))
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--student", default="mbv2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default="cache,topk,online")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    a = p.parse_args()
    if not os.path.isdir(os.path.join(a.root, "train")):
        raise SystemExit(f"--root {a.root}: no train/ folder (python scripts/prepare_dev_data.py makes one)")
    sides = a.sides.split(",")
    if unknown := [s for s in sides if s not in SIDES]:
        raise SystemExit(f"--sides: unknown {unknown}; valid: {', '.join(SIDES)}")
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        out = a.out or tmp
        rows = [run_side(s, a, out) for s in sides]
    print(
        f"stream mode, {a.root}, {a.size}px, {a.teacher} -> {a.student}, student on {a.fraction:.0%} of train, "
        f"{a.epochs} epochs, {a.views} views, {a.threads} threads"
    )
    print(f"{'side':8s} {'student s':>10s} {'img/s':>8s} {'teacher imgs':>13s} {'peak RSS MB':>12s} {'cache MB':>9s}")
    for r in rows:
        print(
            f"{r['side']:8s} {r['seconds']:10.1f} {r['img_s']:8.1f} {r['teacher_rows']:13d} "
            f"{r['peak_rss_mb']:12.0f} {r['cache_mb']:9.2f}"
        )


if __name__ == "__main__":
    main()
