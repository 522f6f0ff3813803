"""A tiny end-to-end run writes every file it claims, with sane values."""

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

FAST = ["trainer=smoke", "teacher=resnet8", "student=resnet8", "trainer.latency=true"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from tests.conftest import run_kdrun

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    p = run_kdrun("train", *FAST, "trainer.val_fraction=0.1", f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir, p


def test_run_writes_every_file(smoke_run):
    run_dir, _ = smoke_run
    for rel in [
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "metrics.json",
        "predictions.pt",
        "metrics_teacher.csv",
        "metrics_student.csv",
        "metrics_baseline.csv",
        "teacher_logits.kdlc",
        "checkpoints/teacher.pt",
        "checkpoints/student.pt",
        "checkpoints/baseline.pt",
    ]:
        assert (run_dir / rel).is_file(), rel
    assert not (run_dir / "FAILED").exists()


def test_metrics_json_has_sane_values(smoke_run):
    run_dir, _ = smoke_run
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "complete" and m["seed"] == 0
    assert m["dataset"]["name"] == "digits" and m["dataset"]["test"] == 359
    assert 0 <= m["test"]["teacher"]["top1"] <= 100
    for who in ("student", "baseline"):
        last = m["test"][who]["last"]
        assert 0 <= last["top1"] <= 100 and 0 <= last["agreement"] <= 100
        assert last["errors"] == round(359 * (1 - last["top1"] / 100))
        assert "best_on_val" in m["test"][who]  # trainer.val_fraction > 0: best epoch chosen on validation
    t, s = m["models"]["teacher"], m["models"]["student"]
    assert t["params"] > 0 and t["flops"] > 0 and t["size_mb"] > 0 and t["latency_ms_cpu_b1"] > 0
    assert m["ratios"]["compression_params"] == pytest.approx(t["params"] / s["params"], rel=1e-3)
    for b in ("b1", "b32"):  # batch 1 and 32: the median and the fastest call, speed-ups from the fastest
        for stats in (t, s):
            assert 0 < stats[f"latency_ms_cpu_{b}_best"] <= stats[f"latency_ms_cpu_{b}"]
        ratio = t[f"latency_ms_cpu_{b}_best"] / s[f"latency_ms_cpu_{b}_best"]
        assert m["ratios"][f"speedup_cpu_{b}"] == pytest.approx(ratio, rel=1e-2)
    timing = m["cpu_timing"]
    assert timing["speedups_from"] == "best" and timing["cpus"] >= 1 and timing["load_1min"] >= 0
    assert timing["median_over_best_max"] >= 1 and isinstance(timing["busy"], bool)
    assert m["versions"]["torch"] == torch.__version__


def test_kd_gain_comes_with_its_paired_test(smoke_run):
    """digits' default transfer set (dataset.student_fraction=0.1) and the gain's exact McNemar test."""
    run_dir, p = smoke_run
    m = json.loads((run_dir / "metrics.json").read_text())
    d = m["dataset"]
    assert d["student_fraction"] == 0.1 and d["train"] == 1294 and abs(d["student_train"] - 129) <= 5
    g = m["kd_gain"]
    assert 0 <= m["kd_gain_p_value"] <= 1 and g["p_value"] == m["kd_gain_p_value"]
    low, high = g["ci95"]  # the paired interval: excludes 0 exactly when p < 0.05
    assert low <= m["kd_gain_top1"] <= high and (low > 0 or high < 0) == (g["p_value"] < 0.05)
    assert f"95% interval [{low:+.2f}, {high:+.2f}] pt, exact McNemar p" in p.stdout + p.stderr
    # the gain is the difference of discordant images over the test split, and equals the top-1 difference
    assert m["kd_gain_top1"] == round(100 * (g["student_only"] - g["baseline_only"]) / 359, 3)
    assert m["kd_gain_top1"] == pytest.approx(
        m["test"]["student"]["last"]["top1"] - m["test"]["baseline"]["last"]["top1"], abs=1.5e-3
    )
    assert "exact McNemar p =" in p.stdout + p.stderr


def test_csv_has_one_row_per_epoch_with_each_loss_term(smoke_run):
    run_dir, _ = smoke_run
    rows = list(csv.DictReader((run_dir / "metrics_student.csv").open()))
    assert len(rows) == 1
    assert {"epoch", "lr", "loss_ce", "loss_kd", "loss"} <= set(rows[0])
    assert float(rows[0]["loss"]) == pytest.approx(float(rows[0]["loss_ce"]) + float(rows[0]["loss_kd"]), rel=1e-3)


def test_logit_cache_matches_the_teacher(smoke_run):
    from kdrun.cache import CacheShape, LogitCache, read_header
    from kdrun.models import build_model
    from kdrun.run_data import RunData

    run_dir, _ = smoke_run
    path = str(run_dir / "teacher_logits.kdlc")
    header = read_header(path)
    student_train = json.loads((run_dir / "metrics.json").read_text())["dataset"]["student_train"]
    # the student stages' transfer set: 10% of (1438 train - 10% validation), the teacher's logits on it
    shape = CacheShape(student_train, 0, 10)
    assert header == shape.header(header["key"])
    cache = LogitCache.open(path, shape, header["key"])
    assert cache.complete  # every image met in the student stage (one view, several epochs)
    index, view = torch.arange(student_train), torch.zeros(student_train, dtype=torch.long)
    cached, _ = cache.lookup(index, view)
    teacher = build_model("resnet8", 10, 1, 8)
    teacher.load_state_dict(torch.load(run_dir / "checkpoints/teacher.pt", weights_only=True)["model"])
    data = RunData(OmegaConf.load(run_dir / ".hydra/config.yaml"), torch.device("cpu"))
    assert len(data.student_set) == student_train
    with torch.no_grad():  # row i: the teacher's logits on image i of the transfer set (stored in fp16)
        want = torch.cat([teacher.eval()(b.x) for b in data.train_loader(0, data.student_set).batches(index, view, 64)])
    torch.testing.assert_close(cached, want.half().float(), rtol=0, atol=1e-2)


def test_summary_printed(smoke_run):
    _, p = smoke_run
    out = p.stdout + p.stderr
    assert "teacher resnet8" in out and "student resnet8" in out and "KD gain" in out and "compression" in out


def test_teacher_checkpoint_reuse_and_mismatch(smoke_run, tmp_path):
    from tests.conftest import run_kdrun

    run_dir, _ = smoke_run
    ckpt = run_dir / "checkpoints" / "teacher.pt"
    p = run_kdrun(
        "train",
        *FAST,
        "baseline=false",
        "trainer.latency=false",
        f"teacher.checkpoint={ckpt}",
        f"teacher.pretrained={ckpt}",  # starting weights the checkpoint replaces: not read, and said so
        f"hydra.run.dir={tmp_path / 'reuse'}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"teacher: teacher.pretrained={ckpt} not used: teacher.checkpoint gives every weight" in p.stderr
    first = json.loads((run_dir / "metrics.json").read_text())["test"]["teacher"]["top1"]
    again = json.loads((tmp_path / "reuse" / "metrics.json").read_text())["test"]["teacher"]["top1"]
    assert again == first  # the same trained teacher, not retrained
    # the run's teacher stage checks the input the checkpoint recorded: here its normalisation
    p = run_kdrun("train", *FAST, "dataset.mean=[0.5]", f"teacher.checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'n'}")
    assert p.returncode == 2 and "was trained on images normalised with dataset.mean=[0.305985]" in p.stderr, p.stderr
    p = run_kdrun("train", *FAST, "teacher=resnet20", f"teacher.checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'bad'}")
    assert p.returncode == 2
    assert (
        f"teacher.checkpoint={ckpt}: holds resnet8 for 10 classes, but this run's teacher is resnet20; give "
        "teacher=resnet8 (and the options it was trained with)" in p.stderr
    )
    assert not (tmp_path / "bad" / "metrics.json").exists()
    assert (tmp_path / "bad" / "FAILED").exists()


def test_a_state_dict_saved_from_a_ddp_or_compiled_model_loads(tmp_path):
    """``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes are the same weights."""
    from kdrun.models import build_model
    from kdrun.weights import load_pretrained

    src, dst = build_model("mlp", 3, 1, 8, hidden=[16]), build_model("mlp", 3, 1, 8, hidden=[16])
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        torch.save({prefix + k: v for k, v in src.state_dict().items()}, tmp_path / "w.pt")
        load_pretrained(str(tmp_path / "w.pt"), dst, "teacher.pretrained")
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
        dst = build_model("mlp", 3, 1, 8, hidden=[16])


def test_teacher_checkpoint_with_other_model_options_is_refused(tmp_path):
    """Options that keep every weight's shape but change what the weights compute (an MLP's activation, a stem's
    strides) fit load_state_dict, so they are compared before it: the first that differs is named."""
    from kdrun.errors import ConfigError
    from kdrun.io import atomic_save
    from kdrun.models import build_model
    from kdrun.weights import load_teacher

    ident = {"arch": "mlp", "source": "kdrun", "num_classes": 10, "in_chans": 1, "image_size": 8}
    relu = {**ident, "kwargs": {"hidden": [16], "activation": "relu"}}
    model = build_model("mlp", 10, 1, 8, hidden=[16], activation="relu")
    atomic_save({"identity": relu, "model": model.state_dict()}, str(tmp_path / "t.pt"))
    load_teacher(str(tmp_path / "t.pt"), model, relu)  # the same options load
    sigmoid = {**ident, "kwargs": {"hidden": [16], "activation": "sigmoid"}}
    with pytest.raises(
        ConfigError,
        match=r"^teacher.checkpoint=.*t.pt: was trained with teacher.kwargs.activation=relu, but this run's teacher "
        r"has teacher.kwargs.activation=sigmoid; give the teacher the options it was trained with$",
    ):
        load_teacher(str(tmp_path / "t.pt"), model, sigmoid)
    with pytest.raises(  # the data's shape: the key to change is the dataset's
        ConfigError,
        match=r"was trained on inputs of image_size=8, but this run's have image_size=16; give "
        r"dataset.image_size=8$",
    ):
        load_teacher(str(tmp_path / "t.pt"), model, {**relu, "image_size": 16})
    with pytest.raises(
        ConfigError,
        match=r"not a kdrun teacher checkpoint .*; this is a training state: give the run's "
        r"checkpoints/teacher.pt$",
    ):
        atomic_save({"model": model.state_dict(), "epoch": 1}, str(tmp_path / "teacher_last.pt"))
        load_teacher(str(tmp_path / "teacher_last.pt"), model, relu)
    # what acts only in training (dropout, max-norm) may differ, and an option left out is its default
    load_teacher(str(tmp_path / "t.pt"), model, {**ident, "kwargs": {"hidden": [16], "dropout": 0.5}})
    # nor what only chose the starting weights (timm's local weights file)
    overlay = {"pretrained_cfg_overlay": {"file": "/elsewhere/w.pth"}}
    load_teacher(str(tmp_path / "t.pt"), model, {**ident, "kwargs": {"hidden": [16], **overlay}})


def test_teacher_checkpoint_of_other_classes_or_normalisation_is_refused_and_other_data_warned(tmp_path, caplog):
    """What a checkpoint recorded of its input: another class order (the outputs would mean other classes) or
    another normalisation (the teacher would see other numbers) is refused; other data only warns (a teacher
    brought from elsewhere is allowed, but its test accuracy is honest only if it never saw these test images)."""
    import logging

    from kdrun.errors import ConfigError
    from kdrun.io import atomic_save
    from kdrun.models import build_model
    from kdrun.weights import load_teacher

    ident = {"arch": "mlp", "source": "kdrun", "kwargs": {"hidden": [16]}, "num_classes": 3, "in_chans": 1}
    ident["image_size"] = 8
    model = build_model("mlp", 3, 1, 8, hidden=[16])
    run = {"classes": ["ant", "bee", "cat"], "normalize": [[0.5], [0.25]], "data": "imagefolder-1"}
    path = str(tmp_path / "t.pt")
    atomic_save({"identity": ident, "model": model.state_dict(), **run}, path)
    load_teacher(path, model, ident, run=run)
    with pytest.raises(ConfigError) as e:
        load_teacher(path, model, ident, run=run | {"classes": ["ant", "cat", "bee"]})
    assert str(e.value) == (
        f"teacher.checkpoint={path}: its output 1 is class 'bee', but this run's class 1 is 'cat' (classes [ant, "
        "bee, cat] against [ant, cat, bee]); give it data with its classes, in its order"
    )
    with pytest.raises(ConfigError) as e:
        load_teacher(path, model, ident, run=run | {"normalize": [[0.306], [0.376]]})
    assert str(e.value) == (
        f"teacher.checkpoint={path}: was trained on images normalised with dataset.mean=[0.5] dataset.std=[0.25], "
        "but this run has dataset.mean=[0.306] dataset.std=[0.376]; give the teacher's (the student may use them too)"
    )
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        load_teacher(path, model, ident, run=run | {"data": "imagefolder-2"})
    assert "trained on other data (imagefolder-1) than this run's (imagefolder-2)" in caplog.text
    # what the data is, when both recorded it: a copy of the files (new times: another identity) is the same data
    atomic_save({"identity": ident, "model": model.state_dict(), **run, "data_content": "imagefolder-c1"}, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        load_teacher(path, model, ident, run=run | {"data": "imagefolder-2", "data_content": "imagefolder-c1"})
        assert caplog.text == ""
        load_teacher(path, model, ident, run=run | {"data": "imagefolder-1", "data_content": "imagefolder-c2"})
    assert "trained on other data (imagefolder-c1) than this run's (imagefolder-c2)" in caplog.text
    atomic_save({"identity": ident, "model": model.state_dict()}, path)  # recorded nothing of its input: loads
    load_teacher(path, model, ident, run=run | {"classes": ["x", "y", "z"], "normalize": [[0.1], [0.1]]})
    # a run with a validation split: a teacher trained on other training images has seen some of its validation set
    held_out = {"validation": {"fraction": 0.1, "seed": 0}}
    for recorded, said in (
        ({"fraction": 0.0, "seed": 0}, "trained on all the training images"),
        ({"fraction": 0.1, "seed": 1}, "trained with another validation split ({'fraction': 0.1, 'seed': 1})"),
        (None, "trained before checkpoints recorded their validation split"),
        ({"fraction": 0.1, "seed": 0}, None),  # the same split: its validation images were held out of it too
    ):
        extra = {"validation": recorded} if recorded else {}
        atomic_save({"identity": ident, "model": model.state_dict(), **run, **extra}, path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kdrun"):
            load_teacher(path, model, ident, run=run | held_out)
            load_teacher(path, model, ident, run=run | {"validation": {"fraction": 0.0, "seed": 0}})  # none: silent
        warned = f"{said}, so it has seen some of this run's validation images (trainer.val_fraction=0.1, trainer.seed"
        assert caplog.text.count("validation images") == (1 if said else 0) and (not said or warned in caplog.text)


def test_streamed_image_folder_runs_end_to_end(tmp_path):
    """dataset.mode=stream: batches decoded from files by DataLoader workers; the logit cache fills on first use.
    A test image that cannot be decoded, met at the final evaluation, ends the run in one line saying how to
    continue it; once the file is fixed, that command only evaluates."""
    from PIL import Image

    from tests.conftest import SMOKE_RUN, run_kdrun

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("test", 8)):
        for c, colour in (("a", 0), ("b", 200)):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                red = int(torch.randint(0, 255, (1,), generator=g))
                Image.new("RGB", (16, 16), (red, colour, 30)).save(tmp_path / "data" / split / c / f"{i}.png")
    broken = tmp_path / "data" / "test" / "b" / "3.png"
    good = broken.read_bytes()
    broken.write_bytes(good[:40])  # a copy cut short
    run_dir = tmp_path / "run"
    p = run_kdrun(
        "train",
        *SMOKE_RUN,
        "trainer.latency=false",
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.image_size=16",
        "dataset.mode=stream",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "read from the logit cache; the teacher fills missing rows on first use" in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kdrun: error: {broken}: not a readable image ("), last
    assert last.endswith(f"; the checkpoints are kept: once the file is fixed, kdrun train resume={run_dir} goes on")
    broken.write_bytes(good)
    p = run_kdrun("train", f"resume={run_dir}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.count("already finished") >= 3, p.stderr[-2000:]  # teacher, student, baseline: evaluated only
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["dataset"]["train"] == 48 and m["dataset"]["test"] == 16
    assert (run_dir / "teacher_logits.kdlc").exists()  # filled on first use from the streamed batches


def test_a_single_training_image_runs(tmp_path):
    """A validation split that leaves one training image: the stages still build (the feature probe takes what
    there is) and the run finishes."""
    from tests.conftest import run_smoke

    p, metrics = run_smoke(tmp_path / "run", "trainer.val_fraction=0.999")
    assert "1 train / 1437 val" in p.stderr
    assert set(metrics["test"]) >= {"teacher", "student", "baseline"}


def test_the_resume_hint_is_for_an_unreadable_image_only(tmp_path):
    """Most errors are fixed by changing the config, which resuming refuses (a checkpoint resumes only with the
    configuration that made it): pointing to `resume=` there would send the user into a second error."""
    from kdrun.errors import ConfigError, UnreadableImage
    from kdrun.task import _resume_hint

    run_dir = tmp_path / "my run"
    assert _resume_hint(UnreadableImage("x.png: not a readable image"), str(run_dir)) == ""  # nothing to keep yet
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "teacher.pt").write_bytes(b"")
    assert _resume_hint(ConfigError("student: non-finite loss (nan)"), str(run_dir)) == ""
    assert _resume_hint(UnreadableImage("x.png: not a readable image"), str(run_dir)) == (
        f"; the checkpoints are kept: once the file is fixed, kdrun train resume='{run_dir}' goes on"
    )
