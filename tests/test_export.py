"""kdrun export: ONNX / TorchScript files, parity with onnxruntime, int8 PTQ, export.json, bad input."""

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import run_kdrun

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SMOKE = [
    "trainer=smoke",
    "teacher=resnet8",
    "student=mbv2_tiny",
    "trainer.latency=false",
    "store.enabled=false",
    "trainer.threads=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "run"
    p = run_kdrun("train", *SMOKE, f"hydra.run.dir={d}")
    assert p.returncode == 0, p.stderr[-2000:]
    return d


@pytest.fixture(scope="module")
def exported(run_dir):
    p = run_kdrun(
        "export",
        str(run_dir),
        "quantize=int8",
        "models=student,teacher",
        "calib=64",
        "threads=1",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_export_writes_onnx_int8_and_json(run_dir, exported):
    out = run_dir / "export"
    names = sorted(f for f in os.listdir(out))
    assert names == [
        "export.json",
        "student.int8.onnx",
        "student.onnx",
        "teacher.int8.onnx",
        "teacher.onnx",
    ]
    doc = json.loads((out / "export.json").read_text())
    by_name = {m["name"]: m for m in doc["models"]}
    assert set(by_name) == {"student", "teacher"}
    for m in by_name.values():
        assert m["max_abs_diff"] <= 1e-4
        assert m["parity_images"] == min(256, doc["test_images"])
        assert 0 <= m["top1"] <= 100 and abs(m["top1"] - m["top1_pytorch"]) <= 0.5
        assert set(m["latency_ms"]) == set(m["eager_latency_ms"]) == {"b1", "b32", "b1_best", "b32_best"}
        q = m["int8"]
        assert q["calibration_images"] == 64
        assert q["top1_drop"] == pytest.approx(m["top1"] - q["top1"], abs=1e-3)
        assert q["size_mb"] == pytest.approx(os.path.getsize(out / q["file"]) / 1e6, abs=1e-3)
        for k, v in q["speedup"].items():  # fp32 time over int8 time: above 1 means int8 is faster
            assert v == pytest.approx(m["latency_ms"][k] / q["latency_ms"][k], rel=1e-2), k
    assert "onnx int8" in exported.stdout and "student" in exported.stdout
    # the int8 top-1 is the int8 file's own, recounted on the run's test images
    from kdrun import io
    from kdrun.export import load_images, load_model

    test, _ = load_images(io.load_yaml(str(run_dir / ".hydra" / "config.yaml")))
    for m in by_name.values():
        sess = onnxruntime.InferenceSession(str(out / m["int8"]["file"]), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {sess.get_inputs()[0].name: test.x.numpy()})[0]
        assert m["int8"]["top1"] == pytest.approx(100 * (logits.argmax(1) == test.y.numpy()).mean(), abs=1e-3)
        # its agreement with the PyTorch model, image by image: a top-1 drop of 0 can hide changed answers
        model, _ = load_model(str(run_dir / "checkpoints" / f"{m['name']}.pt"))
        with torch.no_grad():
            want = model(test.x).numpy()
        same = 100 * (logits.argmax(1) == want.argmax(1)).mean()
        assert m["int8"]["agreement"] == pytest.approx(same, abs=1e-3) and m["agreement"] == 100.0
        assert m["int8"]["max_abs_diff"] == pytest.approx(np.abs(logits - want).max(), rel=1e-3, abs=1e-6)


def test_exported_onnx_has_dynamic_batch_and_matches_the_checkpoint(run_dir, exported):
    from kdrun.export import load_model

    sess = onnxruntime.InferenceSession(str(run_dir / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.shape[0] == "batch" == sess.get_outputs()[0].shape[0]  # dynamic, named as export.json names it
    model, ident = load_model(str(run_dir / "checkpoints" / "student.pt"))
    for batch in (1, 5, 33):
        x = torch.randn(batch, ident["in_chans"], ident["image_size"], ident["image_size"])
        got = sess.run(None, {inp.name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (batch, ident["num_classes"])
        assert np.abs(got - want).max() <= 1e-4


def test_int8_model_is_quantized(run_dir, exported):
    import onnx

    ops = {n.op_type for n in onnx.load(str(run_dir / "export" / "student.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.fixture(scope="module")
def traced(run_dir, tmp_path_factory):
    """An int8 export of the student in this process, every runtime it builds traced: ``calls`` (runtime,
    batch size) of each call; ``calib`` the images quantization was calibrated on. The int8 session is a
    stand-in that is right on every test image (the real one's top-1 is too close to fp32's to tell them
    apart), and timing is a single call whose "milliseconds" are the batch size it ran."""
    import shutil

    from kdrun import export, io

    copy = tmp_path_factory.mktemp("traced") / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    test, train = export.load_images(io.load_yaml(str(copy / ".hydra" / "config.yaml")))
    label_of = {x.numpy().tobytes(): int(y) for x, y in zip(test.x, test.y)}
    calls, calib = [], []
    real_ort, real_eager, real_quantize = export.ort_fn, export.eager_fn, export.quantize_int8

    def traced_fn(runtime, fn):
        def run(x):
            calls.append((runtime, len(x)))
            return fn(x)

        return run

    def always_right(x):
        out = np.zeros((len(x), 10), np.float32)
        out[np.arange(len(x)), [label_of[r.numpy().tobytes()] for r in x]] = 1.0
        return out

    def ort_fn(path, threads=None):
        real_ort(path, threads)  # the file loads
        return traced_fn("int8", always_right) if path.endswith(".int8.onnx") else traced_fn("onnx", real_ort(path))

    def quantize_int8(fp32_path, out_path, images, workdir):
        calib.append(images.clone())
        return real_quantize(fp32_path, out_path, images, workdir)

    def timed_ms(fn, *args, **kwargs):
        start = len(calls)
        fn()
        assert len(calls) == start + 1
        return float(calls[start][1]), float(calls[start][1])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "ort_fn", ort_fn)
        mp.setattr(export, "eager_fn", lambda model: traced_fn("eager", real_eager(model)))
        mp.setattr(export, "quantize_int8", quantize_int8)
        mp.setattr(export, "timed_ms", timed_ms)
        doc = export.run_export(export.ExportOptions(run_dir=str(copy), quantize="int8", calib=64))
    (m,) = doc["models"]
    return m, calls, calib, test, train


def test_int8_top1_is_the_int8_sessions(traced):
    m, calls, _, test, _ = traced
    assert m["top1"] < 100  # the fp32 export is not always right: an int8 top-1 taken from it would show
    assert m["int8"]["top1"] == 100.0 and m["int8"]["top1_drop"] == pytest.approx(m["top1"] - 100.0, abs=1e-3)
    assert sum(b for r, b in calls if r == "int8") >= len(test.x)  # the whole test split went through it


def test_int8_is_calibrated_on_training_images(traced):
    _, _, calib, test, train = traced
    (images,) = calib
    train_rows = {x.numpy().tobytes() for x in train.x}
    rows = [x.numpy().tobytes() for x in images]
    assert len(rows) == len(set(rows)) == 64
    assert all(r in train_rows for r in rows)


def test_latency_is_timed_at_batch_1_and_32(traced):
    """The stand-in timing reports the batch size each timed call ran on, for every runtime."""
    m, *_ = traced
    want = {"b1": 1.0, "b1_best": 1.0, "b32": 32.0, "b32_best": 32.0}
    assert m["latency_ms"] == m["eager_latency_ms"] == m["int8"]["latency_ms"] == want


def test_report_shows_the_export(run_dir, exported):
    p = run_kdrun("report", str(run_dir))
    assert p.returncode == 0, p.stderr
    assert "export (export/export.json)" in p.stdout and "onnx int8" in p.stdout
    assert "input 'images': float32 NCHW" in p.stdout and " agree " in p.stdout  # what to feed it, as README shows


def test_an_operating_system_error_is_one_line(run_dir, kdrun_here, monkeypatch):
    """A run directory kdrun cannot write into (read-only, immutable): one line, exit 2, before the data and the
    models are read (it named a temporary folder, after reading them)."""
    import tempfile

    def denied(prefix="", dir=None):
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}x"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    monkeypatch.setattr("kdrun.run_data.load_dataset", lambda *a: pytest.fail("read the data"))
    p = kdrun_here("export", str(run_dir), "models=student")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"kdrun: error: export {run_dir}: cannot write there (export writes RUN_DIR/export); copy the run folder "
        "somewhere writable and export the copy, or give out=DIR"
    )


def test_a_file_named_export_is_replaced_without_leftovers(tmp_path):
    from kdrun.export import _replace_dir

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "export.json").write_text("{}")
    (tmp_path / "export").write_text("a file in the way")
    _replace_dir(str(tmp_path / "new"), str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path)) == ["export"] and (tmp_path / "export" / "export.json").exists()


def test_torchscript_format(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    p = run_kdrun("export", str(copy), "format=torchscript", "threads=1")
    assert p.returncode == 0, p.stderr[-2000:]
    # torch.jit's four FutureWarnings a model: one line of kdrun's (when this torch deprecates it)
    assert "FutureWarning" not in p.stderr and p.stderr.count("deprecates TorchScript") <= 1, p.stderr
    doc = json.loads((copy / "export" / "export.json").read_text())
    (m,) = doc["models"]
    assert m["file"] == "student.torchscript.pt" and m["max_abs_diff"] <= 1e-4
    scripted = torch.jit.load(str(copy / "export" / m["file"]))
    assert scripted(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_parity_failure_names_the_gap_and_writes_nothing(run_dir, tmp_path):
    import shutil

    from kdrun.errors import KdrunError
    from kdrun.export import ExportOptions, run_export

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    with pytest.raises(
        KdrunError,
        match=r"parity fails on \d+ test images: largest \|delta logit\| .* > atol=-1",
    ):
        run_export(ExportOptions(run_dir=str(copy), atol=-1.0))  # no export can pass a negative tolerance
    assert not (copy / "export").exists()


def test_a_checkpoint_its_model_no_longer_fits_is_one_line(run_dir, tmp_path):
    """A model definition changed since the run (here: the checkpoint names another architecture)."""
    import shutil

    from kdrun import io
    from kdrun.errors import KdrunError
    from kdrun.export import ExportOptions, run_export

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    path = copy / "checkpoints" / "student.pt"
    ckpt = io.load(str(path), "checkpoint")
    io.atomic_save({**ckpt, "identity": {**ckpt["identity"], "arch": "resnet8"}}, str(path))
    with pytest.raises(KdrunError, match=r"^export: .*student.pt: does not fit the model \(.*\)$"):
        run_export(ExportOptions(run_dir=str(copy), models=["student"]))
    assert not (copy / "export").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/run"], "no such run directory"),
        (
            ["RUN", "format=tflite"],
            "format=tflite: unknown format; valid: onnx, torchscript",
        ),
        (
            ["RUN", "quantize=int4"],
            "quantize=int4: unknown quantization; valid: none, int8",
        ),
        (
            ["RUN", "models=student,nosuch"],
            "no checkpoint for nosuch in this run; valid: ",
        ),
        (
            ["RUN", "format=torchscript", "quantize=int8"],
            "quantize=int8: needs format=onnx",
        ),
        (["RUN", "calib=0"], "calib=0: must be a whole number >= 1"),
        (["RUN", "opset=12"], "opset=12: must be a whole number >= 13"),
        (["RUN", "opset=21"], "opset=21: must be a whole number in [13, 20]"),
        (["RUN", "format=torchscript", "opset=17"], "opset=17: an ONNX opset; it needs format=onnx"),
        (["RUN", "calib=8"], "calib=: the int8 calibration images; it needs quantize=int8"),
        (["RUN", "atol=nan"], "atol=nan: must be a number >= 0.0"),
        (["RUN", "colour=red"], "colour: unknown option"),
        (["RUN", "--format", "onnx"], "export --format: unexpected argument"),
        (["RUN", "dataset.root=/nowhere"], "dataset.root=/nowhere: the run's dataset, digits, reads no folder"),
        ([], "missing RUN_DIR"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_dir, args, message):
    p = run_kdrun("export", *[str(run_dir) if a == "RUN" else a for a in args])
    assert p.returncode == 2, p.stdout
    assert message in p.stderr and p.stderr.strip().count("\n") == 0


def test_directory_without_checkpoints_is_refused(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    p = run_kdrun("export", str(tmp_path))
    assert p.returncode == 2 and "no checkpoint in" in p.stderr
    p = run_kdrun("export", str(tmp_path / ".hydra"))
    assert p.returncode == 2 and "not a kdrun run directory" in p.stderr


def test_a_role_names_its_model_where_no_checkpoint_has_the_roles_name(tmp_path):
    """scheme=online: the student is a peer (metrics.json roles.student = peer1), saved as checkpoints/peer1.pt:
    the default models=student exports it; a name that is neither a checkpoint nor a role is refused."""
    from kdrun.export import ExportError, ExportOptions, check_run

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    (tmp_path / "checkpoints").mkdir()
    for name in ("peer1", "peer2"):
        (tmp_path / "checkpoints" / f"{name}.pt").write_bytes(b"")
    (tmp_path / "metrics.json").write_text(json.dumps({"roles": {"student": "peer1"}}))
    assert check_run(ExportOptions(str(tmp_path))) == {"peer1": str(tmp_path / "checkpoints" / "peer1.pt")}
    assert list(check_run(ExportOptions(str(tmp_path), models=["student", "peer2"]))) == ["peer1", "peer2"]
    with pytest.raises(ExportError, match="models=baseline: no checkpoint for baseline in this run; valid: peer1"):
        check_run(ExportOptions(str(tmp_path), models=["baseline"]))


def test_the_input_a_deployer_feeds_is_written_down_and_reproduces_the_runs_images(run_dir, exported):
    """export.json's ``input`` and the ONNX files' ``kdrun.input`` metadata say how to turn a raw image into the
    model's input; done by hand from scikit-learn's raw digits, it gives exactly the run's test images."""
    from sklearn.datasets import load_digits

    from kdrun import io
    from kdrun.export import load_images

    doc = json.loads((run_dir / "export" / "export.json").read_text())
    spec = doc["input"]
    cfg = io.load_yaml(str(run_dir / ".hydra" / "config.yaml"))
    assert spec["mean"] == list(cfg.dataset.mean) and spec["std"] == list(cfg.dataset.std)
    assert spec["shape"] == ["batch", 1, 8, 8] and spec["dtype"] == "float32" and spec["name"] == "images"
    assert spec["output"] == {"name": "logits", "shape": ["batch", 10], "classes": [str(i) for i in range(10)]}
    for file in ("student.onnx", "student.int8.onnx", "teacher.onnx"):
        sess = onnxruntime.InferenceSession(str(run_dir / "export" / file), providers=["CPUExecutionProvider"])
        assert json.loads(sess.get_modelmeta().custom_metadata_map["kdrun.input"]) == spec, file
        assert sess.get_inputs()[0].name == spec["name"]
    assert "x 255/16, rounded to uint8" in spec["pixels"] and "(pixels / 255 - mean) / std" in spec["normalize"]
    pixels = np.round(load_digits().images * 255 / 16)  # the documented recipe, by hand
    mine = torch.from_numpy(((pixels / 255 - spec["mean"][0]) / spec["std"][0])[:, None]).float()
    test, _ = load_images(cfg)
    found = {x.numpy().round(5).tobytes() for x in mine}
    assert all(x.numpy().round(5).tobytes() in found for x in test.x)
    assert "input 'images': float32 NCHW, grey" in exported.stdout


def test_a_later_export_replaces_the_earlier_one_whole(run_dir, tmp_path):
    """Files of an earlier export that the new export.json does not describe are not left behind."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)  # with the module's ONNX + int8 export
    p = run_kdrun("export", str(copy), "format=torchscript", "threads=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(os.listdir(copy / "export")) == ["export.json", "student.torchscript.pt"]
    assert "removed, with the earlier export.json they belonged to: student.int8.onnx, student.onnx" in p.stdout
    assert not [f for f in os.listdir(copy) if f.startswith(".export")]  # no scratch folder left
    extra = {"kdrun.input.json": ""}
    torch.jit.load(str(copy / "export" / "student.torchscript.pt"), _extra_files=extra)
    assert json.loads(extra["kdrun.input.json"]) == json.loads((copy / "export" / "export.json").read_text())["input"]


def test_an_export_goes_where_out_says_and_never_over_a_folder_of_other_files(run_dir, tmp_path):
    """Each export replaced RUN_DIR/export whole: an fp32 export and then an int8 one could not both be kept."""
    before = sorted(os.listdir(run_dir / "export")) if (run_dir / "export").is_dir() else None
    out = tmp_path / "deploy" / "fp32"
    p = run_kdrun("export", str(run_dir), f"out={out}", "threads=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["export.json", "student.onnx"] and f"written: {out}/" in p.stdout
    assert not [f for f in os.listdir(out.parent) if f.startswith(".export")]  # no scratch folder left
    assert (sorted(os.listdir(run_dir / "export")) if (run_dir / "export").is_dir() else None) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    p = run_kdrun("export", str(run_dir), f"out={mine}")
    assert p.returncode == 2 and p.stderr.strip() == (
        f"kdrun: error: out={mine}: holds files that are no export (no export.json), which export would replace; "
        "give a new folder or an earlier export's"
    )
    assert os.listdir(mine) == ["notes.txt"]
    p = run_kdrun("export", str(run_dir), f"out={out}", "threads=1")  # an earlier export's folder: replaced
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("opset", [17, 18])
def test_an_older_runtime_gets_the_opset_it_reads(run_dir, tmp_path, opset):
    """The opset was fixed (20): an edge runtime that reads 17 could not load the export. Below 18 the dynamo
    exporter kept 18 where its conversion failed, without a word; the file's own opset is checked."""
    import onnx

    out = tmp_path / "export"
    p = run_kdrun("export", str(run_dir), f"opset={opset}", f"out={out}", "quantize=int8", "calib=32", "threads=1")
    assert p.returncode == 0, p.stderr[-2000:]
    (model,) = json.loads((out / "export.json").read_text())["models"]
    assert model["opset"] == opset and model["exporter"] == ("torchscript" if opset < 18 else "dynamo")
    for f in ("student.onnx", "student.int8.onnx"):
        declared = [o.version for o in onnx.load(str(out / f)).opset_import if o.domain in ("", "ai.onnx")]
        assert declared == [opset], (f, declared)


def test_the_epoch_a_validation_split_chose_can_be_exported(run_dir, tmp_path):
    """``models=student_best``: the weights of ``checkpoints/student_best.pt`` (the engine's file: no identity of
    its own, the stage's checkpoint gives it), not the last epoch's."""
    import shutil

    from kdrun import io
    from kdrun.export import load_model

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    last = io.load(str(copy / "checkpoints" / "student.pt"), "checkpoint")
    best = {k: -v if k.endswith("weight") and v.ndim == 2 else v for k, v in last["model"].items()}  # another model
    io.atomic_save({"stage": "student", "epoch": 1, "model": best}, str(copy / "checkpoints" / "student_best.pt"))
    p = run_kdrun("export", str(copy), "models=student,student_best", "threads=1")
    assert p.returncode == 0, p.stderr[-2000:]
    model, _ = load_model(str(copy / "checkpoints" / "student_best.pt"))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want, other = model(x).numpy(), load_model(str(copy / "checkpoints" / "student.pt"))[0](x).numpy()
    sess = onnxruntime.InferenceSession(str(copy / "export" / "student_best.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 and np.abs(got - other).max() > 1e-2


@pytest.mark.parametrize("text", ["", "{}\n", "dataset: {name: digits}\n"])
def test_a_run_config_export_cannot_use_is_one_line(run_dir, tmp_path, text):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    (copy / ".hydra" / "config.yaml").write_text(text)
    before = sorted(os.listdir(copy))
    p = run_kdrun("export", str(copy))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "config.yaml: not a kdrun run's config (no dataset." in p.stderr
    assert sorted(os.listdir(copy)) == before  # nothing written


def test_a_checkpoint_trained_on_other_classes_is_refused_before_the_test_split_is_prepared(
    run_dir, tmp_path, monkeypatch
):
    """The exported file's class names come from the data read at export time: a folder grown or renamed since
    training used to label the model's logits with classes it was not trained on."""
    import shutil

    from kdrun import export, io

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    path = str(copy / "checkpoints" / "student.pt")
    ckpt = io.load(path, "checkpoint")
    assert ckpt["classes"] == [str(i) for i in range(10)]
    prepared = []
    monkeypatch.setattr(export, "split_images", lambda *a: prepared.append(a) or pytest.fail("prepared images"))
    io.atomic_save({**ckpt, "classes": ["0", "1", "2", "three", *ckpt["classes"][4:]]}, path)
    with pytest.raises(export.ExportError) as e:
        export.run_export(export.ExportOptions(run_dir=str(copy)))
    assert str(e.value) == (
        f"export student: {path} was trained on other classes than the run's dataset (digits) now has: class 3 "
        "was 'three', now '3'; export it against the data it was trained on"
    )
    io.atomic_save({**ckpt, "identity": {**ckpt["identity"], "image_size": 16}}, path)
    with pytest.raises(export.ExportError, match="was trained with image_size=16, but the run's dataset"):
        export.run_export(export.ExportOptions(run_dir=str(copy)))
    assert not prepared and not (copy / "export").exists()


def test_only_the_test_split_and_the_calibration_images_are_decoded(run_dir, tmp_path, monkeypatch):
    """The whole training split used to be decoded into float32 even with no int8 model to calibrate (for a
    streamed dataset, a training set too big for memory); int8 takes only its calibration images. A checkpoint
    written before classes were stored exports as before."""
    import shutil

    from kdrun import export, io

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    path = str(copy / "checkpoints" / "student.pt")
    io.atomic_save({k: v for k, v in io.load(path, "checkpoint").items() if k != "classes"}, path)
    sizes, real = [], export.split_images
    monkeypatch.setattr(export, "split_images", lambda cfg, split, c: sizes.append(len(split)) or real(cfg, split, c))
    doc = export.run_export(export.ExportOptions(run_dir=str(copy), threads=1))
    assert sizes == [doc["test_images"]] == [359]  # the digits test split
    sizes.clear()
    export.run_export(export.ExportOptions(run_dir=str(copy), threads=1, quantize="int8", calib=64))
    assert sizes == [359, 64]


def test_the_table_says_when_its_timing_was_disturbed(run_dir, exported):
    """A median call over BUSY_SPREAD times the fastest (other work on the cores): the table's last line says so,
    as the training summary does; a quiet timing says nothing."""
    from kdrun.export import export_table
    from kdrun.models.report import BUSY_SPREAD

    doc = json.loads((run_dir / "export" / "export.json").read_text())
    for m in doc["models"]:
        for table in (m["latency_ms"], m["eager_latency_ms"], m["int8"]["latency_ms"]):
            table.update({k: table[f"{k}_best"] * 1.5 for k in ("b1", "b32")})
    assert "busy cores" not in export_table(doc)
    doc["models"][1]["int8"]["latency_ms"]["b32"] = doc["models"][1]["int8"]["latency_ms"]["b32_best"] * 7
    tail = export_table(doc).splitlines()[-1]
    assert tail.endswith("; timed on busy cores: medians up to 7.0x the best: compare the best calls")
    assert BUSY_SPREAD < 7


def test_the_table_names_the_thread_count_of_each_runtime(run_dir, exported):
    """Without threads=, onnxruntime runs at its own default, not at PyTorch's count: the footer says so."""
    from kdrun.export import export_table

    doc = json.loads((run_dir / "export" / "export.json").read_text())
    doc["threads"] |= {"torch": 2, "onnxruntime": "default", "cpu_count": 2}
    assert "ms per batch, eager 2 thread(s), onnxruntime its default (one per physical core) of 2 CPU cores" in (
        export_table(doc)
    )
    doc["threads"]["onnxruntime"] = 2
    assert "ms per batch, 2 thread(s) of 2 CPU cores" in export_table(doc)


def test_a_missing_export_package_is_one_line_naming_the_extra(run_dir, kdrun_here, monkeypatch):
    """Without onnx (kdrun installed without its export extra), `kdrun export` used to end in torch's traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    p = kdrun_here("export", str(run_dir))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (
        "kdrun: error: format=onnx: needs onnx, not installed here; pip install 'kdrun[export]' (from a checkout: "
        "pip install -e '.[export]'), or format=torchscript"
    )


def test_a_training_state_or_a_best_file_without_its_model_says_what_to_load(run_dir, tmp_path):
    import shutil

    from kdrun.export import ExportError, load_model

    with pytest.raises(ExportError, match=r"student_last.pt: a stage's training state .* load .*student.pt"):
        load_model(str(run_dir / "checkpoints" / "student_last.pt"))
    shutil.copy(run_dir / "checkpoints" / "student.pt", tmp_path / "student_best.pt")  # a best file's format
    best = tmp_path / "student_best.pt"
    from kdrun import io

    ckpt = io.load(str(best), "checkpoint")
    io.atomic_save({"model": ckpt["model"]}, str(best))  # the weights alone, as a stage writes its best epoch
    with pytest.raises(ExportError, match=r"take their model and classes from student.pt beside it, which is not"):
        load_model(str(best))


def test_an_unfinished_run_says_so_and_how_it_goes_on(tmp_path):
    from kdrun.export import ExportError, ExportOptions, check_run

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "teacher.pt").write_bytes(b"")
    (tmp_path / "FAILED").write_text("student: stopped by SIGINT at epoch 5, step 2; rerun the same command\n")
    with pytest.raises(ExportError, match=r"no checkpoint for student in this run; valid: teacher \(the run did not "):
        check_run(ExportOptions(str(tmp_path)))
    with pytest.raises(ExportError, match=rf"stopped by SIGINT at epoch 5, step 2; .*; kdrun train resume={tmp_path}"):
        check_run(ExportOptions(str(tmp_path)))
    assert list(check_run(ExportOptions(str(tmp_path), models=["teacher"]))) == ["teacher"]


def test_an_image_folder_run_exports_from_anywhere_and_from_where_its_images_moved(tmp_path):
    """A relative dataset.root is the folder the run was launched from's (export read it against its own working
    folder), and dataset.root= gives export the images where they are now."""
    from tests.test_data import make_folder

    make_folder(tmp_path / "imgs", per_split={"train": 6, "test": 3}, size=8)
    data = ["dataset=imagefolder", "dataset.root=imgs", "dataset.image_size=8", "dataset.num_classes=3"]
    p = run_kdrun("train", *SMOKE, *data, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "data: classes by index: 0 ant, 1 bee, 2 cat\n" in p.stderr  # what student_exclude=[1] leaves out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"]["classes"] == ["ant", "bee", "cat"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = run_kdrun("export", str(tmp_path / "run"), "threads=1", cwd=elsewhere)
    assert p.returncode == 0, p.stderr[-2000:]
    (tmp_path / "imgs").rename(tmp_path / "moved")
    p = run_kdrun("export", str(tmp_path / "run"), "threads=1", cwd=elsewhere)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert f"dataset.root={tmp_path / 'imgs'}: no such folder" in p.stderr and "give dataset.root=DIR" in p.stderr
    p = run_kdrun("export", str(tmp_path / "run"), "threads=1", f"dataset.root={tmp_path / 'moved'}", cwd=elsewhere)
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_kdrun("export", str(tmp_path / "run"), f"dataset.root={tmp_path / 'nowhere'}", cwd=elsewhere)
    assert p.returncode == 2 and f"dataset.root={tmp_path / 'nowhere'}: no such folder" in p.stderr


def test_a_stop_while_the_new_export_is_put_in_place_lets_it_finish(tmp_path, monkeypatch):
    """Between its two renames there is no export at all: a SIGTERM there left none (the earlier one renamed aside,
    the new one in the temporary folder the stop removed)."""
    import signal

    from kdrun import export

    new, dest = tmp_path / "work" / "export", tmp_path / "export"
    new.mkdir(parents=True)
    dest.mkdir()
    (new / "export.json").write_text("new")
    (dest / "export.json").write_text("old")
    real = os.replace

    def replace_then_stop(a, b):
        real(a, b)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace_then_stop)
    with export._stopped_by_signals():
        export._replace_dir(str(new), str(dest))
    assert (dest / "export.json").read_text() == "new"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["export", "work"]  # the earlier export removed


def test_an_export_stopped_by_sigterm_leaves_nothing_and_says_so(run_dir, exported):
    """SIGTERM killed an export where it stood, leaving .export-tmp-* (fp32 and int8 files) in the run folder."""
    import signal
    import subprocess
    import time

    from tests.conftest import KDRUN

    before = sorted(os.listdir(run_dir / "export"))
    p = subprocess.Popen(
        [*KDRUN, "export", str(run_dir), "quantize=int8", "models=student,teacher", "threads=1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(run_dir.glob(".export-tmp-*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the export ended before its temporary folder was seen"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "kdrun: error: export: stopped by SIGTERM; nothing written, the earlier export kept"
    )
    assert not list(run_dir.glob(".export-tmp-*")) and sorted(os.listdir(run_dir / "export")) == before
