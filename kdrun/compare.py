"""``kdrun compare RUN_A[:MODEL] RUN_B[:MODEL] [--split val|test] [--tta]``: two runs' models, image by image.

Two settings scored on the same images differ by what each gets right that the other gets wrong; those
discordant images alone carry the comparison. For each pair of models this prints both top-1 accuracies,
their difference with its 95% interval (:func:`kdrun.significance.paired_interval`) and the exact McNemar test
(:func:`kdrun.significance.exact_mcnemar_p`), from the runs' ``predictions.pt`` (:mod:`kdrun.predictions`).
Settings are chosen on the validation split, so that is the default whenever both runs hold one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kdrun import predictions
from kdrun.errors import ConfigError
from kdrun.significance import discordant, exact_mcnemar_p, format_p, paired_interval

USAGE = """usage: kdrun compare RUN_A[:MODEL] RUN_B[:MODEL] [--split val|test] [--tta]

Compares two runs' models on the same images, image by image: the top-1 of each,
their difference with its 95% interval and the exact McNemar test on the images
only one of them gets right (each run's predictions.pt, written by kdrun train).

  RUN[:MODEL]   a run directory; MODEL a role (teacher, student, baseline) or a
                model name of that run. Without MODEL on either side: every role
                both runs have; with it on one side only: the same on the other
                (e.g. kdrun compare RUN:student RUN:baseline)
  --split S     val (the default when both runs hold a validation split, where
                settings are chosen) or test
  --tta         the flip test-time-augmentation predictions (evaluate.flip_tta)"""

ROLES = ("teacher", "student", "baseline")


@dataclass(frozen=True)
class Comparison:
    images: int
    top1_a: float  # percent
    top1_b: float
    difference: float  # top1_a - top1_b, percentage points
    ci95: tuple[float, float]  # of the difference, percentage points
    a_only: int  # images only A gets right
    b_only: int
    p_value: float  # exact two-sided McNemar


def compare(
    a: predictions.SplitPredictions, model_a: str, b: predictions.SplitPredictions, model_b: str, tta: bool = False
) -> Comparison:
    """``model_a`` of split ``a`` against ``model_b`` of split ``b`` (the same images; ``tta``: their flip-TTA
    predictions)."""
    a_ok, b_ok = a.correct(model_a, tta), b.correct(model_b, tta)
    n = len(a_ok)
    x, y = discordant(a_ok, b_ok)
    top1_a, top1_b = 100.0 * float(a_ok.float().mean()), 100.0 * float(b_ok.float().mean())
    return Comparison(n, top1_a, top1_b, 100.0 * (x - y) / n, paired_interval(x, y, n), x, y, exact_mcnemar_p(x, y))


@dataclass(frozen=True)
class Side:
    arg: str
    run_dir: str
    model: str | None
    preds: predictions.RunPredictions


def parse_args(args: list[str]) -> tuple[list[str], str | None, bool]:
    """(the two RUN[:MODEL] arguments, --split or None, --tta); ConfigError on anything else."""
    sides: list[str] = []
    split, tta = None, False
    it = iter(args)
    for arg in it:
        name, eq, inline = arg.partition("=")
        if name == "--split":
            split = inline if eq else next(it, None)
            if split not in ("val", "test"):
                raise ConfigError(f"compare --split {split}: valid: val, test")
        elif arg == "--tta":
            tta = True
        elif arg.startswith("-"):
            raise ConfigError(f"compare {arg}: unknown option; valid: --split val|test, --tta, --help")
        else:
            sides.append(arg)
    if len(sides) != 2:
        raise ConfigError(
            f"compare: needs two runs, got {len(sides)}; usage: kdrun compare RUN_A[:MODEL] RUN_B[:MODEL]"
        )
    return sides, split, tta


def _side(arg: str) -> Side:
    run_dir, model = arg, None
    if not os.path.isdir(arg) and ":" in arg:  # RUN:MODEL (a directory whose name holds ':' is taken whole)
        run_dir, _, model = arg.rpartition(":")
    if not os.path.isdir(run_dir):
        raise ConfigError(f"compare {arg}: {run_dir} is not a directory; give a run directory (RUN[:MODEL])")
    if not os.path.exists(os.path.join(run_dir, predictions.FILE)):
        raise ConfigError(
            f"compare {arg}: {run_dir} has no {predictions.FILE} (written at the end of a complete kdrun train run; "
            "runs of kdrun before it can be rescored with teacher.checkpoint=... trainer.epochs=0)"
        )
    return Side(arg, run_dir, model or None, predictions.read(run_dir))


def _model(side: Side, split: predictions.SplitPredictions, model: str) -> str:
    name = side.preds.roles.get(model, model)
    if name not in split.top1:
        valid = sorted(set(side.preds.roles) | set(split.top1))
        raise ConfigError(f"compare {side.arg}: no model '{model}' in {side.run_dir}; valid: {', '.join(valid)}")
    return name


def _pairs(a: Side, b: Side) -> list[tuple[str, str, str]]:
    """(label, model of A, model of B) of each row."""
    if a.model or b.model:
        ma, mb = a.model or b.model, b.model or a.model
        assert ma is not None and mb is not None
        return [(ma if ma == mb else f"{ma} vs {mb}", ma, mb)]
    common = [r for r in ROLES if r in a.preds.roles and r in b.preds.roles]
    if not common:
        raise ConfigError(f"compare: {a.run_dir} and {b.run_dir} share no role; name the models (RUN:MODEL)")
    return [(r, r, r) for r in common]


def _split(a: Side, b: Side, split: str | None) -> str:
    if split is None:
        return "val" if "val" in a.preds.splits and "val" in b.preds.splits else "test"
    for s in (a, b):
        if split not in s.preds.splits:
            raise ConfigError(
                f"compare --split {split}: {s.run_dir} has no validation split (trainer.val_fraction=0); valid: test"
            )
    return split


def compare_main(args: list[str]) -> int:
    """Print the comparison table; exit code 0."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    (arg_a, arg_b), split_opt, tta = parse_args(args)
    a, b = _side(arg_a), _side(arg_b)
    split = _split(a, b, split_opt)
    sa, sb = a.preds.splits[split], b.preds.splits[split]
    if not sa.same_images(sb) or len(sa.labels) != len(sb.labels) or not bool((sa.labels == sb.labels).all()):
        raise ConfigError(
            f"compare: {a.run_dir} and {b.run_dir} were scored on different {split} images ({sa.images} vs "
            f"{sb.images}); a paired comparison needs the same dataset"
            + (
                " and the same trainer.val_fraction and trainer.seed; or compare them on the test images (--split test)"
                if split == "val"
                else ""
            )
        )
    rows = []
    for label, ma, mb in _pairs(a, b):
        na, nb = _model(a, sa, ma), _model(b, sb, mb)
        if tta and (na not in sa.flip_tta or nb not in sb.flip_tta):
            raise ConfigError("compare --tta: both runs need flip-TTA predictions (run with evaluate.flip_tta=true)")
        rows.append((label, compare(sa, na, sb, nb, tta)))
    print(f"A = {a.run_dir}\nB = {b.run_dir}")
    view = "flip TTA" if tta else "single view"
    print(f"{split} split, {len(sa.labels)} images ({sa.images}); last epoch, {view}")
    head = f"{'model':<22} {'A top-1':>8} {'B top-1':>8} {'A - B':>7}  {'95% CI':<16} {'only A':>7} {'only B':>7}"
    print(f"{head}  McNemar p")
    for label, c in rows:
        ci = f"[{c.ci95[0]:+.2f}, {c.ci95[1]:+.2f}]"
        print(
            f"{label[:22]:<22} {c.top1_a:8.2f} {c.top1_b:8.2f} {c.difference:+7.2f}  {ci:<16} "
            f"{c.a_only:7d} {c.b_only:7d}  {format_p(c.p_value)}"
        )
    for line in caveats(a.run_dir, b.run_dir, len(sa.labels)):
        print(line)
    return 0


def caveats(run_a: str, run_b: str, images: int) -> list[str]:
    """What the interval and p-value above do not cover: the runs' training randomness."""
    lines = [
        f"The interval and p-value cover the draw of these {images} images for these trained models, not training "
        "randomness (another trainer.seed trains other models): to compare settings, repeat each over seeds "
        "(kdrun report: mean ± std and t-intervals per setting)."
    ]
    if os.path.realpath(run_a) != os.path.realpath(run_b) and _differ_only_in_seed(run_a, run_b):
        lines.append("A and B differ only in trainer.seed: a difference between them is training randomness.")
    return lines


def _differ_only_in_seed(run_a: str, run_b: str) -> bool:
    """Whether the two runs differ in the seed alone: in their overrides, their composed configs and their data
    (:func:`kdrun.sweep_report.swept_keys`)."""
    from kdrun.sweep_report import SEED_KEY, load_run, swept_keys

    a, b = load_run(run_a, run_a), load_run(run_b, run_b)
    return a.overrides_read and b.overrides_read and swept_keys([a, b]) == [SEED_KEY]
