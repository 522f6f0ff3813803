"""The student stages' transfer set (dataset.student_fraction, dataset.student_exclude) and the
evaluation of a class-biased student (evaluate.logit_bias): Hinton et al. (2015), sections 3 and 5."""

import pytest
import torch

from kdrun.data.base import ImageSet
from kdrun.run_data import transfer_subset


def labelled_set() -> ImageSet:
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 40, 30, 20, 10, 5, 3, 2, 1, 100]))
    images = torch.arange(len(labels)).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()  # image i holds i
    return ImageSet(images, labels)


def test_transfer_subset_is_seeded_stratified_and_a_subset():
    data = labelled_set()
    labels = data.labels
    sub = transfer_subset(data, 0.1, seed=3)
    counts = torch.bincount(sub.labels, minlength=10).tolist()
    assert counts == [5, 4, 3, 2, 1, 1, 1, 1, 1, 10]  # round(10%) of each class, at least one image
    again, other = transfer_subset(data, 0.1, seed=3), transfer_subset(data, 0.1, seed=4)
    assert torch.equal(sub.labels, again.labels) and torch.equal(sub.images, again.images)
    assert not torch.equal(sub.images, other.images)
    # every chosen image is a training image with its own label
    idx = sub.images[:, 0, 0, 0].long()
    assert torch.equal(labels[idx], sub.labels)
    assert transfer_subset(data, 1.0, seed=3) is data


def test_excluded_classes_leave_the_transfer_set_and_nothing_else_does():
    data = labelled_set()
    sub = transfer_subset(data, 1.0, seed=0, exclude=[3, 9])
    assert set(sub.labels.tolist()) == set(range(10)) - {3, 9}
    assert len(sub) == len(data) - 20 - 100
    part = transfer_subset(data, 0.5, seed=0, exclude=[0])
    assert torch.bincount(part.labels, minlength=10).tolist() == [0, 20, 15, 10, 5, 2, 2, 1, 1, 50]


def test_biased_adds_to_one_class_logit():
    from kdrun.report import biased

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    out = biased(logits, {2: 2.5})
    assert torch.equal(out, torch.tensor([[2.0, 1.0, 2.5], [0.0, 3.0, 3.5]]))
    assert out.argmax(1).tolist() == [2, 2]  # the bias can flip a prediction


def test_no3_run_end_to_end(tmp_path):
    """A transfer set without 3s: the student stages never see one, the teacher does; the biased student is
    scored too, and the per-class errors add up."""
    from tests.conftest import run_smoke

    run_dir = tmp_path / "run"
    p, m = run_smoke(
        run_dir, "dataset.student_fraction=1.0", "dataset.student_exclude=[3]", "evaluate.logit_bias={3:3.5}"
    )
    assert m["dataset"]["train"] == 1438 and m["dataset"]["student_train"] == 1438 - 146  # digits has 146 threes
    from kdrun.cache import read_header

    header = read_header(str(run_dir / "teacher_logits.kdlc"))
    assert header["samples"] == m["dataset"]["student_train"]  # the teacher's logits on the transfer set only
    student = m["test"]["student"]
    biased_scores = student["with_logit_bias"]
    assert biased_scores["bias"] == {"3": 3.5}
    for scores in (student["last"], biased_scores, m["test"]["baseline"]["last"]):
        assert sum(scores["errors_by_class"]) == scores["errors"] and len(scores["errors_by_class"]) == 10
    assert "with logit bias 3:+3.5" in p.stdout + p.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.student_exclude=[10]", "dataset.student_exclude=[10]: must be a list of class indices in [0, 10)"),
        ("evaluate.logit_bias={3:x}", "evaluate.logit_bias={3: 'x'}: must map class indices in [0, 10) to numbers"),
        ("dataset.student_fraction=0", "dataset.student_fraction=0: must be a number in (0, 1]"),
    ],
)
def test_bad_transfer_set_or_bias_is_one_line_exit_2(kdrun_here, override, message, tmp_path):
    p = kdrun_here("train", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


def test_a_split_that_leaves_nothing_to_train_on_is_one_line_before_any_stage():
    """A validation fraction that takes every training image of a small folder, or a transfer set whose classes are
    all excluded: the teacher used to train on nothing (and be stored), then the run ended in a traceback."""
    from kdrun.errors import ConfigError
    from kdrun.run_data import split_validation

    four = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ConfigError, match=r"^trainer.val_fraction=0.9: holds out all 4 training images, leaving none"):
        split_validation(four, 0.9, seed=0)
    train, val = split_validation(four, 0.5, seed=0)
    assert len(train) == len(val) == 2
    with pytest.raises(ConfigError, match=r"^dataset.student_exclude=\[0, 1\]: leaves the student stages no image"):
        transfer_subset(four, 0.5, seed=0, exclude=[0, 1])
