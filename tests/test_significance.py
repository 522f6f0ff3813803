"""The KD gain's uncertainty: exact McNemar test on paired predictions, t-interval over seeds."""

import math
import statistics

import pytest
import torch

from kdrun.significance import mcnemar, mean_ci


def one_hot_logits(pred: list[int], classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), classes).float()


def exact_two_sided(b: int, c: int) -> float:
    """McNemar's exact test by hand: twice the smaller binomial tail at 1/2, capped at 1."""
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_mcnemar_counts_discordant_pairs_and_matches_the_exact_binomial():
    labels = torch.tensor([0] * 60)
    # 32 images right only with the student, 17 only with the baseline, 6 both right, 5 both wrong
    student = [0] * 32 + [1] * 17 + [0] * 6 + [2] * 5
    baseline = [1] * 32 + [0] * 17 + [0] * 6 + [1] * 5
    t = mcnemar(one_hot_logits(student), one_hot_logits(baseline), labels)
    assert (t.student_only, t.baseline_only) == (32, 17)
    assert t.p_value == pytest.approx(exact_two_sided(32, 17), rel=1e-9)
    assert t.p_value == pytest.approx(0.04438, abs=1e-4)
    assert t.gain_top1 == pytest.approx(100 * (32 - 17) / 60, abs=1e-3)


def test_mcnemar_is_symmetric_and_one_when_nothing_differs():
    labels = torch.tensor([0, 1, 2, 0])
    a, b = one_hot_logits([0, 1, 2, 1]), one_hot_logits([0, 1, 0, 0])
    ab, ba = mcnemar(a, b, labels), mcnemar(b, a, labels)
    assert ab.p_value == ba.p_value and ab.gain_top1 == -ba.gain_top1
    same = mcnemar(a, a, labels)
    assert same.p_value == 1.0 and same.student_only == same.baseline_only == 0 and same.gain_top1 == 0


def test_mean_ci_is_the_student_t_interval():
    values = [1.11, 0.28, 0.56, 0.0, 1.39]
    ci = mean_ci(values)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert (ci.n, ci.mean, ci.std) == (5, pytest.approx(mean), pytest.approx(sd))
    assert ci.low == pytest.approx(mean - half) and ci.high == pytest.approx(mean + half)
    single = mean_ci([2.0])
    assert single.low is None and single.high is None and single.std == 0.0


def test_an_image_with_a_logit_that_is_not_finite_is_wrong_everywhere():
    """A NaN compares False with everything: its true class ranked first, so all-NaN logits scored 100 % top-1 (and
    an epoch whose validation logits were NaN was kept as the best) while errors, from argmax, counted them wrong."""
    from kdrun.evaluation import accuracy
    from kdrun.report import _scores, agreement

    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = one_hot_logits([0, 1, 2, 0, 1, 2])
    logits[:4] = float("nan")
    logits[4, 0] = float("inf")
    assert accuracy(logits, labels) == pytest.approx([100 / 6, 100 / 6])
    scores = _scores(logits, labels)
    assert scores["top1"] == pytest.approx(16.667) and scores["errors"] == 5
    assert agreement(logits, logits.clone()) == pytest.approx(16.667)  # a broken row agrees with nothing
    test = mcnemar(logits, one_hot_logits([0, 1, 2, 0, 1, 2]), labels)
    assert (test.student_only, test.baseline_only) == (0, 5)


def test_a_p_value_below_the_smallest_double_is_never_printed_as_0():
    from kdrun.significance import exact_mcnemar_p, format_p

    assert exact_mcnemar_p(1100, 0) == 0.0  # 2 x 0.5^1100 underflows
    assert format_p(exact_mcnemar_p(1100, 0)) == "< 1e-300"
    assert [format_p(p) for p in (0.0496, 0.0504, 1.0, 1.78e-15)] == ["0.0496", "0.0504", "1", "1.78e-15"]
    assert format_p(float("nan")) == "nan"
