"""What verification costs: saving and loading a logit cache of a given size with and without kdrun's checks.

    python scripts/bench_integrity.py [--gb 1.0] [--classes 1000] [--repeat 3] [--dir DIR]

The cache is fp16 ``[N, 1, classes]`` (1 GB = ImageNet-1k logits of 537k images).
Rows: the payload checksum alone (sha256 over the tensor bytes in memory); a
plain ``torch.save`` + fsync vs :func:`kdrun.io.save` (checksum, atomic write,
fsync, rename, directory fsync); a plain ``torch.load(weights_only=True)`` vs
:func:`kdrun.io.load` (load + checksum + header checks); and the store's
per-file SHA-256 that ``Store.get`` computes. Reads come from the page cache
(the file was just written); each figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from kdrun import io


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_save(obj: dict, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="cache size in GB (10^9 bytes)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir",
        default=None,
        help="where to write the files (default: the system temp dir)",
    )
    args = ap.parse_args()

    n = int(args.gb * 1e9 / 2 / args.classes)
    logits = torch.randn(n, 1, args.classes).half()
    size_gb = logits.numel() * 2 / 1e9
    print(
        f"logit cache: fp16 [{n}, 1, {args.classes}] = {size_gb:.3f} GB; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeat}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        plain, checked = os.path.join(d, "plain.pt"), os.path.join(d, "checked.pt")
        rows = [
            (
                "checksum only (sha256 of the tensor bytes)",
                timed(lambda: io.digest({"logits": logits}), args.repeat),
            )
        ]
        t_plain_save = timed(lambda: plain_save({"logits": logits}, plain), args.repeat)
        t_io_save = timed(lambda: io.save({"logits": logits}, checked, "logits", "k"), args.repeat)
        t_plain_load = timed(
            lambda: torch.load(plain, map_location="cpu", weights_only=True),
            args.repeat,
        )
        t_io_load = timed(lambda: io.load(checked, "logits", "k"), args.repeat)
        t_file = timed(lambda: io.sha256_file(checked), args.repeat)
        rows += [
            ("save: torch.save + fsync", t_plain_save),
            ("save: kdrun.io.save (checksummed, atomic)", t_io_save),
            ("load: torch.load(weights_only=True)", t_plain_load),
            ("load: kdrun.io.load (verified)", t_io_load),
            ("store get: SHA-256 of the file", t_file),
        ]
    print(f"{'operation':<46} {'seconds':>8} {'GB/s':>7}")
    for name, secs in rows:
        print(f"{name:<46} {secs:8.3f} {size_gb / secs:7.2f}")
    print(
        f"verification adds {t_io_load - t_plain_load:.3f} s to a load ({100 * (t_io_load / t_plain_load - 1):.0f} %) "
        f"and {t_io_save - t_plain_save:.3f} s to a save; a store hit adds the file SHA-256 ({t_file:.3f} s)"
    )


if __name__ == "__main__":
    main()
