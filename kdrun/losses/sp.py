"""Similarity-preserving KD: Tung & Mori (ICCV 2019), "Similarity-Preserving Knowledge Distillation".

With Q = flattened features [B, D] of a batch, G = Q Q^T row-wise L2-normalised:

    sp = weight * sum over pairs of ||G_t - G_s||_F^2 / B^2

RepDistiller defaults: weight 3000 on the last shared stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun import distributed
from kdrun.losses.base import FeatureLoss, register_loss


def similarity(f: torch.Tensor) -> torch.Tensor:
    q = f.flatten(1)
    return F.normalize(q @ q.T, dim=1)


@register_loss("sp")
class SP(FeatureLoss):
    def __init__(self, weight: float = 3000.0, **kw):
        super().__init__(weight=weight, **kw)

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        f_s, f_t = distributed.global_batch(f_s), distributed.global_batch(f_t)  # data parallel: the whole batch
        return (similarity(f_t) - similarity(f_s)).pow(2).sum() / len(f_s) ** 2
