"""Neuron selectivity transfer.

Huang & Wang (2017), "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".

Each channel's spatial map, flattened and L2-normalised, is one sample of a
distribution; NST matches the teacher's and student's distributions with the
squared MMD under the polynomial kernel k(x, y) = (x . y)^2 (d = 2, c = 0):

    MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(s_j, t_i)
    nst   = weight * sum over pairs of mean over the batch of MMD^2

(the larger map average-pooled to the smaller's H x W first). RepDistiller
defaults: weight 50, all shared stages. Channel counts may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.losses.adapters import pool_to_smaller
from kdrun.losses.base import FeatureLoss, register_loss, shared_stages


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and all (i, j) of (a_i . b_j)^2 for a [B,N,D], b [B,M,D]."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@register_loss("nst")
class NST(FeatureLoss):
    def __init__(self, weight: float = 50.0, **kw):
        super().__init__(weight=weight, **kw)

    def default_layers(self, teacher_points, student_points):
        stages = shared_stages(teacher_points, student_points)
        return stages, list(stages)

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != 4 or len(s_shape) != 4:
            raise self.shape_error(i, t_shape, s_shape, "neuron selectivity transfer needs two feature maps [C,H,W]")

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        s = F.normalize(f_s.flatten(2), dim=2)
        t = F.normalize(f_t.flatten(2), dim=2)
        return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)
