"""How often kdrun's paired statistics mislead, by simulation: prints two tables.

1. Sweep reports (``vs_best_val_p``): K models of equal accuracy, scored on N validation images, compared with the
   best of them. "before": the best chosen and compared on all images, p-values as they are; "now"
   (:func:`kdrun.sweep_report.paired_with_best`): chosen on the even-numbered images, compared on the odd-numbered
   ones, Holm-adjusted. Also how often a model truly 2 or 4 points worse is flagged (the price in power).
2. ``kdrun compare``'s 95% interval of a paired difference: coverage over draws of the images, for Agresti-Min's
   interval, the exact test's conditional one, and their hull (:func:`kdrun.significance.paired_interval`).

    python scripts/bench_paired_stats.py [--sweeps 200] [--draws 2000]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from kdrun.compare import compare
from kdrun.predictions import SplitPredictions
from kdrun.significance import agresti_min_interval, exact_conditional_interval, holm, paired_interval


def flagged(error_rates: list[float], images: int, sweeps: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Per method: (share of comparisons with p < 0.05, share of sweeps with any, share flagging the last model)."""
    g = torch.Generator().manual_seed(seed)
    k = len(error_rates)
    counts = {"before": [0, 0, 0], "now": [0, 0, 0]}
    labels = torch.zeros(images, dtype=torch.long)
    for _ in range(sweeps):
        splits = [
            SplitPredictions("v", labels, {"m": (torch.rand(images, generator=g) < r).to(torch.int32)})
            for r in error_rates
        ]

        def acc(sp: SplitPredictions) -> float:
            return float(sp.correct("m").float().mean())

        for method in counts:
            if method == "before":
                best = max(splits, key=acc)
                others = [i for i, sp in enumerate(splits) if sp is not best]
                ps = [compare(splits[i], "m", best, "m").p_value for i in others]
            else:
                best = max(splits, key=lambda sp: acc(sp.every_other(0)))
                others = [i for i, sp in enumerate(splits) if sp is not best]
                judged = best.every_other(1)
                ps = holm([compare(splits[i].every_other(1), "m", judged, "m").p_value for i in others])
            hits = [i for i, p in zip(others, ps, strict=True) if p < 0.05]
            counts[method][0] += len(hits)
            counts[method][1] += bool(hits)
            counts[method][2] += (k - 1) in hits
    return {m: (c[0] / (sweeps * (k - 1)), c[1] / sweeps, c[2] / sweeps) for m, c in counts.items()}


def conditional_exact(b: int, c: int, n: int) -> tuple[float, float]:
    """The exact test's interval alone (zero width without a discordant image, as taken on its own)."""
    return exact_conditional_interval(b, c, n) or (0.0, 0.0)


def coverage(interval, draws: np.ndarray, images: int, truth: float) -> float:
    """Share of the draws ``(b, c, rest)`` whose interval holds ``truth``."""
    held = []
    for b, c, _ in draws:
        low, high = interval(int(b), int(c), images)
        held.append(low <= truth <= high)
    return float(np.mean(held))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweeps", type=int, default=200)
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    k, n = 10, 2000
    null = flagged([0.10] * k, n, args.sweeps, 0)
    worse4 = flagged([0.10] * (k - 1) + [0.14], n, args.sweeps, 1)
    worse2 = flagged([0.10] * (k - 1) + [0.12], n, args.sweeps, 2)
    print(f"{args.sweeps} sweeps of {k} models at 90 % on {n} validation images, each compared with the best")
    print("| method | comparisons with p < 0.05 | sweeps with any | a 4 pt worse model flagged | 2 pt worse |")
    print("|---|---|---|---|---|")
    for m in ("before", "now"):
        print(f"| {m} | {null[m][0]:.1%} | {null[m][1]:.1%} | {worse4[m][2]:.1%} | {worse2[m][2]:.1%} |")
    print()
    rng = np.random.default_rng(1)
    print(f"coverage of the 95% interval of a paired difference, {args.draws} draws each")
    print("| p10 / p01 / n | Agresti-Min | conditional exact | hull (kdrun) |")
    print("|---|---|---|---|")
    for p10, p01, images in ((0.1, 0.0, 1000), (0.05, 0.01, 1000), (0.08, 0.02, 500), (0.02, 0.02, 300)):
        draws = rng.multinomial(images, [p10, p01, 1 - p10 - p01], size=args.draws)
        truth = 100 * (p10 - p01)

        intervals = (agresti_min_interval, conditional_exact, paired_interval)
        row = [coverage(f, draws, images, truth) for f in intervals]
        print(f"| {p10} / {p01} / {images} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
