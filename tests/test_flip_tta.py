"""Horizontal-flip test-time augmentation (evaluate.flip_tta): the mean logits of each image and its mirror,
reported beside the single-view figures, never instead of them."""

import pytest
import torch
from torch import nn

from kdrun.data.base import ImageSet
from kdrun.data.loader import Normalize, TensorLoader
from kdrun.evaluation import predict


class LeftHalf(nn.Module):
    """Logits that see only the left half of the image: a mirror image changes them."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        right = x[..., x.shape[-1] // 2 :].mean(dim=(1, 2, 3))
        return torch.stack([left, right, left - right], 1)


def loader(n=10) -> TensorLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 4, 6), generator=g, dtype=torch.uint8)
    return TensorLoader(
        ImageSet(images, torch.zeros(n, dtype=torch.long)), 4, Normalize([0.5] * 3, [0.25] * 3, 3, "cpu")
    )


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror():
    model, data = LeftHalf(), loader()
    x = torch.cat([b.x for b in data.epoch(0)])
    plain, tta = predict(model, data), predict(model, data, flip_tta=True)
    assert torch.allclose(plain, model(x))
    assert torch.allclose(tta, 0.5 * (model(x) + model(x.flip(-1))))
    assert not torch.allclose(tta, plain)  # the mirror is really used
    # left and right halves swap in the mirror: the TTA logits of those two classes are equal
    assert torch.allclose(tta[:, 0], tta[:, 1]) and torch.allclose(tta[:, 2], torch.zeros(len(tta)), atol=1e-6)


def test_flip_tta_keeps_the_model_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(72, 3), nn.Dropout(0.5)).train()
    predict(model, loader(), flip_tta=True)
    assert model.training


def test_run_reports_flip_tta_beside_single_view(tmp_path):
    """Every model gets a ``with_flip_tta`` entry (its agreement under the same protocol), the student its paired
    gain over the baseline; the single-view figures and KD gain stay the run's own."""
    from kdrun.report import last
    from tests.conftest import run_smoke

    p, m = run_smoke(tmp_path / "run", "dataset.augment.flip=true", "evaluate.flip_tta=true")
    test = m["test"]
    for name in ("teacher", "student", "baseline"):
        tta, single = test[name]["with_flip_tta"], last(test[name])
        assert sum(tta["errors_by_class"]) == tta["errors"]
        assert tta["top1"] == pytest.approx(100 * (1 - tta["errors"] / m["dataset"]["test"]), abs=1e-3)
        assert "top1" in single and single is not tta
    assert "agreement" in test["student"]["with_flip_tta"] and "agreement" not in test["teacher"]["with_flip_tta"]
    s, b = test["student"]["with_flip_tta"], test["baseline"]["with_flip_tta"]
    assert s["kd_gain_top1"] == pytest.approx(s["top1"] - b["top1"], abs=1.5e-3)  # two rounded figures
    gain = s["kd_gain"]
    assert s["kd_gain_top1"] == round(100 * (gain["student_only"] - gain["baseline_only"]) / m["dataset"]["test"], 3)
    assert gain["student_only"] - gain["baseline_only"] == b["errors"] - s["errors"]
    assert 0 <= gain["p_value"] <= 1
    assert m["kd_gain_top1"] == pytest.approx(
        test["student"]["last"]["top1"] - test["baseline"]["last"]["top1"], abs=1.5e-3
    )
    out = p.stdout + p.stderr
    assert out.count("  flip TTA") == 3 and "with flip TTA" in out
    # each figure recounted from the saved weights: the run's own on the test images as they are, flip TTA's on
    # the mean logits of each image and its mirror
    from kdrun import io
    from kdrun.export import load_images, load_model

    images, _ = load_images(io.load_yaml(str(tmp_path / "run" / ".hydra" / "config.yaml")))
    differ, teacher_says = False, None
    for name in ("teacher", "student", "baseline"):
        model, _ = load_model(str(tmp_path / "run" / "checkpoints" / f"{name}.pt"))
        with torch.no_grad():
            plain, mirror = model(images.x), model(images.x.flip(-1))
        wrong = plain.argmax(1) != images.y
        wrong_tta = (plain + mirror).argmax(1) != images.y
        assert last(test[name])["errors"] == int(wrong.sum()), name
        assert test[name]["with_flip_tta"]["errors"] == int(wrong_tta.sum()), name
        differ |= bool((wrong != wrong_tta).any())
        if teacher_says is None:
            teacher_says = plain.argmax(1)
        else:  # agreement: the share of test images on which the model and the teacher name the same class
            same = 100 * (plain.argmax(1) == teacher_says).float().mean().item()
            assert last(test[name])["agreement"] == pytest.approx(same, abs=1e-3), name
    assert differ  # else the two protocols could be swapped unnoticed


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["evaluate.flip_tta=true"],  # digits: augment.flip=false
            "evaluate.flip_tta=true: dataset=digits trains without mirrored images",
        ),
        (["evaluate.flip_tta=3"], "evaluate.flip_tta=3: must be true or false"),
    ],
)
def test_bad_flip_tta_is_one_line_exit_2(overrides, message, tmp_path):
    from tests.conftest import run_kdrun

    p = run_kdrun("train", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()
