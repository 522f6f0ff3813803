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


def whitened_from(batches) -> torch.Tensor:
    model = build_model("airbench", 2, 3, 16)
    model.init_from_data(batches)
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
    assert torch.equal(teacher.whiten.weight, whitened_from(data.spread_batches(data.train_set, 5000)))
    assert torch.equal(student.whiten.weight, whitened_from(data.spread_batches(data.student_set, 5000)))
    assert not torch.equal(student.whiten.weight, teacher.whiten.weight)


def test_the_images_are_spread_over_the_split_not_its_first_classes(tmp_path):
    """An image folder lists its images class by class: the first 12 of 24 would all be class a."""
    cfg = compose(folder_overrides(image_folder(tmp_path / "data")))
    data = RunData(cfg, torch.device("cpu"))
    assert data.train_set.labels.tolist() == [0] * 12 + [1] * 12
    picked = torch.cat(list(data.spread_batches(data.train_set, 12)))
    assert len(picked) == 12
    everything = torch.cat(list(data.spread_batches(data.train_set, 100)))  # all 24, in order
    assert len(everything) == 24
    rows = [int((everything - p).abs().flatten(1).sum(1).argmin()) for p in picked]
    assert rows == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]  # both classes, evenly


def test_reading_the_images_leaves_the_random_state_alone(tmp_path):
    """A streamed split's DataLoader draws from the global generator: what is seeded after the model (a KD
    method's heads) starts the same whether the split is streamed or in memory."""
    root = image_folder(tmp_path / "data")
    draws = []
    for mode in ("memory", "stream"):
        cfg = compose([*folder_overrides(root), f"dataset.mode={mode}", f"dataset.cache_dir={tmp_path / 'cache'}"])
        data = RunData(cfg, torch.device("cpu"))
        StageRunner(cfg, data, str(tmp_path / mode), ("x", "x")).build("teacher", cfg.teacher, trains_on=data.train_set)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])


def test_a_teacher_set_from_the_data_says_how_in_its_store_key(tmp_path):
    """Which images set its first layer is part of what an airbench teacher is; other teachers' keys are as before."""
    from kdrun import train
    from kdrun.stages import DATA_INIT

    root = image_folder(tmp_path / "data")
    airbench = train.Run(compose(folder_overrides(root)), str(tmp_path)).teachers.recipe()
    assert airbench["data_init"] == DATA_INIT
    other = train.Run(compose([*folder_overrides(root), "teacher=resnet8"]), str(tmp_path)).teachers.recipe()
    assert "data_init" not in other


def test_an_airbench_teacher_and_student_run_end_to_end(tmp_path):
    from tests.conftest import run_kdrun

    root = image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    p = run_kdrun(
        "train", *folder_overrides(root), "store.enabled=false", "trainer.latency=false", f"hydra.run.dir={run_dir}"
    )
    assert p.returncode == 0, p.stderr[-2000:]
    teacher = torch.load(run_dir / "checkpoints" / "teacher.pt", weights_only=True)["model"]
    data = RunData(compose(folder_overrides(root)), torch.device("cpu"))  # the run's split (trainer=smoke's)
    # set from the training split before training, then frozen: the checkpoint carries it as it was set
    assert torch.equal(teacher["whiten.weight"], whitened_from(data.spread_batches(data.train_set, 5000)))
