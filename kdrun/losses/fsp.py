"""Flow of solution procedure: Yim, Joo, Bae & Kim (CVPR 2017), "A Gift from Knowledge Distillation:
Fast Optimization, Network Minimization and Transfer Learning".

The FSP matrix of two consecutive layers (maps F1 [C1,H,W], F2 [C2,H,W], the larger average-pooled
to the smaller's H x W) is G[i, j] = mean over positions of F2_i * F1_j ([C2, C1]). An
initialisation stage trains the student's layers so that its FSP matrices match the teacher's:

    init stage:     fsp = sum over consecutive pairs (l, l+1) of mean over (b, i, j) of (G_s - G_t)^2
    student stage:  CE only (as the authors' benchmark code: RepDistiller's FSP adds no term there)

RepDistiller defaults (CRD benchmark): 30 initialisation epochs, SGD at the constant student LR
(momentum and weight decay of ``optim``); the stage is the run's ``student_init`` (checkpointed,
resumable). Teacher and student channel counts must be equal layer by layer. RepDistiller uses
the stem (after its ReLU) and every stage; kdrun's default is every shared stage (the CIFAR
ResNets' ``stem`` point is the BatchNorm output before the ReLU); set ``loss.layers`` to change it.
The teacher still runs during the student stage (its features are declared but unused there).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from kdrun.losses.adapters import pool_to_smaller
from kdrun.losses.base import (
    FeatureLoss,
    Outputs,
    PreStage,
    StepContext,
    check,
    register_loss,
    shared_stages,
    sum_terms,
)
from kdrun.losses.init_stage import InitObjective, InitStep


def fsp_matrices(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """[B, C_{l+1}, C_l] for each consecutive pair of maps."""
    out = []
    for bottom, top in itertools.pairwise(feats):
        bottom, top = pool_to_smaller(bottom, top)
        out.append(torch.einsum("bihw,bjhw->bij", top, bottom) / (top.shape[-1] * top.shape[-2]))
    return out


@register_loss("fsp")
class FSP(FeatureLoss):
    fixed_when_built = ("init_epochs", "init_lr")
    trains_student = False  # the student stage is CE alone; this method's term trains its init stage
    min_pairs = 2

    def __init__(self, init_epochs: int = 30, init_lr: float | None = None, **kw):
        super().__init__(**kw)
        # its term trains the student before the student stage, which is CE alone: without it, it is the baseline
        once = "an integer >= 1 (0 leaves the student stage CE alone: the baseline)"
        check("init_epochs", init_epochs, int(init_epochs) == init_epochs and init_epochs >= 1, once)
        check("init_lr", init_lr, init_lr is None or init_lr > 0, "a number > 0 (or null: optim.lr)")
        self.init_epochs, self.init_lr = int(init_epochs), init_lr

    def default_layers(self, teacher_points, student_points):
        stages = shared_stages(teacher_points, student_points)
        return stages, list(stages)

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != 4 or len(s_shape) != 4:
            raise self.shape_error(i, t_shape, s_shape, "fsp needs two feature maps [C,H,W]")
        if t_shape[1] != s_shape[1]:
            raise self.shape_error(i, t_shape, s_shape, "fsp needs equal teacher and student channel counts")

    def init_loss(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        pairs = zip(fsp_matrices(s_feats), fsp_matrices(t_feats))
        return {"fsp": sum_terms((g_s - g_t).pow(2).mean() for g_s, g_t in pairs)}

    def pre_stages(self, teacher: nn.Module, student: nn.Module) -> list[PreStage]:
        step = InitStep(student, nn.ModuleList(), self.student_layers, self.init_loss)
        optim = {"schedule": "constant", "warmup_epochs": 0} | ({"lr": self.init_lr} if self.init_lr else {})
        objective = InitObjective(step, teacher, self.teacher_layers)
        lr_key = "loss.init_lr" if self.init_lr else "optim.lr"  # null: the stage ran at optim.lr
        return [PreStage("init", step, objective, self.init_epochs, optim, lr_key=lr_key)]

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}  # the student stage is CE only
