"""Models set from the data before training (``init_from_data``: airbench's whitening layer)."""

import torch

from kdrun.cli import compose
from kdrun.models import build_model
from kdrun.run_data import RunData
from kdrun.stages import StageRunner


def image_folder(root, per_class=(12, 4)):
    """Two classes of 16x16 noise images (colours differ by class) under ``root``/{train,test}/<class>/."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "test"), per_class):
        for c, tint in (("a", 60), ("b", 180)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8)
                px[..., 0] = tint
                Image.fromarray(px.numpy()).save(root / split / c / f"{i}.png")
    return root


def folder_overrides(root) -> list[str]:
    return [
        "trainer=smoke",
        "teacher=airbench",
        "student=airbench",
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.image_size=16",
        "dataset.mean=[0.5,0.5,0.5]",
        "dataset.std=[0.25,0.25,0.25]",
    ]


def whitened_from(images: torch.Tensor) -> torch.Tensor:
    model = build_model("airbench", 2, 3, 16)
    model.init_from_data(images)
    return model.whiten.weight


def test_each_model_is_set_from_the_images_it_trains_on(tmp_path):
    """The teacher from the training split, the student stages from their transfer set (half of it here): a
    student never sees an image outside its transfer set, not even to set its first layer."""
    cfg = compose([*folder_overrides(image_folder(tmp_path / "data")), "dataset.student_fraction=0.5"])
    data = RunData(cfg, torch.device("cpu"))
    stages = StageRunner(cfg, data, str(tmp_path / "run"), ("x", "x"))
    teacher = stages.build("teacher", cfg.teacher, trains_on=data.train_set)
    student = stages.build("student", cfg.student)
    assert len(data.student_set) == 12 and len(data.train_set) == 24
    assert torch.equal(teacher.whiten.weight, whitened_from(data.first_images(data.train_set, 5000)))
    assert torch.equal(student.whiten.weight, whitened_from(data.first_images(data.student_set, 5000)))
    assert not torch.equal(student.whiten.weight, teacher.whiten.weight)
    assert len(data.first_images(data.train_set, 5)) == 5


def test_an_airbench_teacher_and_student_run_end_to_end(tmp_path):
    from tests.conftest import run_kdrun

    root = image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    p = run_kdrun(
        "train", *folder_overrides(root), "store.enabled=false", "trainer.latency=false", f"hydra.run.dir={run_dir}"
    )
    assert p.returncode == 0, p.stderr[-2000:]
    teacher = torch.load(run_dir / "checkpoints" / "teacher.pt", weights_only=True)["model"]
    assert teacher["whiten.weight"].abs().sum() > 0  # set from the data; the checkpoint carries it
