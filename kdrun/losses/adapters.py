"""Trainable pieces that bridge teacher and student features (they live in the method).

* ``ChannelAdapter``: 1x1 conv + BatchNorm (+ ReLU when ``relu``) mapping student
  channels to teacher channels (FitNet's regressor, with the ReLU as in RepDistiller's
  and mdistiller's ``ConvReg``); on vectors, Linear + BatchNorm1d (+ ReLU).
* ``match_spatial``: bilinear interpolation of a feature map to another's H x W.
* ``pool_to_smaller``: adaptive average pooling of the larger of two maps.
* ``Embed``: flatten + Linear, optionally L2-normalised (CC, CRD).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ChannelAdapter(nn.Sequential):
    """Student feature -> teacher channels: 1x1 conv + BN on maps, Linear + BN on vectors; then ReLU if ``relu``."""

    def __init__(self, c_in: int, c_out: int, spatial: bool = True, relu: bool = False):
        layers: list[nn.Module] = (
            [nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out)]
            if spatial
            else [nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out)]
        )
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


def match_spatial(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` [B,C,H,W] resized to ``size`` with bilinear interpolation (unchanged when it already matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever of two maps is spatially larger down to the other's H x W."""
    ha, hb = a.shape[-2:], b.shape[-2:]
    if ha == hb:
        return a, b
    if ha[0] * ha[1] > hb[0] * hb[1]:
        return F.adaptive_avg_pool2d(a, (hb[0], hb[1])), b
    return a, F.adaptive_avg_pool2d(b, (ha[0], ha[1]))


class Embed(nn.Module):
    """Flatten, project linearly to ``dim``; L2-normalise each row when ``normalize``."""

    def __init__(self, d_in: int, dim: int, normalize: bool = False):
        super().__init__()
        self.linear = nn.Linear(d_in, dim)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        return F.normalize(z, dim=1) if self.normalize else z
