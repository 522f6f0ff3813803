"""Model zoo: every model builds, trains a step and exposes its feature points; published sizes; `kdrun models`."""

from __future__ import annotations

import builtins
import re

import pytest
import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import MODELS, FeatureTap, build_model, report
from kdrun.models.published import PUBLISHED_PARAMS_M  # (millions at 100 classes, 32x32x3)
from kdrun.models.report import count_params, feature_shapes
from kdrun.models_cli import models_main
from tests.conftest import run_kdrun

# smallest sensible input for every model: the digits default (1 channel, 8x8, 10 classes)
IN_CHANS, IMG, CLASSES = 1, 8, 10

CIFAR_FAMILY = [
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "resnet50_cifar",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "mbv2_cifar",
    "shufflenet_v1",
    "shufflenet_v2_cifar",
]
TORCHVISION = ["resnet18", "resnet34", "resnet50", "mbv2", "mbv3_small", "mbv3_large", "shufflenet_v2"]


def test_zoo_has_every_required_model():
    missing = set(CIFAR_FAMILY + TORCHVISION + ["mbv2_tiny", "mlp"]) - set(MODELS.names())
    assert not missing


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_backward_and_feature_points(name):
    torch.manual_seed(0)
    model = build_model(name, CLASSES, IN_CHANS, IMG)
    x = torch.randn(2, IN_CHANS, IMG, IMG)
    names = list(model.feature_points)
    assert "pre_logits" in names and "logits" in names
    with FeatureTap(model, [n for n in names if n != "logits"]) as tap:
        logits = model(x)
    assert logits.shape == (2, CLASSES)
    logits.logsumexp(1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters outside the forward pass: {no_grad[:3]}"
    reported = feature_shapes(model, (IN_CHANS, IMG, IMG))
    captured = dict(tap.features, logits=logits)
    assert set(reported) == set(names)
    for point, shape in reported.items():
        assert shape[0] == 1 and list(captured[point].shape[1:]) == shape[1:], point
        assert all(d >= 1 for d in shape)
    assert reported["pre_logits"] == [1, reported["pre_logits"][1]]


PREACT_BEFORE_RELU = ["resnet20", "vgg8", "vgg13", "resnet50_cifar", "shufflenet_v1", "shufflenet_v2_cifar"]
LINEAR_STAGES = ["mbv2_cifar", "mbv2_tiny", "mbv2", "mbv3_small"]


@pytest.mark.parametrize("name", PREACT_BEFORE_RELU + LINEAR_STAGES)
def test_pre_activation_points_are_the_stage_outputs_before_their_relu(name):
    """AB, OFD and ReviewKD match features before the ReLU, as RepDistiller's ``preact=True`` gives them: each
    ``stageN_preact`` is ``stageN`` before its last ReLU (a MobileNet's stages end linear: the same map), and the
    BatchNorm a model declares for it (OFD's margins) has its channels."""
    torch.manual_seed(0)
    model = build_model(name, CLASSES, 3, 32).eval()
    pre = [p for p in model.feature_points if p.endswith("_preact")]
    assert len(pre) >= 3
    with FeatureTap(model, pre + [p.removesuffix("_preact") for p in pre]) as tap, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    modules = dict(model.named_modules())
    for p in pre:
        before, after = tap.features[p], tap.features[p.removesuffix("_preact")]
        assert (before < 0).any(), p
        assert torch.equal(before if name in LINEAR_STAGES else before.relu(), after), p
        if p in getattr(model, "preact_bn", {}):
            assert modules[model.preact_bn[p]].num_features == before.shape[1], p


@pytest.mark.parametrize("name", ["mbv3_small", "mbv2", "mlp"])
def test_pre_logits_is_read_before_the_classifiers_dropout(name):
    """A student's penultimate feature is not randomly zeroed in training (the frozen teacher's never is)."""
    model = build_model(name, CLASSES, IN_CHANS, IMG).train()
    x = torch.randn(4, IN_CHANS, IMG, IMG)
    with FeatureTap(model, ["pre_logits"]) as tap:
        model(x)
        first = tap.features["pre_logits"].detach().clone()
        model(x)
    assert torch.equal(first, tap.features["pre_logits"])


def test_flops_count_attention():
    """The counter has no formula for the fused CPU attention kernels: they run in math form while counted."""
    import torch.nn.functional as F

    class Attention(nn.Module):
        def forward(self, x):  # x [B, 8, 4, 4] -> queries [B, 2 heads, 16 tokens, 4]
            q = x.flatten(2).transpose(1, 2).reshape(x.shape[0], 16, 2, 4).transpose(1, 2).contiguous()
            return F.scaled_dot_product_attention(q, q, q).mean((1, 2))[:, :2]

    assert report.count_flops(Attention(), (8, 4, 4)) == 4 * 2 * 16 * 16 * 4  # QK^T and AV: 2 x 2 x H L^2 d


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "mbv2_tiny", "resnet18", "mlp"])
def test_unknown_feature_name_lists_valid_names(name):
    model = build_model(name, CLASSES, IN_CHANS, IMG)
    with pytest.raises(ConfigError) as err:
        FeatureTap(model, ["stage9"])
    msg = str(err.value)
    assert "stage9" in msg and "\n" not in msg
    assert all(point in msg for point in model.feature_points)


def test_a_feature_changed_in_place_after_its_capture_is_refused():
    """torchvision's BasicBlock adds the shortcut to bn2's output and applies an in-place ReLU: read afterwards,
    'layer1.0.bn2' would be the block's output. The block itself is read as it is."""
    from kdrun.errors import ConfigError

    model = build_model("resnet18", 10, 3, 32).eval()
    with FeatureTap(model, ["layer1.0.bn2", "layer1.0"]) as tap, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert tap.features["layer1.0"].min() >= 0
    with pytest.raises(ConfigError, match=r"feature layer 'layer1.0.bn2': an in-place operation later in the forward"):
        tap.features["layer1.0.bn2"]


def test_features_read_inside_a_compiled_forward_are_not_taken_for_changed_ones():
    """trainer.compile=true: the graph's version counters are not the returned tensors', so the in-place check
    stands aside there (it refused every feature point of mbv3_small)."""

    class Step(torch.nn.Module):  # reads its features inside the compiled forward, as kdrun's StudentStep does
        def __init__(self, model, names):
            super().__init__()
            self.student, self.names, self.tap = model, names, FeatureTap(model, names)

        def forward(self, x):
            return self.student(x).sum() + sum(self.tap.features[n].float().mean() for n in self.names)

    model = build_model("mbv3_small", 10, 3, 32).train()
    step = Step(model, ["stem", "stage2", "pre_logits"])
    with step.tap:
        out = torch.compile(step, backend="aot_eager")(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out)


def test_taps_attached_after_the_sync_bn_conversion_fire_and_a_second_conversion_keeps_them():
    """Under trainer.sync_bn the run converts the student before its taps attach (a converted BatchNorm is a new
    module: hooks on the old one would never fire); the conversion in the DDP wrapper then keeps it."""
    from kdrun.distributed import to_sync_bn

    model = to_sync_bn(build_model("resnet8", 10, 1, 8).eval())
    bn = model.bn1  # the feature point "stem"
    assert isinstance(bn, torch.nn.SyncBatchNorm)
    with FeatureTap(model, ["stem"]) as tap:
        assert to_sync_bn(model).bn1 is bn
        model(torch.randn(2, 1, 8, 8))
    assert tap.features["stem"].shape[1] == bn.num_features


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_published_param_counts(name):
    params_m = count_params(build_model(name, 100, 3, 32)) / 1e6
    assert params_m == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.02)


def test_resnet9_is_pages_network_and_scales_with_width():
    # Page's DAWNBench ResNet-9: 6.57M parameters at 10 classes; width 32 (experiment=cifar10_cpu's teacher): 1.65M
    assert count_params(build_model("resnet9", 10, 3, 32)) / 1e6 == pytest.approx(6.57, abs=0.01)
    half = build_model("resnet9", 10, 3, 32, width=32)
    assert count_params(half) / 1e6 == pytest.approx(1.65, abs=0.01)
    assert feature_shapes(half, (3, 32, 32))["stage3"] == [1, 256, 4, 4]
    with pytest.raises(ConfigError, match=r"kwargs.width=0: must be a positive channel count"):
        build_model("resnet9", 10, 3, 32, width=0)


def test_cifar_family_sizes_are_consistent():
    params = {
        n: count_params(build_model(n, 100, 3, 32))
        for n in ("resnet8", "resnet14", "resnet32", "resnet44", "wrn_16_1", "vgg11", "vgg16", "vgg19")
    }
    assert params["resnet8"] < params["resnet14"] < params["resnet32"] < params["resnet44"]
    assert params["vgg11"] < params["vgg16"] < params["vgg19"]
    assert params["wrn_16_1"] / 1e6 == pytest.approx(0.18, abs=0.01)


def test_mbv2_tiny_is_about_17k_on_digits():
    assert 15_000 <= count_params(build_model("mbv2_tiny", 10, 1, 8)) <= 19_000


def test_mbv2_cifar_width_and_head():
    assert count_params(build_model("mbv2_cifar", 10, 3, 32)) == count_params(
        build_model("mbv2_cifar", 10, 3, 32, width=0.5, head=1280)
    )  # the defaults are RepDistiller's mobile_half
    narrow = build_model("mbv2_cifar", 10, 3, 32, width=0.25, head=512)
    assert count_params(narrow) == 180_938 and narrow.fc.in_features == 512
    assert min(m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)) == 8  # rows keep >= 8 channels
    with pytest.raises(ConfigError, match=r"^student\.kwargs\.width=0: must be in \(0, 4\]$"):
        build_model("mbv2_cifar", 10, 3, 32, key="student.name", width=0)


@pytest.mark.parametrize("img_size, small, final", [(8, True, 2), (32, True, 4), (224, False, 7)])
def test_torchvision_small_input_stem(img_size, small, final):
    model = build_model("resnet18", 10, 3, img_size)
    assert (model.conv1.kernel_size, model.conv1.stride) == (((3, 3), (1, 1)) if small else ((7, 7), (2, 2)))
    assert isinstance(model.maxpool, nn.Identity) == small
    assert feature_shapes(model, (3, img_size, img_size), ["stage4"])["stage4"][2] == final


def test_small_input_override_and_bad_value():
    forced = build_model("mbv3_small", 10, 1, 32, small_input=False)
    assert forced.features[0][0].stride == (2, 2)
    with pytest.raises(ConfigError, match=r"^student\.kwargs\.small_input=yes: .*valid: true, false, null"):
        build_model("mbv2", 10, 1, 32, key="student.name", small_input="yes")


def test_unknown_kwarg_lists_valid_options():
    with pytest.raises(ConfigError, match=r"^teacher\.kwargs\.depth: not an option of model wrn_16_2; valid: drop$"):
        build_model("wrn_16_2", 10, 1, 8, key="teacher.name", depth=3)


def test_mlp_options():
    model = build_model("mlp", 10, 1, 8, hidden=[32, 16, 8], dropout=0.5, input_dropout=0.2, activation="tanh")
    assert [layer.fc.out_features for layer in model.layers] == [32, 16, 8]
    assert isinstance(model.layers[0].act, nn.Tanh) and model.layers[0].drop.p == 0.5 and model.input_drop.p == 0.2
    assert feature_shapes(model, (1, 8, 8)) == {
        "hidden1": [1, 32],
        "hidden2": [1, 16],
        "hidden3": [1, 8],
        "pre_logits": [1, 8],
        "logits": [1, 10],
    }
    default = build_model("mlp", 10, 1, 8)
    assert [layer.fc.out_features for layer in default.layers] == [1200, 1200]
    assert isinstance(default.layers[0].act, nn.ReLU)


def test_mlp_unknown_activation():
    with pytest.raises(ConfigError) as err:
        build_model("mlp", 10, 1, 8, key="student.name", activation="swish")
    assert str(err.value) == "student.kwargs.activation=swish: unknown activation; valid: relu, gelu, tanh, sigmoid"


def test_mlp_max_norm_constraint():
    model = build_model("mlp", 10, 1, 8, hidden=[16], max_norm=0.5)
    with torch.no_grad():
        model.layers[0].fc.weight.mul_(100)
        model.layers[0].fc.weight[0].zero_()
    model.apply_constraints()
    norms = model.layers[0].fc.weight.norm(dim=1)
    assert norms.max() <= 0.5 + 1e-5 and norms[1:].min() >= 0.5 - 1e-5 and norms[0] == 0
    unconstrained = build_model("mlp", 10, 1, 8, hidden=[16])
    before = unconstrained.layers[0].fc.weight.clone() * 100
    with torch.no_grad():
        unconstrained.layers[0].fc.weight.mul_(100)
    unconstrained.apply_constraints()
    assert torch.equal(unconstrained.layers[0].fc.weight, before)


def _hide_timm(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_timm_missing(monkeypatch):
    _hide_timm(monkeypatch)
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", 10, 3, 32, key="teacher.name", source="timm")
    assert str(err.value) == "teacher.source=timm: timm is not installed (pip install timm)"


def test_unknown_source():
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", 10, 3, 32, key="student.name", source="hub")
    assert str(err.value) == "student.source=hub: unknown model source; valid: kdrun, timm"


def test_timm_passthrough():
    pytest.importorskip("timm")
    model = build_model("resnet18", 10, 1, 32, key="teacher.name", source="timm")
    shapes = feature_shapes(model, (1, 32, 32))
    assert shapes["logits"] == [1, 10] and shapes["pre_logits"] == [1, 512] and "stage4" in shapes


def test_models_main_lists_every_model(capsys):
    assert models_main([]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line.strip() and "models;" not in line}
    assert set(rows) == set(MODELS.names())
    assert rows["resnet8x4"] == "cifar_resnet" and rows["mlp"] == "mlp" and rows["mbv2"] == "torchvision_models"


def test_models_main_report(capsys, monkeypatch):
    real_latency = report.latency_ms  # one timed pass per measurement keeps the test fast
    monkeypatch.setattr(report, "latency_ms", lambda *a, **k: real_latency(*a, **k, warmup=0, min_time=0, max_iters=1))
    assert models_main(["resnet8x4", "dataset=digits"]) == 0
    out = capsys.readouterr().out
    model = build_model("resnet8x4", 10, 1, 8)
    assert "1x8x8, 10 classes (dataset digits)" in out
    assert re.search(rf"parameters\s+{count_params(model):,}\n", out)
    assert re.search(r"forward FLOPs\s+[\d,]+ per image", out) and re.search(r"size on disk\s+[\d.]+ MB", out)
    assert re.search(r"latency cpu\s+[\d.]+ ms at batch 1, [\d.]+ ms at batch 32", out)
    for point, shape in feature_shapes(model, (1, 8, 8)).items():
        assert re.search(rf"^  {point}\s+{re.escape(str(shape))}", out, re.M), point


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], r"^model=nope: unknown model; valid: .*resnet8x4"),
        (["resnet8", "colour=red"], r"^models colour=red: not an option; valid: dataset=\.\.\."),
        (["resnet8", "image_size=0"], r"^image_size=0: not a positive integer"),
        (["resnet8", "dataset=nosuch"], r"^dataset=nosuch: unknown dataset; valid: .*digits"),
    ],
)
def test_models_main_bad_args(args, message):
    with pytest.raises(ConfigError, match=message):
        models_main(args)


def test_latency_probe_matches_the_models_memory_format():
    """A channels_last model is timed on channels_last input (not on layout conversions); others on NCHW."""
    model = build_model("resnet8x4", 10, 3, 32)
    assert report._probe(model, (3, 32, 32)).is_contiguous()
    model = model.to(memory_format=torch.channels_last)
    probe = report._probe(model, (3, 32, 32), batch=2)
    assert probe.shape == (2, 3, 32, 32) and probe.is_contiguous(memory_format=torch.channels_last)
    assert not probe.is_contiguous()
    assert report._probe(build_model("mlp", 10, 1, 8), (1, 8, 8)).is_contiguous()
    # 1x1 and depthwise kernels are contiguous in both layouts: the first unambiguous weight decides
    mixed = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 3))
    assert report._probe(mixed, (3, 8, 8)).is_contiguous()
    mixed = mixed.to(memory_format=torch.channels_last)
    assert not report._probe(mixed, (3, 8, 8)).is_contiguous()


def test_latencies_alternate_between_models_and_restore_their_mode():
    """Teacher and student are timed turn by turn (load from elsewhere falls on both alike), not one after the other."""
    calls: list[str] = []
    teacher, student = nn.Linear(4, 2), nn.Linear(4, 2)
    teacher.register_forward_hook(lambda *_: calls.append("t"))
    student.register_forward_hook(lambda *_: calls.append("s"))
    student.eval()
    out = report.latencies_ms({"teacher": teacher, "student": student}, (4,), warmup=1, min_time=0, rounds=3)
    assert set(out) == {"teacher", "student"} and all(0 < t.best <= t.median for t in out.values())
    # one warm-up each, then 3 rounds of 5 timed calls each, alternating
    assert "".join(calls) == "ts" + ("t" * 5 + "s" * 5) * 3
    assert teacher.training and not student.training


def test_vgg_stages_are_repdistillers_distilled_features():
    """RepDistiller's VGG returns [f0, .., f4, pooled] and its methods distil f1-f4 (FitNet f2, SP f4): f0 (the
    first block) is kdrun's stem, so a VGG teacher's stage1-4 and a ResNet's or MobileNetV2's pair as theirs do."""
    from kdrun.losses import LOSSES

    vgg = build_model("vgg13", 100, 3, 32)
    shapes = feature_shapes(vgg, (3, 32, 32))
    assert [shapes[f"stage{i}"][1:] for i in range(1, 5)] == [[128, 16, 16], [256, 8, 8], [512, 4, 4], [512, 4, 4]]
    assert shapes["stem"][1:] == [64, 32, 32] and "stage5" not in shapes
    student = build_model("mbv2_cifar", 100, 3, 32)
    at = LOSSES.get("at")()
    teacher_layers, student_layers = at.default_layers(list(vgg.feature_points), list(student.feature_points))
    assert teacher_layers == student_layers == ["stage1", "stage2", "stage3", "stage4"]


def test_airbench_is_airbench94s_network():
    """airbench94: 24 whitening channels, blocks of 64 / 256 / 256, a bias-free classifier; only the whitening
    bias and the BN shifts train among the first layer and the norms."""
    model = build_model("airbench", 10, 3, 32)
    assert count_params(model) == 1_972_792
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen[0] == "block1.2.weight" and "whiten.weight" in frozen and len(frozen) == 7  # 6 BN scales
    with pytest.raises(ConfigError, match=r"kwargs.widths=\[64, 256\]: must be three positive channel counts"):
        build_model("airbench", 10, 3, 32, widths=[64, 256])
    with pytest.raises(ConfigError, match=r"images of 1x1: airbench needs at least 2x2"):
        build_model("airbench", 10, 1, 1)
    pools = [type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.MaxPool2d, torch.nn.Identity))]
    assert pools == ["MaxPool2d"] * 3  # 31 -> 15 -> 7 -> 3 pixels at 32x32, as airbench94
    small = build_model("airbench", 10, 1, 8)  # 7 -> 3 -> 1 pixels: the third block keeps its one pixel
    assert [type(b[1]).__name__ for b in (small.block1, small.block2, small.block3)] == ["MaxPool2d"] * 2 + ["Identity"]


def test_airbench_whitening_layer_whitens_the_images_patches():
    """init_from_data: the first half of the whitening channels, applied to the images it was set from, have
    covariance diag(lambda / (lambda + eps)) (about the identity), largest eigenvalue first; the second half is
    their negative. A patch flattened in another order than the convolution's weights would not whiten."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.randn(200, 3, 3, generator=g)
    x = torch.einsum("nchw,dc->ndhw", torch.randn(200, 3, 16, 16, generator=g), rgb[0])  # correlated channels
    x = x + 0.8 * x.roll(1, dims=3) + 0.3 * x.roll(1, dims=2)  # neighbours correlated, more across than down
    model = build_model("airbench", 10, 3, 16)
    model.init_from_data(x.split(70))  # batches of 70, 70 and 60 images: the moments of all 200
    w = model.whiten.weight
    assert torch.equal(w[12:], -w[:12])
    out = torch.nn.functional.conv2d(x, w[:12])  # without the bias
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12), atol=0.02), cov.diagonal()
    norms = w[:12].flatten(1).norm(dim=1)  # 1/sqrt(lambda + eps): the largest eigenvalue's channel is the smallest
    assert norms[0] == norms.min() and norms[-1] == norms.max()


PLUGIN = """
from torch import nn

from kdrun.losses.base import DistillLoss, register_loss
from kdrun.models.registry import register_model


class Tiny(nn.Module):
    def __init__(self, num_classes, in_chans):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        self.feature_points = {"stage1": "stage1", "pre_logits": "head.2:input"}

    def forward(self, x):
        return self.head(self.stage1(x))


@register_model("my_tiny")
def my_tiny(num_classes, in_chans=3, img_size=32):
    return Tiny(num_classes, in_chans)


@register_loss("my_mse")
class MyMSE(DistillLoss):
    def __init__(self, weight: float = 1.0, **kw):
        super().__init__(**kw)
        self.weight = weight

    def forward(self, s, t, ctx):
        return {"my_mse": self.weight * (s.logits - t.logits.detach()).pow(2).mean()}
"""


def test_a_model_and_a_method_of_the_user_s_own_come_from_plugins(tmp_path):
    """A model or method outside the package had no documented way in: kdrun said 'unknown model' (and an export
    from a fresh process, or a sweep's job in a worker, too)."""
    (tmp_path / "myplug.py").write_text(PLUGIN)
    run = tmp_path / "run"
    args = ["trainer=smoke", "teacher=resnet8", "trainer.latency=false", "store.enabled=false", "baseline=false"]
    p = run_kdrun("train", *args, "student.name=my_tiny", "loss=kd", f"hydra.run.dir={run}", cwd=tmp_path)
    assert p.returncode == 2 and "student.name=my_tiny: unknown model" in p.stderr
    p = run_kdrun(
        "train",
        *args,
        "plugins=[myplug]",
        "student.name=my_tiny",
        "~loss.temperature",
        "~loss.alpha",
        "loss.name=my_mse",
        "+loss.weight=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loss_my_mse" in (run / "metrics_student.csv").read_text().splitlines()[0]
    p = run_kdrun("export", str(run), "threads=1", cwd=tmp_path.parent)  # another folder: the run's launch folder's
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_kdrun("train", *args, "plugins=[no_such_plugin]", f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == (
        f"kdrun: error: plugins: no module 'no_such_plugin' on PYTHONPATH or in {tmp_path}"
    )
