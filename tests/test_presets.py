"""Experiment presets compose to the published recipes they cite (no data is loaded)."""

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from kdrun.config import validate

# preset -> (teacher, student, dataset, student LR)
CIFAR100 = {
    "cifar100_resnet50_mbv2": ("resnet50_cifar", "mbv2_cifar", 0.01),
    "cifar100_resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", 0.05),
    "cifar100_wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2", 0.05),
    "cifar100_resnet56_resnet20": ("resnet56", "resnet20", 0.05),
    "cifar100_resnet32x4_shufflenet_v2": ("resnet32x4", "shufflenet_v2_cifar", 0.01),
    "cifar100_vgg13_mbv2_cifar": ("vgg13", "mbv2_cifar", 0.01),
}


def compose_preset(name: str, overrides: tuple[str, ...] = ()):
    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={name}", *overrides])


def teacher_optim(cfg):
    return OmegaConf.merge(cfg.optim, cfg.teacher.get("optim") or {})


@pytest.mark.parametrize("preset", sorted(CIFAR100))
def test_cifar100_presets_match_the_repdistiller_mdistiller_recipe(preset):
    teacher, student, lr = CIFAR100[preset]
    cfg = compose_preset(preset)
    validate(cfg)
    assert cfg.teacher.name == teacher and cfg.student.name == student
    assert cfg.dataset.name == "cifar100" and cfg.dataset.num_classes == 100
    assert cfg.dataset.augment.crop_pad == 4 and cfg.dataset.augment.flip is True
    tr = cfg.trainer
    assert (tr.epochs, tr.teacher_epochs, tr.batch_size, tr.val_fraction) == (240, 240, 64, 0.0)
    assert cfg.loss.name == "kd" and cfg.loss.temperature == 4.0 and cfg.loss.alpha == 0.9
    for optim, want_lr in ((cfg.optim, lr), (teacher_optim(cfg), 0.05)):
        assert optim.name == "sgd" and optim.lr == want_lr
        assert optim.momentum == 0.9 and optim.weight_decay == 5e-4 and optim.nesterov is False
        assert optim.schedule == "step" and list(optim.milestones) == [150, 180, 210] and optim.gamma == 0.1
        assert optim.warmup_epochs == 0


# mdistiller's configs/cifar100/dkd/*.yaml: BETA 2.0 (res56_res20, res110_res32), 6.0 (vgg13_vgg8, vgg13_mv2,
# wrn40_2_wrn_16_2, wrn40_2_wrn_40_1), otherwise the default CFG.DKD.BETA = 8.0
DKD_BETA = {
    "cifar100_resnet50_mbv2": 8.0,
    "cifar100_resnet32x4_resnet8x4": 8.0,
    "cifar100_wrn40_2_wrn16_2": 6.0,
    "cifar100_resnet56_resnet20": 2.0,
    "cifar100_resnet32x4_shufflenet_v2": 8.0,
    "cifar100_vgg13_mbv2_cifar": 6.0,
}


@pytest.mark.parametrize("preset", sorted(CIFAR100))
def test_cifar100_presets_with_dkd_use_mdistillers_per_pair_beta(preset):
    from kdrun.config import loss_kwargs
    from kdrun.losses import LOSSES

    cfg = compose_preset(preset, ("loss=dkd",))
    validate(cfg)
    kw = loss_kwargs(cfg.loss)
    assert kw == {"alpha": 1.0, "beta": DKD_BETA[preset], "temperature": 4.0, "warmup": 20, "ce_weight": 1.0}
    assert LOSSES.get("dkd")(**kw).beta == DKD_BETA[preset]
    assert loss_kwargs(compose_preset(preset, ("loss=dkd", "loss.beta=3.0")).loss)["beta"] == 3.0  # the user wins


# the ReviewKD authors' CIFAR-100/script/reviewKD.sh (--kd-loss-weight) for the pairs it trains; mdistiller's
# CFG.REVIEWKD.LOSS_WEIGHT = 1.0 for the others
REVIEWKD_WEIGHT = {
    "cifar100_resnet50_mbv2": 1.0,
    "cifar100_resnet32x4_resnet8x4": 5.0,
    "cifar100_wrn40_2_wrn16_2": 5.0,
    "cifar100_resnet56_resnet20": 0.6,
    "cifar100_resnet32x4_shufflenet_v2": 8.0,
    "cifar100_vgg13_mbv2_cifar": 1.0,
}


@pytest.mark.parametrize("preset", sorted(CIFAR100))
def test_cifar100_presets_with_reviewkd_use_the_authors_per_pair_weight(preset):
    cfg = compose_preset(preset, ("loss=reviewkd",))
    validate(cfg)
    assert cfg.loss.weight == REVIEWKD_WEIGHT[preset]
    assert cfg.loss.warmup == 20 and cfg.loss.ce_weight == 1.0


@pytest.mark.parametrize("preset", sorted(CIFAR100))
def test_cifar100_presets_leave_other_methods_their_own_settings(preset):
    for loss in ("at", "crd", "dist"):
        cfg = compose_preset(preset, (f"loss={loss}",))
        validate(cfg)  # no KD-only key (temperature, alpha) leaks into another method's config
        assert cfg.loss.name == loss


def test_dkd_beta_outside_a_preset_is_the_papers_8():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        assert compose(config_name="train", overrides=["loss=dkd"]).loss.beta == 8.0


def test_cifar10_preset_is_the_resnet_paper_recipe():
    cfg = compose_preset("cifar10_resnet56_resnet20")
    validate(cfg)
    assert (cfg.teacher.name, cfg.student.name, cfg.dataset.name) == ("resnet56", "resnet20", "cifar10")
    assert (cfg.trainer.epochs, cfg.trainer.teacher_epochs, cfg.trainer.batch_size) == (164, 164, 128)
    for optim in (cfg.optim, teacher_optim(cfg)):
        assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
        assert optim.schedule == "step" and list(optim.milestones) == [82, 123] and optim.gamma == 0.1
    assert cfg.loss.temperature == 4.0 and cfg.loss.alpha == 0.9


def test_hinton_mnist_composes_with_the_papers_nets():
    cfg = compose_preset("hinton_mnist")
    validate(cfg)
    assert cfg.dataset.name == "mnist" and cfg.dataset.augment.crop_pad == 2 and cfg.dataset.augment.flip is False
    t, s = cfg.teacher, cfg.student
    assert t.name == "mlp" and list(t.kwargs.hidden) == [1200, 1200] and t.kwargs.activation == "relu"
    assert t.kwargs.input_dropout == 0.2 and t.kwargs.dropout == 0.5 and t.kwargs.max_norm > 0
    assert s.name == "mlp" and list(s.kwargs.hidden) == [800, 800]
    assert s.kwargs.dropout == 0 and s.kwargs.input_dropout == 0 and s.kwargs.max_norm is None
    assert cfg.loss.name == "kd" and cfg.loss.temperature == 20.0 and 0.5 < cfg.loss.alpha <= 1
    assert cfg.optim.weight_decay == 0 and cfg.trainer.val_fraction == 0 and cfg.cache.views == 0
    assert cfg.optim.lr == 0.03 and cfg.optim.grad_clip == 5.0  # the student's, chosen on the validation split
    to = teacher_optim(cfg)
    assert (to.name, to.lr, to.weight_decay) == ("adamw", 1.0e-3, 0) and cfg.teacher.precision == "bf16"
    assert to.grad_clip is None  # the teacher is not clipped
    assert (cfg.trainer.teacher_epochs, cfg.trainer.epochs) == (180, 60) and cfg.baseline is True
    assert cfg.dataset.root == cfg.paths.data  # no path of a particular machine: dataset.root or $KDRUN_DATA


def test_hinton_mnist_no3_leaves_the_threes_out_and_reuses_the_teacher_recipe():
    cfg, base = compose_preset("hinton_mnist_no3"), compose_preset("hinton_mnist")
    validate(cfg)
    assert list(cfg.dataset.student_exclude) == [3] and dict(cfg.evaluate.logit_bias) == {3: 3.5}
    assert cfg.teacher == base.teacher and teacher_optim(cfg) == teacher_optim(base)  # same stored teacher
    assert cfg.trainer.teacher_epochs == base.trainer.teacher_epochs and cfg.dataset.augment == base.dataset.augment


def test_hinton_mnist_builds_the_regularised_teacher_and_plain_student():
    import torch

    from kdrun.models import build_model

    cfg = compose_preset("hinton_mnist")
    teacher = build_model("mlp", 10, 1, 28, **OmegaConf.to_container(cfg.teacher.kwargs, resolve=True))
    student = build_model("mlp", 10, 1, 28, **OmegaConf.to_container(cfg.student.kwargs, resolve=True))
    assert sum(p.numel() for p in teacher.parameters()) == 784 * 1200 + 1200 * 1200 + 1200 * 10 + 1200 * 2 + 10
    assert sum(p.numel() for p in student.parameters()) == 784 * 800 + 800 * 800 + 800 * 10 + 800 * 2 + 10
    with torch.no_grad():
        teacher.layers[0].fc.weight.mul_(100.0)
    teacher.apply_constraints()
    norms = teacher.layers[0].fc.weight.norm(dim=1)
    assert norms.max() <= cfg.teacher.kwargs.max_norm * (1 + 1e-5)
    assert teacher.input_drop.p == 0.2 and student.input_drop.p == 0.0


def test_hinton_mnist_temperature_sweep_parses():
    overrides = ("student.kwargs.hidden=[30,30]", "loss.temperature=2.5")
    cfg = compose_preset("hinton_mnist", overrides)
    validate(cfg)
    assert list(cfg.student.kwargs.hidden) == [30, 30] and cfg.loss.temperature == 2.5
    assert list(cfg.teacher.kwargs.hidden) == [1200, 1200]


def test_cifar10_cpu_pairs_a_resnet_teacher_with_a_smaller_faster_mobilenet():
    from kdrun.models.registry import build_model
    from kdrun.models.report import count_flops

    cfg = compose_preset("cifar10_cpu")
    validate(cfg)
    assert (cfg.teacher.name, cfg.student.name, cfg.dataset.name) == ("resnet9", "mbv2_cifar", "imagefolder")
    assert cfg.dataset.root == f"{cfg.paths.data}/cifar10-jpg"  # no path of a particular machine
    teacher = build_model(cfg.teacher.name, 10, 3, 32, **cfg.teacher.kwargs)
    student = build_model(cfg.student.name, 10, 3, 32, **cfg.student.kwargs)
    params = [sum(p.numel() for p in m.parameters()) for m in (teacher, student)]
    flops = [count_flops(m, (3, 32, 32)) for m in (teacher, student)]
    assert params[1] * 5 < params[0] and flops[1] * 20 < flops[0]
    assert cfg.teacher.precision == "bf16" and cfg.trainer.precision == "fp32" and cfg.trainer.val_fraction == 0
    assert teacher_optim(cfg).lr == 0.1 and cfg.optim.lr == 0.05 and cfg.cache.enabled is True
    assert cfg.evaluate.flip_tta is True  # its augmentation mirrors images, so the check passes


@pytest.mark.parametrize("loss", ["dkd", "dist", "ls_kd", "fitnet", "at", "rkd", "crd"])
def test_cifar10_cpu_method_table_runs_each_method_with_its_own_settings(loss):
    """Section 3's method table: the preset's KD settings (T = 4, alpha = 0.9) must not leak into other methods."""
    cfg = compose_preset("cifar10_cpu", (f"loss={loss}",))
    validate(cfg)
    assert cfg.loss.name == loss
    if loss == "dkd":
        assert cfg.loss.alpha == 1.0 and cfg.loss.temperature == 4.0  # mdistiller's TCKD weight
    if loss == "ls_kd":
        assert cfg.loss.temperature == 2.0  # the paper's code


def test_combo_default_is_repdistillers_method_plus_kd():
    """RepDistiller's "method + KD" rows (-r 1 -a 1 -b W): CE and the KD term at weight 1 beside the method."""
    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["loss=combo"])
    validate(cfg)
    assert cfg.loss.ce_weight == 1.0 and cfg.loss.terms.kd.alpha == 1.0 and cfg.loss.terms.kd.temperature == 4.0
