"""Variational information distillation.

Ahn, Hu, Damianou, Lawrence & Dai (CVPR 2019), "Variational Information Distillation for Knowledge Transfer".

VID maximises a variational lower bound on the mutual information between teacher and student
features: the teacher's map t [B,C,H,W] is modelled as a Gaussian whose mean mu(s) is regressed from
the student's map s and whose per-channel variance sigma_c^2 is learned. Per layer pair, with
the larger map average-pooled to the smaller's H x W:

    mu(s)     = conv1x1(C_t) . ReLU . conv1x1(C_t) . ReLU . conv1x1(C_s -> C_t)   (no biases)
    sigma_c^2 = softplus(a_c) + eps,   a_c initialised so that sigma_c^2 = init_pred_var
    vid       = weight * sum over pairs of mean over (b, c, h, w) of
                0.5 * ((mu(s) - t)^2 / sigma_c^2 + log sigma_c^2)

The regressor and the a_c train with the student. CIFAR-100 defaults of the authors' benchmark
code (RepDistiller ``-b 1``; mdistiller ``CFG.VID``): weight 1, CE weight 1, init_pred_var 5,
eps 1e-5, all shared stages. As RepDistiller, the variances are learned (mdistiller keeps its
``log_scales`` in a plain list, so they stay at their initial value there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.losses.adapters import pool_to_smaller
from kdrun.losses.base import FeatureLoss, check, register_loss, shared_stages


class VIDRegressor(nn.Module):
    """The Gaussian's mean (three 1x1 convs) and per-channel variance of one layer pair."""

    def __init__(self, c_s: int, c_t: int, init_pred_var: float, eps: float):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False),
        )
        self.eps = eps
        # softplus(a) + eps = init_pred_var  <=>  a = log(exp(init_pred_var - eps) - 1)
        self.log_scale = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_pred_var - eps))))

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps

    def neg_log_likelihood(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((self.mean(f_s) - f_t) ** 2 / var + torch.log(var))).mean()


@register_loss("vid")
class VID(FeatureLoss):
    fixed_when_built = ("init_pred_var", "eps")

    def __init__(self, weight: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5, **kw):
        super().__init__(weight=weight, **kw)
        check("init_pred_var", init_pred_var, init_pred_var > 0, "a number > 0")
        check("eps", eps, 0 < eps < init_pred_var, "a number in (0, init_pred_var)")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)

    def default_layers(self, teacher_points, student_points):
        stages = shared_stages(teacher_points, student_points)
        return stages, list(stages)

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != 4 or len(s_shape) != 4:
            raise self.shape_error(i, t_shape, s_shape, "vid needs two feature maps [C,H,W]")
        return VIDRegressor(s_shape[1], t_shape[1], self.init_pred_var, self.eps)

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        return self.adapters[i].neg_log_likelihood(f_s, f_t)
