"""predictions.pt and `kdrun compare`: two runs' models image by image, with the paired test and its interval."""

import math

import pytest
import torch
from scipy.stats import beta

from kdrun.cli import main
from kdrun.compare import compare
from kdrun.predictions import FILE, RunPredictions, SplitPredictions, read, write
from kdrun.significance import exact_mcnemar_p, paired_interval
from tests.conftest import run_smoke


def kdrun_compare(capsys, *args) -> tuple[int, str, str]:
    """``kdrun compare ARGS`` in this process (the command line's own entry point): exit code, stdout, stderr."""
    code = main(["compare", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two smoke runs with a validation split: seeds 0 and 1 (so other validation images)."""
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for seed in (0, 1):
        run_dir = root / f"s{seed}"
        flip = ("dataset.augment.flip=true", "evaluate.flip_tta=true")
        _, metrics = run_smoke(run_dir, "trainer.val_fraction=0.1", f"trainer.seed={seed}", *flip)
        out[seed] = (run_dir, metrics)
    return out


def test_predictions_hold_every_model_on_test_and_validation(runs):
    run_dir, m = runs[0]
    p = read(str(run_dir))
    assert p.roles == m["roles"]
    test, val = p.splits["test"], p.splits["val"]
    assert len(test.labels) == m["dataset"]["test"] and len(val.labels) == m["dataset"]["val"]
    for name, scores in m["test"].items():
        last = scores.get("last", scores)
        assert 100 * test.correct(name).float().mean().item() == pytest.approx(last["top1"], abs=1e-3)
        assert int((~test.correct(name)).sum()) == last["errors"]
        tta = scores["with_flip_tta"]
        assert 100 * test.correct(name, tta=True).float().mean().item() == pytest.approx(tta["top1"], abs=1e-3)
    for name, summary in m["stages"].items():  # the last epoch's validation top-1 the stage logged
        if name in val.top1:
            assert 100 * val.correct(name).float().mean().item() == pytest.approx(summary["final_val_top1"], abs=1e-3)


def test_compare_student_with_baseline_reproduces_the_runs_kd_gain(runs, capsys):
    run_dir, m = runs[0]
    code, out, err = kdrun_compare(capsys, f"{run_dir}:student", f"{run_dir}:baseline", "--split", "test")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("student vs baseline"))
    cells = row.split()
    g = m["kd_gain"]
    assert float(cells[3]) == pytest.approx(m["test"]["student"]["last"]["top1"], abs=0.01)
    assert float(cells[4]) == pytest.approx(m["test"]["baseline"]["last"]["top1"], abs=0.01)
    assert float(cells[5]) == pytest.approx(m["kd_gain_top1"], abs=0.01)
    assert (int(cells[-3]), int(cells[-2])) == (g["student_only"], g["baseline_only"])
    assert float(cells[-1]) == pytest.approx(g["p_value"], rel=1e-2)
    assert "test split, 359 images" in out


def test_compare_defaults_to_the_validation_split_and_every_shared_role(runs, capsys):
    run_dir, _ = runs[0]
    code, out, err = kdrun_compare(capsys, run_dir, run_dir)
    assert code == 0, err
    assert "val split, 144 images" in out
    rows = [line.split() for line in out.splitlines() if line.split()[0] in ("teacher", "student", "baseline")]
    assert [r[0] for r in rows] == ["teacher", "student", "baseline"]
    assert all(r[3] == "+0.00" and r[-3:] == ["0", "0", "1"] for r in rows)  # a run against itself


def test_compare_across_seeds_on_the_test_split(runs, capsys):
    (a, ma), (b, mb) = runs[0], runs[1]
    code, out, err = kdrun_compare(capsys, a, b, "--split", "test", "--tta")
    assert code == 0, err
    assert "last epoch, flip TTA" in out
    teacher = next(line.split() for line in out.splitlines() if line.startswith("teacher"))
    assert float(teacher[1]) == pytest.approx(ma["test"]["teacher"]["with_flip_tta"]["top1"], abs=0.01)
    assert float(teacher[2]) == pytest.approx(mb["test"]["teacher"]["with_flip_tta"]["top1"], abs=0.01)
    # a p-value of two models is not one of two settings: the runs differ in their seed alone, and it says so
    assert "not training randomness (another trainer.seed trains other models)" in out
    assert out.strip().endswith(
        "A and B differ only in trainer.seed: a difference between them is training randomness."
    )


def test_runs_of_two_settings_get_no_seed_only_note(runs, tmp_path, capsys):
    """The note is the seeds': a run of another setting (its overrides copied, one changed) does not get it."""
    import shutil

    a, _ = runs[0]
    other = tmp_path / "other"
    shutil.copytree(a, other)
    overrides = other / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("trainer.seed=0", "trainer.seed=1") + "- loss.temperature=8\n")
    code, out, err = kdrun_compare(capsys, a, other, "--split", "test")
    assert code == 0, err
    assert "not training randomness" in out and "differ only in trainer.seed" not in out
    overrides.write_text(overrides.read_text().replace("- loss.temperature=8\n", ""))
    assert "differ only in trainer.seed" in kdrun_compare(capsys, a, other, "--split", "test")[1]


def test_compare_counts_the_discordant_images_and_their_interval():
    labels = torch.zeros(100, dtype=torch.long)
    # 10 images right only for A, 4 only for B, 80 right for both, 6 wrong for both
    a = torch.tensor([0] * 10 + [1] * 4 + [0] * 80 + [2] * 6, dtype=torch.int32)
    b = torch.tensor([1] * 10 + [0] * 4 + [0] * 80 + [1] * 6, dtype=torch.int32)
    sa, sb = SplitPredictions("x/test", labels, {"m": a}), SplitPredictions("x/test", labels, {"m": b})
    c = compare(sa, "m", sb, "m")
    assert (c.images, c.a_only, c.b_only) == (100, 10, 4)
    assert (c.top1_a, c.top1_b, c.difference) == (pytest.approx(90.0), pytest.approx(84.0), pytest.approx(6.0))
    assert c.p_value == pytest.approx(0.1795654296875)  # 2 * P(X <= 4), X ~ Binomial(14, 1/2)
    # the hull of Agresti-Min's interval (Wald on the table with 0.5 added to each cell: b = 10.5, c = 4.5,
    # n = 102) and the exact test's (pi = 10 / 14's Clopper-Pearson bounds, as beta quantiles, mapped to points)
    centre, half = 600 / 102, 100 * 1.959963984540054 * math.sqrt(15 - 36 / 102) / 102
    exact = [100 * (2 * beta.ppf(0.025, 10, 5) - 1) * 14 / 100, 100 * (2 * beta.ppf(0.975, 11, 4) - 1) * 14 / 100]
    assert c.ci95 == (pytest.approx(min(centre - half, exact[0])), pytest.approx(max(centre + half, exact[1])))
    # no discordant image: not a zero-width interval, +- 1.95996 * 100 / 52 points for 50 images
    assert paired_interval(0, 0, 50) == (pytest.approx(-196 / 52, rel=1e-4), pytest.approx(196 / 52, rel=1e-4))
    low, high = paired_interval(6, 0, 6)  # every image discordant
    assert high == pytest.approx(100.0) and 0 < low < 80
    with pytest.raises(ValueError):
        paired_interval(8, 3, 10)


def test_the_interval_covers_the_true_difference_over_draws_of_the_images():
    """Over 400 seeded draws of n images (each image: right only for A, only for B, or neither), the interval holds
    the true difference at least 93 % of the time, where the exact test's interval alone held it 30 % of the time
    when every disagreement went one way (p10 = 0.1, p01 = 0, n = 1,000: its upper bound is the estimate)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for p10, p01, n in ((0.1, 0.0, 1000), (0.05, 0.01, 1000), (0.08, 0.02, 500), (0.02, 0.02, 300)):
        draws = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=400)
        truth = 100 * (p10 - p01)
        held = [low <= truth <= high for low, high in (paired_interval(int(b), int(c), n) for b, c, _ in draws)]
        assert np.mean(held) >= 0.93, (p10, p01, n, np.mean(held))


@pytest.mark.parametrize("n", [40, 10_000])
def test_the_interval_excludes_0_exactly_when_the_exact_test_says_p_below_5_percent(n):
    """The interval used before (Agresti-Min's Wald) excluded 0 for b = 9, c = 2 on 10,000 images, where the exact
    test printed beside it says p = 0.065."""
    for b in range(0, 21):
        for c in range(0, 21 - b):
            if b + c > n:
                continue
            low, high = paired_interval(b, c, n)
            p = exact_mcnemar_p(b, c)
            assert (low > 0 or high < 0) == (p < 0.05), (b, c, low, high, p)
            assert low <= 100 * (b - c) / n <= high
    assert paired_interval(9, 2, 10_000)[0] < 0 < paired_interval(9, 2, 10_000)[1]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["{a}", "{b}"], "and the same trainer.val_fraction and trainer.seed; or compare them on the test images (--s"),
        (["{a}", "{a}:nosuch"], "no model 'nosuch' in"),
        (["{a}", "{a}", "--split", "train"], "compare --split train: valid: val, test"),
        (["{a}", "{a}", "--bogus"], "compare --bogus: unknown option"),
        (["{a}"], "compare: needs two runs, got 1"),
        (["{a}", "{empty}"], "has no predictions.pt"),
        (["{a}", "{a}/nowhere"], "is not a directory"),
    ],
)
def test_compare_refuses_bad_input_with_one_line(runs, tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    fill = {"a": runs[0][0], "b": runs[1][0], "empty": tmp_path / "empty"}
    code, out, err = kdrun_compare(capsys, *[x.format(**fill) for x in args])
    assert code == 2, out + err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_compare_refuses_a_split_a_run_lacks_and_tta_it_never_scored(tmp_path, capsys):
    labels = torch.zeros(6, dtype=torch.long)
    test_only = {"test": SplitPredictions("d/test", labels, {"student": torch.zeros(6, dtype=torch.int32)})}
    write(str(tmp_path), RunPredictions({"student": "student"}, test_only))  # trainer.val_fraction=0, no flip TTA
    code, _, err = kdrun_compare(capsys, tmp_path, tmp_path, "--split", "val")
    assert code == 2 and "has no validation split (trainer.val_fraction=0); valid: test" in err
    code, _, err = kdrun_compare(capsys, tmp_path, tmp_path, "--tta")
    assert code == 2 and "both runs need flip-TTA predictions" in err
    code, out, _ = kdrun_compare(capsys, tmp_path, tmp_path)
    assert code == 0 and "test split, 6 images" in out  # the default without a validation split
    blob = (tmp_path / FILE).read_bytes()
    (tmp_path / FILE).write_bytes(blob[: len(blob) // 2])  # truncated
    code, _, err = kdrun_compare(capsys, tmp_path, tmp_path)
    assert code == 2 and f"{tmp_path / FILE}: unreadable or damaged" in err, err


def test_runs_pair_on_what_the_images_are_across_copies_and_across_the_content_key():
    """A run on a copy of the image folder (new file times: another identity) pairs with the original's by the
    content key; a run written before the content key (``images`` then held the identity) pairs by the identity."""
    labels = torch.tensor([0, 1, 1])

    def split(images, by_identity=""):
        return SplitPredictions(images, labels, {"student": labels.int()}, {}, by_identity)

    now = split("imagefolder-bytes/test", "imagefolder-times1/test")
    copy = split("imagefolder-bytes/test", "imagefolder-times2/test")
    before = split("imagefolder-times1/test")  # a predictions.pt of a kdrun before the content key
    other = split("imagefolder-others/test", "imagefolder-times3/test")
    assert now.same_images(copy) and copy.same_images(now)
    assert now.same_images(before) and before.same_images(now)
    assert not copy.same_images(before)  # its identity is another (new times), and the old run recorded no bytes
    assert not now.same_images(other) and not before.same_images(split("imagefolder-times9/test"))
    # the same names, sizes and times, other bytes (same-size PPMs rewritten, times kept): not the same images
    assert not now.same_images(split("imagefolder-otherbytes/test", "imagefolder-times1/test"))
    assert now.every_other(1).same_images(before.every_other(1)) and not now.every_other(0).same_images(
        before.every_other(1)
    )
