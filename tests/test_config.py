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


def test_every_group_option_composes():
    composed = 0
    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        for group in GROUPS:
            for opt in options(group):
                cfg = compose(config_name="train", overrides=[f"{group}={opt}"])
                if group not in ("dataset", "experiment"):  # datasets/experiments may need files to run
                    validate(cfg)
                composed += 1
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
