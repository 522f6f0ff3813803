"""Relational KD: Park, Kim, Lu & Cho (CVPR 2019), "Relational Knowledge Distillation".

On the flattened features of a batch (x_i from the student, y_i from the teacher):

    distance: psi_D(x_i, x_j) = ||x_i - x_j||_2 / mu,  mu = mean of the non-zero pairwise distances
    angle:    psi_A(x_i, x_j, x_k) = <e_ij, e_kj>,       e_ij = (x_i - x_j) / ||x_i - x_j||_2
    rkd = weight * (w_dist * mean_{i,j} l(psi_D(x), psi_D(y)) + w_angle * mean_{i,j,k} l(psi_A(x), psi_A(y)))

with l the Huber (smooth L1, delta 1) loss. RepDistiller defaults: w_dist 25,
w_angle 50, weight 1, on the penultimate features (``pre_logits``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun import distributed
from kdrun.losses.base import RelationLoss, check, register_loss


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``x`` [B,D]; zero on the diagonal, finite gradients."""
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=eps)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def normalized_distances(x: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(x)
    return d / d[d > 0].mean()


def angles(x: torch.Tensor) -> torch.Tensor:
    """[B,B,B]: cosine of the angle at x_j between x_i and x_k."""
    e = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # e[j, i] = unit(x_i - x_j)
    return torch.bmm(e, e.transpose(1, 2))


@register_loss("rkd")
class RKD(RelationLoss):
    def __init__(self, weight: float = 1.0, w_dist: float = 25.0, w_angle: float = 50.0, **kw):
        super().__init__(weight=weight, **kw)
        check("w_dist", w_dist, w_dist >= 0, "a number >= 0")
        check("w_angle", w_angle, w_angle >= 0, "a number >= 0")
        self.w_dist, self.w_angle = w_dist, w_angle

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        x, y = distributed.global_batch(f_s.flatten(1)), distributed.global_batch(f_t.flatten(1))  # the whole batch
        dist = F.smooth_l1_loss(normalized_distances(x), normalized_distances(y))
        angle = F.smooth_l1_loss(angles(x), angles(y))
        return self.w_dist * dist + self.w_angle * angle
