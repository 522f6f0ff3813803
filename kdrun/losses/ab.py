"""Activation boundaries: Heo, Lee, Yun & Choi (AAAI 2019), "Knowledge Transfer via Distillation of
Activation Boundaries Formed by Hidden Neurons".

An initialisation stage trains the student's layers and a connector r (1x1 conv + BN where the
shapes differ, else the identity) so that each student neuron is active exactly where the teacher's
is, with a hinge-like loss on pre-activation features (margin mu = 1):

    a(s, t) = (s + mu)^2 [s > -mu and t <= 0] + (s - mu)^2 [s <= mu and t > 0]
    init stage:     ab = sum over pairs i = 1..n of 2^(i - n) * sum over (b, c, h, w) of a(r(s_i), t_i) / B * 3 / 1000
    student stage:  CE only (as the authors' benchmark code: RepDistiller's AB adds no term there)

RepDistiller defaults (CRD benchmark): all stages, pre-activation features of both networks
(the teacher's ``stageN_preact``; the student's where it has them, else its stage outputs), 30
initialisation epochs with SGD at the constant student LR (momentum and weight decay of
``optim``); the stage is the run's ``student_init`` (checkpointed, resumable). Deliberate
difference as for FitNet: where sizes differ, kdrun's 1x1 conv output is bilinearly resized to the
teacher's H x W instead of RepDistiller's strided / transposed ``ConvReg``. The teacher still
runs during the student stage (its features are declared but unused there).
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.losses.adapters import ChannelAdapter, match_spatial
from kdrun.losses.base import (
    FeatureLoss,
    Outputs,
    PreStage,
    StepContext,
    check,
    preact_stages,
    register_loss,
    sum_terms,
)
from kdrun.losses.init_stage import InitObjective, InitStep


def boundary_loss(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over all elements of AB's alternative L2 on activation boundaries."""
    loss = (source + margin) ** 2 * ((source > -margin) & (target <= 0)) + (source - margin) ** 2 * (
        (source <= margin) & (target > 0)
    )
    return loss.abs().sum()


@register_loss("ab")
class AB(FeatureLoss):
    fixed_when_built = ("init_epochs", "init_lr", "margin")  # margin: read by the init stage alone
    trains_student = False  # the student stage is CE alone; this method's term trains its init stage

    def __init__(self, margin: float = 1.0, init_epochs: int = 30, init_lr: float | None = None, **kw):
        super().__init__(**kw)
        check("margin", margin, margin > 0, "a number > 0")
        # its term trains the student before the student stage, which is CE alone: without it, it is the baseline
        once = "an integer >= 1 (0 leaves the student stage CE alone: the baseline)"
        check("init_epochs", init_epochs, int(init_epochs) == init_epochs and init_epochs >= 1, once)
        check("init_lr", init_lr, init_lr is None or init_lr > 0, "a number > 0 (or null: optim.lr)")
        self.margin, self.init_epochs, self.init_lr = float(margin), int(init_epochs), init_lr

    def default_layers(self, teacher_points, student_points):
        return preact_stages("ab", teacher_points, student_points)

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != 4 or len(s_shape) != 4:
            raise self.shape_error(i, t_shape, s_shape, "ab needs two feature maps [C,H,W]")
        if tuple(t_shape[1:]) == tuple(s_shape[1:]):
            return None
        return ChannelAdapter(s_shape[1], t_shape[1], relu=False)

    def init_loss(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        n = len(s_feats)
        terms = (
            2.0 ** (i - n + 1)
            * boundary_loss(match_spatial(self.adapters[i](f_s), f_t.shape[-2:]), f_t, self.margin)
            / len(f_s)
            / 1000
            * 3
            for i, (f_s, f_t) in enumerate(zip(s_feats, t_feats))
        )
        return {"ab": sum_terms(terms)}

    def pre_stages(self, teacher: nn.Module, student: nn.Module) -> list[PreStage]:
        step = InitStep(student, self.adapters, self.student_layers, self.init_loss)
        optim = {"schedule": "constant", "warmup_epochs": 0} | ({"lr": self.init_lr} if self.init_lr else {})
        objective = InitObjective(step, teacher, self.teacher_layers)
        lr_key = "loss.init_lr" if self.init_lr else "optim.lr"  # null: the stage ran at optim.lr
        return [PreStage("init", step, objective, self.init_epochs, optim, lr_key=lr_key)]

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}  # the student stage is CE only
