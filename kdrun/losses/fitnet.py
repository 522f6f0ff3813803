"""FitNets hints: Romero, Ballas, Kahou, Chassang, Gatta & Bengio (ICLR 2015), "FitNets: Hints for Thin Deep Nets".

A learned regressor r maps the student's guided layer onto the teacher's hint layer:

    fitnet = weight * mean over elements of (r(F_s) - F_t)^2

r is a 1x1 conv + BatchNorm (Linear + BatchNorm1d on vectors) from student to
teacher channels; when the spatial sizes differ, r(F_s) is bilinearly resized
to the teacher's H x W. Weight 100 and one middle hint layer (RepDistiller
uses hint layer 2, i.e. the second stage) are the CIFAR-100 defaults.
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
        return ChannelAdapter(s_shape[1], t_shape[1], spatial=len(s_shape) == 4)

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        hint = self.adapters[i](f_s)
        if hint.dim() == 4:
            hint = match_spatial(hint, f_t.shape[-2:])
        return F.mse_loss(hint, f_t)
