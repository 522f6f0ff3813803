"""Attention transfer: Zagoruyko & Komodakis (ICLR 2017), "Paying More Attention to Attention".

For a feature map F [B,C,H,W], the attention map is the channel mean of |F|^p,
flattened and L2-normalised per sample: Q(F) = vec(mean_c F_c^p) / ||vec(mean_c F_c^p)||_2.
Per layer pair (the larger map first average-pooled to the smaller's H x W):

    at = weight * sum over pairs of mean over (batch, positions) of (Q(F_s) - Q(F_t))^2

This is the RepDistiller form (p = 2, weight 1000, all shared stages), which
averages where the paper sums, hence the large weight. Channel counts may differ.
Difference from RepDistiller's code: kdrun raises |F| to the power p, RepDistiller F itself;
identical for the default (even) p = 2, and for odd p kdrun keeps the paper's absolute value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.losses.adapters import pool_to_smaller
from kdrun.losses.base import FeatureLoss, check, register_loss, shared_stages


@register_loss("at")
class AT(FeatureLoss):
    def __init__(self, weight: float = 1000.0, p: float = 2.0, **kw):
        super().__init__(weight=weight, **kw)
        check("p", p, p > 0, "a number > 0")
        self.p = p

    def default_layers(self, teacher_points, student_points):
        stages = shared_stages(teacher_points, student_points)
        return stages, list(stages)

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != 4 or len(s_shape) != 4:
            raise self.shape_error(i, t_shape, s_shape, "attention transfer needs two feature maps [C,H,W]")

    def attention(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.abs().pow(self.p).mean(1).flatten(1), dim=1)

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        return (self.attention(f_s) - self.attention(f_t)).pow(2).mean()
