"""The initialisation stage of FSP and AB: the student (and the method's adapters) trained on a
feature loss against the frozen teacher alone, before the student stage (a :class:`PreStage`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import torch
from torch import nn

from kdrun.models.features import FeatureTap


class InitStep(nn.Module):
    """The stage's one trainable module: student + adapters; ``forward`` gives the feature-loss terms."""

    def __init__(
        self,
        student: nn.Module,
        adapters: nn.Module,
        layers: list[str],
        loss: Callable[[list[torch.Tensor], list[torch.Tensor]], dict[str, torch.Tensor]],
    ):
        super().__init__()
        self.student, self.adapters = student, adapters
        self.layers, self.loss = list(layers), loss
        self.tap = FeatureTap(student, self.layers)

    def forward(self, x: torch.Tensor, t_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.student(x)
        return self.loss([self.tap.features[n].float() for n in self.layers], t_feats)


class InitObjective:
    """Runs the frozen teacher (features by hooks), then the :class:`InitStep`; a context manager for the hooks."""

    def __init__(self, step: InitStep, teacher: nn.Module, teacher_layers: list[str]):
        self.step, self.teacher, self.layers = step, teacher, list(teacher_layers)
        self.tap = FeatureTap(teacher, self.layers)

    def __enter__(self) -> Self:
        self.step.tap.attach()
        self.tap.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.step.tap.close()
        self.tap.close()
        # the adapters serve this stage alone: frozen, the student stage neither steps them nor waits (under DDP)
        # for gradients they never get
        self.step.adapters.requires_grad_(False)

    def __call__(self, net: nn.Module, batch, epoch: int) -> dict[str, torch.Tensor]:
        self.teacher.eval()
        with torch.no_grad():
            self.teacher(batch.x)
        return net(batch.x, [self.tap.features[n].detach().float() for n in self.layers])
