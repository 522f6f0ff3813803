"""Fully connected nets on flattened images, as in Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network": the MNIST teacher has two hidden layers of 1200 ReLU units,
dropout (Hinton et al., 2012) and a max-norm constraint on each unit's incoming weights.

Keyword options (``teacher.kwargs`` / ``student.kwargs``):

* ``hidden``: hidden layer widths, default ``[1200, 1200]`` (``[]``: a linear classifier)
* ``dropout``: dropout after each hidden activation (default 0)
* ``input_dropout``: dropout on the flattened input pixels (default 0; the paper used 0.2)
* ``activation``: ``relu`` (default), ``gelu``, ``tanh`` or ``sigmoid``
* ``max_norm``: if set, :meth:`MLP.apply_constraints` rescales every hidden unit's incoming
  weight vector to an L2 norm of at most ``max_norm``. It is a projection, not a loss term:
  the trainer calls ``model.apply_constraints()`` after each optimizer step (models without
  constraints need not define it; ``getattr(model, "apply_constraints", None)``).

Feature points: ``hidden1`` .. ``hiddenN`` (activations of each hidden layer, before dropout)
and ``pre_logits`` (the input of the output layer).
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.registry import register_model

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class HiddenLayer(nn.Module):
    def __init__(self, cin: int, cout: int, activation: str, dropout: float):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.act(self.fc(x)))


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        num_classes: int,
        activation: str = "relu",
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        max_norm: float | None = None,
    ):
        super().__init__()
        self.input_drop = nn.Dropout(input_dropout)
        widths = [in_features] + list(hidden)
        self.layers = nn.ModuleList(HiddenLayer(a, b, activation, dropout) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)
        self.max_norm = max_norm
        self.feature_points = {f"hidden{i + 1}": f"layers.{i}.act" for i in range(len(self.layers))}
        self.feature_points["pre_logits"] = "head:input"

    def forward(self, x):
        x = self.input_drop(x.flatten(1))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project each hidden unit's incoming weights onto the ball of radius ``max_norm`` (no-op if unset)."""
        if self.max_norm is None:
            return
        for layer in self.layers:
            assert isinstance(layer, HiddenLayer)
            w = layer.fc.weight
            w.copy_(torch.renorm(w, p=2, dim=0, maxnorm=self.max_norm))


def _check(hidden, activation, dropout, input_dropout, max_norm) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"kwargs.activation={activation}: unknown activation; valid: {', '.join(ACTIVATIONS)}")
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ConfigError(f"kwargs.hidden={hidden}: not a list of positive layer widths; valid: e.g. [1200, 1200]")
    for key, p in (("dropout", dropout), ("input_dropout", input_dropout)):
        if not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"kwargs.{key}={p}: not a probability; valid: 0 <= p < 1")
    if max_norm is not None and (not isinstance(max_norm, (int, float)) or max_norm <= 0):
        raise ConfigError(f"kwargs.max_norm={max_norm}: not a positive number; valid: null or > 0")


@register_model("mlp")
def mlp(
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    hidden: list[int] | None = None,
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    activation: str = "relu",
    max_norm: float | None = None,
):
    """MLP of Hinton et al. (2015) (kwargs hidden, dropout, input_dropout, activation, max_norm)."""
    hidden = [1200, 1200] if hidden is None else hidden
    _check(hidden, activation, dropout, input_dropout, max_norm)
    return MLP(in_chans * img_size * img_size, hidden, num_classes, activation, dropout, input_dropout, max_norm)
