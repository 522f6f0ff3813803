"""FitNets hints: Romero, Ballas, Kahou, Chassang, Gatta & Bengio (ICLR 2015), "FitNets: Hints for Thin Deep Nets".

A learned regressor r maps the student's guided layer onto the teacher's hint layer:

    fitnet = weight * mean over elements of (r(F_s) - F_t)^2

r is a 1x1 conv + BatchNorm + ReLU (Linear + BatchNorm1d + ReLU on vectors) from
student to teacher channels, as the authors' benchmark code (RepDistiller's and
mdistiller's ``ConvReg`` with ``use_relu=True``). Weight 100 and one middle hint
layer (RepDistiller uses hint layer 2, i.e. the second stage) are the CIFAR-100
defaults.

Deliberate difference: when the spatial sizes differ, ``ConvReg`` uses a
strided 3x3 conv (student twice the teacher's size), a transposed conv (half)
or a (1+dH)x(1+dW) valid conv; kdrun keeps the 1x1 conv and bilinearly resizes
r(F_s) to the teacher's H x W. With equal sizes (the CIFAR pairs' hint layer)
both are conv 1x1 -> BN -> ReLU; ConvReg's conv bias is cancelled by the BN
in training mode, so kdrun's conv has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.losses.adapters import ChannelAdapter, match_spatial
from kdrun.losses.base import FeatureLoss, register_loss, shared_stages


@register_loss("fitnet")
class FitNet(FeatureLoss):
    def __init__(self, weight: float = 100.0, **kw):
        super().__init__(weight=weight, **kw)

    def default_layers(self, teacher_points, student_points):
        stages = shared_stages(teacher_points, student_points)
        middle = stages[(len(stages) - 1) // 2]
        return [middle], [middle]

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != len(s_shape) or len(t_shape) not in (2, 4):
            raise self.shape_error(i, t_shape, s_shape, "fitnet needs two feature maps [C,H,W] or two vectors [C]")
        return ChannelAdapter(s_shape[1], t_shape[1], spatial=len(s_shape) == 4, relu=True)

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        hint = self.adapters[i](f_s)
        if hint.dim() == 4:
            hint = match_spatial(hint, f_t.shape[-2:])
        return F.mse_loss(hint, f_t)
