"""Pretrained teachers by name (teacher.weights): torchvision weights and timm tags, offline.

The weights files are placed where the libraries look first (torch's hub cache under $TORCH_HOME,
the Hugging Face hub cache under $HF_HOME), so nothing is downloaded.
"""

import logging
import os
import re

import pytest
import torch
import torchvision.models as tv
from omegaconf import OmegaConf

from kdrun.errors import ConfigError
from kdrun.io import sha256_file
from kdrun.models import build_model, torchvision_models
from tests.conftest import run_kdrun

timm = pytest.importorskip("timm")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A hub cache holding torchvision's MobileNetV3-Small IMAGENET1K_V1 file (seeded random weights). Its
    SHA-256 cannot begin with the prefix in torchvision's file name, so kdrun's hash is made to give that prefix
    for this file's exact bytes, and only for them: a file changed afterwards has its real digest."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = tv.MobileNet_V3_Small_Weights.IMAGENET1K_V1.url
    path = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    torch.manual_seed(123)
    state = tv.mobilenet_v3_small().state_dict()
    torch.save(state, path)
    real, genuine = sha256_file, sha256_file(str(path))
    prefix = torch.hub.HASH_REGEX.search(path.name).group(1)
    monkeypatch.setattr(torchvision_models, "sha256_file", lambda p: prefix if real(p) == genuine else real(p))
    return tmp_path / "torch", state


def hub_file(home) -> str:
    return str(home / "hub" / "checkpoints" / os.path.basename(tv.MobileNet_V3_Small_Weights.IMAGENET1K_V1.url))


@pytest.mark.parametrize("damage", ["other weights", "truncated"])
def test_a_hub_file_that_is_not_torchvision_s_is_one_line(torch_home, damage):
    """torch.hub checks the hash of what it downloads, never of a file already in its cache: kdrun does, so a
    wrong or damaged file is refused instead of training a teacher from whichever tensors happened to fit."""
    home, _ = torch_home
    path = hub_file(home)
    if damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        torch.manual_seed(5)
        torch.save(tv.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(
        ConfigError,
        match=r"weights=IMAGENET1K_V1: .*mobilenet_v3_small-\w+\.pth is not torchvision's file "
        r"\(its SHA-256 begins \w+, its name says \w+: damaged or another file\); remove it and place",
    ):
        build_model("mbv3_small", 10, 3, 224, weights="IMAGENET1K_V1")


def test_default_weights_are_keyed_by_the_weights_they_stand_for(tmp_path):
    """The teacher's store key names the weights DEFAULT resolves to, so another torchvision version's DEFAULT
    cannot reuse a teacher fine-tuned from other weights, and DEFAULT and its own name share one teacher."""
    from kdrun import train
    from kdrun.cli import compose
    from kdrun.store import key_of

    def key(weights):
        cfg = compose(["store.enabled=false", "teacher=mbv3_small", f"teacher.weights={weights}"])
        return key_of(train.Run(cfg, str(tmp_path)).teachers.recipe())

    assert tv.MobileNet_V3_Small_Weights.DEFAULT.name == "IMAGENET1K_V1"
    assert key("DEFAULT") == key("IMAGENET1K_V1")
    assert (
        train.Run(compose(["teacher=mbv3_small", "teacher.weights=DEFAULT"]), str(tmp_path)).teachers.recipe()[
            "weights"
        ]
        == "IMAGENET1K_V1"
    )


def test_torchvision_weights_load_every_fitting_tensor_and_a_new_classifier(torch_home):
    _, state = torch_home
    model = build_model("mbv3_small", 10, 3, 224, weights="IMAGENET1K_V1")  # ImageNet-sized: the stem fits
    own = model.state_dict()
    assert own["classifier.3.weight"].shape == (
        10,
        1024,
    )  # new classifier for the dataset's classes
    fitted = [k for k in own if k in state and own[k].shape == state[k].shape]
    assert len(fitted) == len(own) - 2  # all but the new classifier's weight and bias
    for k in fitted:
        assert torch.equal(own[k], state[k]), k
    scratch = build_model("mbv3_small", 10, 3, 224)
    assert scratch.state_dict().keys() == own.keys()  # the same architecture as without weights


def test_one_channel_stem_is_the_sum_over_rgb_and_small_input_stem_is_new(torch_home):
    _, state = torch_home
    gray = build_model("mbv3_small", 10, 1, 224, weights="DEFAULT")
    assert torch.allclose(
        gray.state_dict()["features.0.0.weight"],
        state["features.0.0.weight"].sum(1, keepdim=True),
    )
    small = build_model("mbv3_small", 10, 1, 8, weights="IMAGENET1K_V1")  # 3x3 stride-1 stem: no pretrained kernel
    assert small.state_dict()["features.0.0.weight"].shape[-1] == 3
    assert torch.equal(
        small.state_dict()["features.1.block.0.0.weight"],
        state["features.1.block.0.0.weight"],
    )


def test_teacher_stage_fine_tunes_from_the_weights(torch_home, tmp_path, caplog):
    """In this process, where the fixture's file passes kdrun's hash check."""
    from kdrun import train
    from kdrun.cli import compose

    home, state = torch_home
    run_dir = tmp_path / "run"
    overrides = ["trainer=smoke", "teacher=mbv3_small", "teacher.weights=IMAGENET1K_V1", "student=resnet8"]
    cfg = compose([*overrides, "baseline=false", "store.enabled=false", "trainer.threads=1"])
    with caplog.at_level(logging.INFO, logger="kdrun"):
        train.run(cfg, str(run_dir))
    assert "mbv3_small: pretrained IMAGENET1K_V1 loaded" in caplog.text
    teacher = torch.load(run_dir / "checkpoints" / "teacher.pt", map_location="cpu", weights_only=True)["model"]
    moved = teacher["features.1.block.0.0.weight"] - state["features.1.block.0.0.weight"]
    assert 0 < moved.abs().max() < 1  # started from the weights, then trained one epoch


def test_a_stored_teacher_is_reused_without_its_starting_weights(torch_home, tmp_path, monkeypatch, caplog):
    """An offline machine with the teacher in its store needed the hub file again (and an online one downloaded
    it), only to overwrite it with the stored teacher; the store gone, the teacher is trained from them again."""
    import shutil

    from kdrun import train
    from kdrun.cli import compose

    home, _ = torch_home
    overrides = ["trainer=smoke", "teacher=mbv3_small", "teacher.weights=IMAGENET1K_V1", "student=resnet8"]
    cfg = compose([*overrides, "baseline=false", f"store.dir={tmp_path / 'store'}", "trainer.threads=1"])
    first = train.run(cfg, str(tmp_path / "r1"))
    os.rename(hub_file(home), hub_file(home) + ".away")  # offline, the file not in the cache
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable"))
    )
    again = train.run(cfg, str(tmp_path / "r2"))
    assert again["stages"]["teacher"]["source"] == "store"
    assert again["test"]["teacher"] == first["test"]["teacher"]
    os.rename(hub_file(home) + ".away", hub_file(home))
    # that run again without the store trains its teacher stage, from the weights (not from a random start)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdrun"):
        train.run(OmegaConf.merge(cfg, {"store": {"enabled": False}}), str(tmp_path / "r2"))
    assert "mbv3_small: pretrained IMAGENET1K_V1 loaded" in caplog.text
    os.rename(hub_file(home), hub_file(home) + ".away")
    shutil.rmtree(tmp_path / "store")  # now it must be trained, from the weights: refused without them
    with pytest.raises(ConfigError, match=r"weights=IMAGENET1K_V1: mobilenet_v3_small-\w+\.pth is not in the hub"):
        train.run(cfg, str(tmp_path / "r3"))


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["teacher=resnet18", "teacher.weights=NOPE"],
            "teacher.weights=NOPE: not a torchvision weights name of resnet18; valid: IMAGENET1K_V1, DEFAULT",
        ),
        (
            ["teacher=resnet20", "teacher.weights=IMAGENET1K_V1"],
            "teacher.weights=IMAGENET1K_V1: model resnet20 has no pretrained weights; models with weights: mbv2,",
        ),
        (
            [
                "teacher.source=timm",
                "teacher.name=test_resnet",
                "teacher.weights=nope_in1k",
            ],
            "teacher.weights=nope_in1k: no such pretrained tag for timm model test_resnet; valid: r160_in1k",
        ),
    ],
)
def test_unknown_weights_exit_2_before_anything_is_written(args, message, tmp_path):
    p = run_kdrun("train", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 2
    assert p.stderr.strip() == f"kdrun: error: {message}" or message in p.stderr.strip()
    assert p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "run").exists()


def test_a_hub_file_is_read_as_tensors_alone(torch_home, tmp_path, monkeypatch):
    """A file in the hub cache whose name passes the hash check (a 32-bit prefix collides) ran the code it pickled:
    torch.hub unpickles with weights_only=False unless told otherwise."""
    home, _ = torch_home
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = hub_file(home)
    torch.save({"conv": Evil()}, path)
    prefix = torch.hub.HASH_REGEX.search(os.path.basename(path)).group(1)
    monkeypatch.setattr(torchvision_models, "sha256_file", lambda p: prefix)
    with pytest.raises(ConfigError, match=r"weights=IMAGENET1K_V1: .* is not torchvision's file \(UnpicklingError"):
        build_model("mbv3_small", 10, 3, 224, weights="IMAGENET1K_V1")
    assert not marker.exists()


def test_weights_not_in_cache_and_no_network_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(
        torch.hub,
        "download_url_to_file",
        lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable")),
    )
    with pytest.raises(
        ConfigError,
        match=r"weights=IMAGENET1K_V1: mobilenet_v3_small-\w+\.pth is not in the hub "
        r"cache and cannot be downloaded \(OSError\); place it at .*empty",
    ):
        build_model("mbv3_small", 10, 3, 32, key="teacher.name", weights="IMAGENET1K_V1")
    assert capsys.readouterr().out == ""  # torch.hub's "Downloading: ..." line, written to stdout, is not the error


@pytest.mark.parametrize("kept", [False, True], ids=["hash refused, removed", "kept, unreadable"])
def test_a_download_that_is_not_torchvision_s_file_is_one_line(tmp_path, monkeypatch, kept):
    """torch.hub removes a download whose SHA-256 is not the one its name promises: the message must not ask the
    user to remove a file that is not there. A download kept but unreadable is named, to be removed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))

    def download(url, dst, *a, **k):
        if kept:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "wb").write(b"<html>a proxy's error page</html>")
            return
        raise RuntimeError(f'invalid hash value (expected "ab12", got "{"0" * 64}")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    path = hub_file(tmp_path / "home")
    if kept:
        want = rf"weights=IMAGENET1K_V1: {re.escape(path)} is not torchvision's file \(\w+: .*\); remove it and place"
    else:
        want = (
            r"weights=IMAGENET1K_V1: the file downloaded from https://\S+ is not torchvision's \(RuntimeError: "
            rf"invalid hash value .*\); nothing was kept: retry, or place the file at {re.escape(path)}$"
        )
    with pytest.raises(ConfigError, match=want):
        build_model("mbv3_small", 10, 3, 32, key="teacher.name", weights="IMAGENET1K_V1")
    assert os.path.exists(path) == kept


def offline_cache(monkeypatch, home):
    """$HF_HOME=home, HF_HUB_OFFLINE=1 (also in huggingface_hub's constants, read when it was imported)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding timm/test_resnet.r160_in1k (seeded random weights), read offline."""
    from safetensors.torch import save_file

    offline_cache(monkeypatch, tmp_path / "hf")
    repo = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet", pretrained=False).state_dict().items()}
    save_file(state, str(snap / "model.safetensors"))
    return state


def test_timm_pretrained_tag_loads_from_the_hub_cache_with_a_new_classifier(hf_home):
    model = build_model("test_resnet", 10, 3, 32, key="teacher.name", source="timm", weights="r160_in1k")
    own = model.state_dict()
    assert own["fc.weight"].shape[0] == 10
    same = [k for k in own if not k.startswith("fc.")]
    assert same and all(torch.equal(own[k], hf_home[k]) for k in same)
    gray = build_model("test_resnet", 10, 1, 32, key="teacher.name", source="timm", weights="r160_in1k")
    stem = next(k for k in gray.state_dict() if k.endswith("weight") and gray.state_dict()[k].dim() == 4)
    assert gray.state_dict()[stem].shape[1] == 1  # timm adapts the stem to one channel


def test_a_damaged_timm_file_in_the_cache_is_one_line(hf_home, tmp_path):
    (weights,) = (tmp_path / "hf" / "hub").rglob("model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        ConfigError,
        match=r"teacher.weights=r160_in1k: timm could not load test_resnet.r160_in1k "
        r"from the Hugging Face hub \(timm/test_resnet.r160_in1k, model.safetensors; SafetensorError: .*\); run once "
        r"online to fill the hub cache \(\$HF_HOME\), then HF_HUB_OFFLINE=1 reads it there \(remove a damaged",
    ):
        build_model("test_resnet", 10, 3, 32, key="teacher.name", source="timm", weights="r160_in1k")


def test_timm_tag_missing_from_an_offline_cache_is_one_line(tmp_path, monkeypatch):
    offline_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(
        ConfigError,
        match=r"teacher.weights=r160_in1k: timm could not load test_resnet.r160_in1k from the Hugging Face hub "
        r"\(timm/test_resnet.r160_in1k, model.safetensors; .*\); run once online .* or give "
        r"teacher.kwargs.pretrained_cfg_overlay=\{file: PATH\}$",
    ):
        build_model(
            "test_resnet",
            10,
            3,
            32,
            key="teacher.name",
            source="timm",
            weights="r160_in1k",
        )


def test_pretrained_weights_with_a_new_classifier_are_not_distilled_untrained(torch_home, tmp_path):
    """trainer.teacher_epochs=0 would distil from the classifier made for 10 classes, never trained: refused."""
    from kdrun import train
    from kdrun.cli import compose

    overrides = ["trainer=smoke", "teacher=mbv3_small", "teacher.weights=IMAGENET1K_V1", "student=resnet8"]
    cfg = compose([*overrides, "trainer.teacher_epochs=0", "baseline=false", "store.enabled=false"])
    with pytest.raises(ConfigError) as e:
        train.run(cfg, str(tmp_path / "run"))
    assert str(e.value) == (
        "teacher.weights=IMAGENET1K_V1: classifier.3.weight, classifier.3.bias not in the weights (another class "
        "count or input), so trainer.teacher_epochs=0 would distil from an untrained classifier; give "
        "trainer.teacher_epochs > 0 to fine-tune it"
    )
    assert not (tmp_path / "run" / "checkpoints" / "teacher.pt").exists()


def test_timm_weights_with_a_new_classifier_are_marked(hf_home):
    model = build_model("test_resnet", 10, 3, 32, key="teacher.name", source="timm", weights="r160_in1k")
    assert model.new_parameters == ["the classifier (1000 classes in the weights)"]
    assert not hasattr(build_model("test_resnet", 10, 3, 32, key="teacher.name", source="timm"), "new_parameters")


def test_timm_weights_from_a_local_file_are_keyed_by_its_contents(tmp_path):
    """pretrained_cfg_overlay={file: PATH}: another file copied to the same path is another teacher in the store."""
    from kdrun.cli import compose
    from kdrun.run_data import RunData
    from kdrun.stages import StageRunner
    from kdrun.store import StoreRefs, key_of
    from kdrun.teachers import TeacherSource

    weights = tmp_path / "w.pth"
    overlay = f"+teacher.kwargs.pretrained_cfg_overlay={{file:{weights}}}"
    cfg = compose(["trainer=smoke", "teacher.source=timm", "teacher.name=test_resnet", overlay])
    data = RunData(cfg, torch.device("cpu"))
    stages = StageRunner(cfg, data, str(tmp_path / "run"), ("x", "x"))
    source = TeacherSource(cfg, stages, None, StoreRefs(None, str(tmp_path)))
    keys = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(timm.create_model("test_resnet").state_dict(), weights)
        keys.append(key_of(source.recipe()))
    assert keys[0] != keys[1]


def test_a_kept_imagenet_classifier_needs_synset_class_names():
    """A 1000-class data set whose classes are not ImageNet's kept the weights' classifier without a word."""
    from kdrun.teachers import _synsets

    assert _synsets([f"n{i:08d}" for i in range(1000)])
    assert not _synsets([f"flower_{i:04d}" for i in range(1000)])
