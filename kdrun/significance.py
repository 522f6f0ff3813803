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
* :func:`holm` adjusts the p-values of several comparisons made together.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import torch

from kdrun.evaluation import top1


@dataclass(frozen=True)
class PairedTest:
    gain_top1: float  # student top-1 minus baseline top-1, percentage points
    student_only: int  # test images the student classifies correctly and the baseline does not
    baseline_only: int  # the reverse
    p_value: float  # exact two-sided McNemar test; 1.0 when there is no discordant image
    ci95: tuple[float, float]  # of gain_top1, points: paired_interval's (named in ``interval``)
    test: str = "exact McNemar (two-sided binomial test on the discordant test images)"
    interval: str = "hull of Agresti-Min (2005) and the exact test's Clopper-Pearson interval"

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar(student_logits: torch.Tensor, baseline_logits: torch.Tensor, labels: torch.Tensor) -> PairedTest:
    """The paired comparison of two classifiers' top-1 predictions on the same labelled images."""
    labels = labels.cpu()
    b, c = discordant(top1(student_logits).cpu() == labels, top1(baseline_logits).cpu() == labels)
    n = max(len(labels), 1)
    low, high = paired_interval(b, c, n)
    return PairedTest(round(100.0 * (b - c) / n, 3), b, c, exact_mcnemar_p(b, c), (round(low, 3), round(high, 3)))


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

    The smallest interval holding two: Agresti & Min's (2005, *Statistics in Medicine* 24: 729-740; the Wald
    interval of (b - c) / n after adding 0.5 to each cell of the paired table), whose coverage is near ``level``
    over the draw of the images, and the interval of the exact McNemar test (:func:`exact_mcnemar_p`), given the
    ``b + c`` discordant images (pi's Clopper-Pearson interval, for pi the share of them the first model wins,
    mapped to ``(2 pi - 1) (b + c) / n``). The first alone excluded 0 where the exact test printed beside it says
    p = 0.065 (b = 9, c = 2); the second alone is too narrow away from 0, as it takes (b + c) / n as known. Their
    hull excludes 0 exactly when p < 1 - ``level`` (every b + c < 60 at n = 40 ... 10,000), and covers at least
    as often as Agresti-Min's."""
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"paired_interval: b={b}, c={c} discordant of n={n} images")
    wald, exact = agresti_min_interval(b, c, n, level), exact_conditional_interval(b, c, n, level)
    low, high = (wald[0], wald[1]) if exact is None else (min(wald[0], exact[0]), max(wald[1], exact[1]))
    return max(-100.0, low), min(100.0, high)  # a difference lies in [-100, 100]


def agresti_min_interval(b: int, c: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Agresti & Min's interval of a paired difference, in points: Wald's after adding 0.5 to each cell."""
    from scipy.stats import norm

    b_, c_, n_ = b + 0.5, c + 0.5, n + 2.0
    d = (b_ - c_) / n_
    half = float(norm.ppf(0.5 + level / 2)) * math.sqrt(max((b_ + c_) - (b_ - c_) ** 2 / n_, 0.0)) / n_
    return 100.0 * (d - half), 100.0 * (d + half)


def exact_conditional_interval(b: int, c: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """The exact McNemar test's interval, in points, given the ``b + c`` discordant images: the Clopper-Pearson
    interval of the share pi the first model wins, mapped to ``(2 pi - 1) (b + c) / n``; None without any."""
    from scipy.stats import binomtest

    if not b + c:
        return None
    ci = binomtest(b, b + c, 0.5).proportion_ci(confidence_level=level, method="exact")
    return 100.0 * (2 * ci.low - 1) * (b + c) / n, 100.0 * (2 * ci.high - 1) * (b + c) / n


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


def format_p(p: float) -> str:
    """A p-value in three significant digits, so 0.0496 and 0.0504 stay on their sides of 0.05; one below the
    smallest double (2 x 0.5^1100: 1,100 discordant images all one way) is ``< 1e-300``, never ``0``."""
    return f"{p:.3g}" if p > 0 or math.isnan(p) else "< 1e-300"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``m`` p-values tested together (it bounds the chance of any false difference
    by the level), in their order: the ``k``-th smallest times ``m - k + 1``, never below an earlier one, at most 1."""
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
