"""Every config option composes and validates; bad input is one line and exit code 2."""

from importlib import resources

import pytest
from hydra import compose, initialize_config_module

from kdrun.config import validate
from kdrun.errors import ConfigError

GROUPS = ["teacher", "student", "dataset", "loss", "optim", "trainer", "experiment", "scheme"]


def options(group: str) -> list[str]:
    root = resources.files("kdrun.configs") / group
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


# methods relating the teacher's and the student's layers channel by channel need a pair of equal widths: the
# default pair (resnet20 -> mbv2_tiny) is refused before anything trains
EQUAL_WIDTHS = {"fsp": ["student=resnet8"], "kdsvd": ["student=resnet8"]}


def test_every_group_option_composes():
    composed = 0
    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        for group in GROUPS:
            for opt in options(group):
                fits = EQUAL_WIDTHS.get(opt, []) if group == "loss" else []
                cfg = compose(config_name="train", overrides=[f"{group}={opt}", *fits])
                if group not in ("dataset", "experiment"):  # datasets/experiments may need files to run
                    validate(cfg)
                composed += 1
        for method in EQUAL_WIDTHS:
            with pytest.raises(ConfigError, match=f"^loss.layers: teacher stage1 .* {method} needs equal teacher"):
                validate(compose(config_name="train", overrides=[f"loss={method}"]))
    assert composed >= 10


def test_default_config_is_the_embedded_digits_run():
    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        cfg = compose(config_name="train")
    validate(cfg)
    assert cfg.dataset.name == "digits"
    assert cfg.loss.name == "kd" and cfg.loss.temperature > 0 and 0 <= cfg.loss.alpha <= 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.alpha=1.5", "loss.alpha=1.5: must be a number in [0, 1]"),
        ("loss.temperature=0", "loss.temperature=0: must be a number > 0"),
        ("trainer.epochs=-1", "trainer.epochs=-1: must be an integer >= 0"),
        ("trainer.batch_size=0", "trainer.batch_size=0: must be an integer > 0"),
        ("cache.views=-2", "cache.views=-2: must be an integer >= 0"),
        ("trainer.epochs=abc", "trainer.epochs=abc: must be an integer >= 0"),
    ],
)
def test_validation_names_key_and_valid_range(override, message):
    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == message


@pytest.mark.parametrize("package", ["kdrun.losses", "kdrun.models"])
def test_every_module_of_the_method_and_model_packages_is_loaded_with_them(package):
    """A new method or model family is its own module and its YAML: importing the package imports every module
    in it (where its decorator registers it), with no list to extend. In a fresh interpreter, where no other test
    has imported a module by itself."""
    import subprocess
    import sys

    code = (
        f"import pkgutil, sys, {package} as p; "
        "left = sorted(m.name for m in pkgutil.iter_modules(p.__path__) "
        "if p.__name__ + '.' + m.name not in sys.modules); "
        "print(len(list(pkgutil.iter_modules(p.__path__))), left)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) > 5 and out[1].strip() == "[]", out


def composed(*overrides: str):
    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


FOLDER = ("dataset=imagefolder", "dataset.root=/data/myset")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset.image_size=0"], "dataset.image_size=0: must be an integer > 0"),
        (["dataset.image_size=15.5"], "dataset.image_size=15.5: must be an integer > 0"),
        (["dataset.image_size=abc"], "dataset.image_size=abc: must be an integer > 0"),
        (["dataset.in_chans=2"], "dataset.in_chans=2: must be 1 (grey) or 3 (RGB)"),
        (["dataset.num_classes=two"], "dataset.num_classes=two: must be an integer >= 2"),
        ([*FOLDER, "dataset.workers=-1"], "dataset.workers=-1: must be an integer >= 0 (0: in the main process"),
        ([*FOLDER, "dataset.workers=two"], "dataset.workers=two: must be an integer >= 0 (0: in the main process"),
        ([*FOLDER, "dataset.mode=disk"], "dataset.mode=disk: must be auto, memory or stream"),
        ([*FOLDER, "dataset.max_memory_gb=0"], "dataset.max_memory_gb=0: must be a number > 0"),
        (["dataset.std=[0]"], "dataset.std=[0]: must be 1 number in (0, 1] (of pixels / 255)"),
        (["dataset.mean=[33.3]"], "dataset.mean=[33.3]: must be 1 number in [0, 1] (of pixels / 255)"),
        (
            [*FOLDER, "dataset.mean=[124,116,104]"],
            "dataset.mean=[124, 116, 104]: must be 1 or 3 numbers in [0, 1] (of pixels / 255)",
        ),
        (
            [*FOLDER, "dataset.std=[0.2,0.2]"],
            "dataset.std=[0.2, 0.2]: must be 1 or 3 numbers in (0, 1] (of pixels / 255)",
        ),
        (
            [*FOLDER, "dataset.in_chans=1"],
            "dataset.mean=[0.485, 0.456, 0.406]: must be 1 number in [0, 1] (of pixels / 255) for dataset.in_chans=1",
        ),
    ],
)
def test_dataset_keys_name_the_key_and_what_is_valid(overrides, message):
    cfg = composed(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(message), str(e.value)


def test_grey_folder_with_its_own_statistics_validates():
    validate(composed(*FOLDER, "dataset.in_chans=1", "dataset.mean=[0.5]", "dataset.std=[0.25]"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.student_exclude=[5]", "dataset.student_exclude=[5]: must be a list of class indices in [0, 2)"),
        ("dataset.student_exclude=[0,1]", "dataset.student_exclude=[0, 1]: leaves none of the 2 classes"),
        ("cache.topk=5", "cache.topk=5: must be below the 2 classes of dataset.root="),
        ("evaluate.logit_bias={5: 1.0}", "evaluate.logit_bias="),
    ],
)
def test_class_indices_are_checked_against_the_classes_found_in_the_folder(tmp_path, override, message):
    """With dataset.num_classes null the classes are known only once the folder is read: the run checks them
    then, before anything trains (they used to end in a traceback after training, or be ignored)."""
    import torch

    from kdrun.run_data import RunData
    from tests.test_data import make_folder

    make_folder(tmp_path / "imgs", classes=("ant", "bee"))
    cfg = composed(
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'imgs'}",
        f"dataset.cache_dir={tmp_path / 'c'}",
        "dataset.image_size=8",
        "dataset.workers=1",
        override,
    )
    validate(cfg)  # num_classes unknown yet
    with pytest.raises(ConfigError) as e:
        RunData(cfg, torch.device("cpu"))
    assert str(e.value).startswith(message), str(e.value)


def test_a_schedule_on_a_key_the_method_keeps_under_another_name_says_why(monkeypatch):
    """A schedule sets the attribute of the key's name: a method that stored loss.weight as self.w was refused as
    'fixed when the method is built', which it did not declare."""
    from omegaconf import OmegaConf

    from kdrun.config import _validate_loss_builds
    from kdrun.errors import ConfigError
    from kdrun.losses import LOSSES
    from kdrun.losses.base import DistillLoss

    class Renamed(DistillLoss):
        term = "renamed"

        def __init__(self, weight: float = 1.0, **kw):
            super().__init__(**kw)
            self.w = weight

    monkeypatch.setitem(LOSSES._items, "renamed", Renamed)
    cfg = OmegaConf.create(
        {
            "loss": {"name": "renamed", "weight": {"schedule": "linear", "start": 1, "end": 0}},
            "scheme": {"name": "offline"},
        }
    )
    with pytest.raises(
        ConfigError, match=r"loss.weight: cannot follow a schedule in loss 'renamed': the method keeps no "
    ):
        _validate_loss_builds(cfg)
