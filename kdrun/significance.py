"""Uncertainty of a KD gain: a paired test on one run's test images, an interval over seeds.

* :func:`mcnemar` compares the distilled student and its baseline image by image.
  Only the discordant images carry information: ``b`` that the student gets
  right and the baseline wrong, ``c`` the reverse. Under "no difference" each
  discordant image is a fair coin, so the exact two-sided p-value is the
  binomial test of ``b`` successes in ``b + c`` trials at 1/2 (McNemar's test,
  exact form; ``scipy.stats.binomtest``).
* :func:`paired_interval` is the confidence interval of such a paired difference (of two runs' models on the
  same images: ``kdrun compare``).
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
    labels = labels.cpu()
    b, c = discordant(student_logits.argmax(1).cpu() == labels, baseline_logits.argmax(1).cpu() == labels)
    gain = 100.0 * (b - c) / max(len(labels), 1)
    return PairedTest(round(gain, 3), b, c, exact_mcnemar_p(b, c))


def discordant(a_ok: torch.Tensor, b_ok: torch.Tensor) -> tuple[int, int]:
    """(images only ``a`` gets right, images only ``b`` gets right) from two per-image correctness masks."""
    return int((a_ok & ~b_ok).sum()), int((~a_ok & b_ok).sum())


def exact_mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` and ``c`` discordant images (1.0 when there are none)."""
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0


def paired_interval(b: int, c: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` interval, in percentage points, of the difference of two accuracies measured on the same ``n``
    images, ``b`` right only for the first model and ``c`` only for the second.

    Agresti & Min (2005, *Statistics in Medicine* 24: 729-740): the Wald interval of (b - c) / n, variance
    ((b + c) - (b - c)^2 / n) / n^2, after adding 0.5 to each of the four cells of the paired table (b, c and n + 2).
    The plain Wald interval has width 0 when b = c = 0 or when every image is discordant, claiming a certainty the
    images do not give; the adjusted one keeps its coverage there (cut to [-100, 100]) and equals Wald to a few
    hundredths of a point once b + c is in the hundreds."""
    from scipy.stats import norm

    b_, c_, n_ = b + 0.5, c + 0.5, n + 2.0
    d = (b_ - c_) / n_
    half = float(norm.ppf(0.5 + level / 2)) * math.sqrt(max((b_ + c_) - (b_ - c_) ** 2 / n_, 0.0)) / n_
    return max(-100.0, 100.0 * (d - half)), min(100.0, 100.0 * (d + half))  # a difference lies in [-100, 100]


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
