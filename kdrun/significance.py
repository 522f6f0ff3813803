"""Uncertainty of a KD gain: a paired test on one run's test images, an interval over seeds.

* :func:`mcnemar` compares the distilled student and its baseline image by image.
  Only the discordant images carry information: ``b`` that the student gets
  right and the baseline wrong, ``c`` the reverse. Under "no difference" each
  discordant image is a fair coin, so the exact two-sided p-value is the
  binomial test of ``b`` successes in ``b + c`` trials at 1/2 (McNemar's test,
  exact form; ``scipy.stats.binomtest``).
* :func:`mean_ci` is the Student-t interval of a mean over seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PairedTest:
    gain_top1: float  # student top-1 minus baseline top-1, percentage points
    student_only: int  # test images the student classifies correctly and the baseline does not
    baseline_only: int  # the reverse
    p_value: float  # exact two-sided McNemar test; 1.0 when there is no discordant image
    test: str = "exact McNemar (two-sided binomial test on the discordant test images)"

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar(student_logits: torch.Tensor, baseline_logits: torch.Tensor, labels: torch.Tensor) -> PairedTest:
    """The paired comparison of two classifiers' top-1 predictions on the same labelled images."""
    from scipy.stats import binomtest

    labels = labels.cpu()
    s_ok = student_logits.argmax(1).cpu() == labels
    b_ok = baseline_logits.argmax(1).cpu() == labels
    b = int((s_ok & ~b_ok).sum())
    c = int((~s_ok & b_ok).sum())
    p = float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    gain = 100.0 * (b - c) / max(len(labels), 1)
    return PairedTest(round(gain, 3), b, c, p)


@dataclass(frozen=True)
class MeanCI:
    n: int
    mean: float
    std: float  # sample standard deviation (0 for n = 1)
    low: float | None  # None for n < 2: one value gives no interval
    high: float | None


def mean_ci(values: list[float], level: float = 0.95) -> MeanCI:
    """Mean, sample std and the two-sided Student-t ``level`` interval of the mean."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return MeanCI(n, mean, 0.0, None, None)
    std = statistics.stdev(values)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return MeanCI(n, mean, std, mean - half, mean + half)
