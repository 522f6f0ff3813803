"""Probabilistic knowledge transfer.

Passalis & Tefas (ECCV 2018), "Learning Deep Representations with Probabilistic Knowledge Transfer".

Rows of the flattened features are L2-normalised (x_i / (||x_i|| + eps)); the
cosine-similarity kernel K_ij = (cos(x_i, x_j) + 1) / 2 is turned into
conditional probabilities p_{i|j} = K_ij / sum_k K_ik, and

    pkt = weight * mean over (i, j) of p^t_{i|j} * log((p^t_{i|j} + eps) / (p^s_{i|j} + eps)),   eps = 1e-7

RepDistiller defaults: weight 30000 (the mean over B^2 entries is small), on ``pre_logits``.
"""

from __future__ import annotations

import torch

from kdrun import distributed
from kdrun.losses.base import RelationLoss, register_loss

EPS = 1e-7


def conditional_probs(f: torch.Tensor) -> torch.Tensor:
    x = f.flatten(1)
    x = x / (x.norm(dim=1, keepdim=True) + EPS)
    k = (x @ x.T + 1) / 2
    return k / k.sum(1, keepdim=True)


@register_loss("pkt")
class PKT(RelationLoss):
    def __init__(self, weight: float = 30000.0, **kw):
        super().__init__(weight=weight, **kw)

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        f_s, f_t = distributed.global_batch(f_s), distributed.global_batch(f_t)  # data parallel: the whole batch
        p_s, p_t = conditional_probs(f_s), conditional_probs(f_t)
        return (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()
