"""`teacher.pretrained` / `student.pretrained` read the training checkpoints other tools write, not only a bare
state_dict: Lightning's (the LightningModule's state_dict, the network under the attribute holding it), timm's
train.py's, PyTorch's tutorial loop's, RepDistiller's and mdistiller's."""

import argparse
import logging

import pytest
import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.weights import load_pretrained


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _prefixed(state: dict, head: str) -> dict:
    return {f"{head}.{k}": v for k, v in state.items()}


def _load(tmp_path, saved) -> nn.Module:
    path = tmp_path / "saved.ckpt"
    torch.save(saved, path)
    net = _net(seed=1)
    load_pretrained(str(path), net, "teacher.pretrained=saved.ckpt")
    return net


def test_a_lightning_checkpoint_gives_the_network_under_its_attribute(tmp_path, caplog):
    trained = _net(seed=0)
    module_state = {  # a LightningModule with self.net = the network and a loss holding a buffer of its own
        **_prefixed(trained.state_dict(), "net"),
        "criterion.weight": torch.ones(3),
    }
    saved = {
        "epoch": 7,
        "global_step": 700,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": module_state,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "hyper_parameters": {"lr": 0.1, "width": 6},
    }
    with caplog.at_level(logging.INFO, logger="kdrun"):
        got = _load(tmp_path, saved)
    assert _same(got, trained)
    assert "the weights under its 'state_dict' key" in caplog.text and "the weights under 'net.'" in caplog.text


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net"])
def test_the_state_dict_is_taken_from_each_framework_s_key(tmp_path, key):
    trained = _net(seed=0)
    ema = _net(seed=2)
    saved = {"epoch": 3, key: trained.state_dict(), "state_dict_ema": ema.state_dict(), "arch": "mlp"}
    saved["args"] = argparse.Namespace(model="mlp", lr=0.1, layers=[4, 6])  # timm's train.py saves its command line
    assert _same(_load(tmp_path, saved), trained)  # timm's EMA copy next to it is not taken


def test_a_compiled_network_inside_a_lightning_module_is_found(tmp_path):
    trained = _net(seed=0)
    saved = {"state_dict": _prefixed(_prefixed(trained.state_dict(), "_orig_mod"), "net"), "epoch": 1}
    assert _same(_load(tmp_path, saved), trained)


def test_an_empty_state_dict_does_not_fit(tmp_path):
    with pytest.raises(ConfigError, match=r"^teacher.pretrained=saved.ckpt: does not fit the model \(Missing key"):
        _load(tmp_path, {})


def test_a_checkpoint_holding_other_objects_says_how_to_save_its_weights(tmp_path):
    path = tmp_path / "saved.ckpt"
    torch.save({"state_dict": _net(seed=0).state_dict(), "cfg": Exotic()}, path)
    with pytest.raises(ConfigError) as e:
        load_pretrained(str(path), _net(seed=1), "teacher.pretrained=saved.ckpt")
    assert str(e.value).startswith("teacher.pretrained=saved.ckpt: not a loadable state_dict (UnpicklingError; ")
    assert str(e.value).endswith("loads once its weights are saved alone, torch.save(net.state_dict(), PATH))")


class Exotic:
    """A config object of some other library's, pickled beside the weights."""


def test_ddp_prefix_inside_a_checkpoint_is_removed(tmp_path):
    trained = _net(seed=0)
    assert _same(_load(tmp_path, {"model": _prefixed(trained.state_dict(), "module")}), trained)


def test_weights_that_fit_under_two_attributes_are_one_line_naming_both(tmp_path):
    student, teacher = _net(seed=0), _net(seed=2)
    both = {**_prefixed(student.state_dict(), "student"), **_prefixed(teacher.state_dict(), "teacher")}
    with pytest.raises(
        ConfigError,
        match=r"^teacher.pretrained=saved.ckpt: holds weights that fit the model under each of 'student.', "
        r"'teacher.'; save the one to use alone$",
    ):
        _load(tmp_path, {"state_dict": both})


def test_a_checkpoint_without_weights_names_the_keys_looked_in(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^teacher.pretrained=saved.ckpt: not a state_dict \(a mapping of parameter names to tensors\), "
        r"nor a checkpoint holding one under 'model', 'state_dict', 'model_state_dict', 'net'$",
    ):
        _load(tmp_path, {"epoch": 3, "optimizer": {"lr": 0.1}, "net": torch.ones(3)})  # a tensor, not a state_dict


def test_a_network_that_does_not_fit_under_any_attribute_is_one_line(tmp_path):
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ConfigError, match=r"^teacher.pretrained=saved.ckpt: does not fit the model \("):
        _load(tmp_path, {"state_dict": _prefixed(other.state_dict(), "net")})


def test_timm_checkpoints_load_with_the_torch_2_4_allow_list(tmp_path, monkeypatch):
    """torch 2.4 has no ``safe_globals`` context manager, only the process-wide list (``add_safe_globals``)."""
    monkeypatch.delattr(torch.serialization, "safe_globals")
    trained = _net(seed=0)
    saved = {"state_dict": trained.state_dict(), "args": argparse.Namespace(model="mlp")}
    assert _same(_load(tmp_path, saved), trained)
