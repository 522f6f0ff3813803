"""Correlation congruence.

Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang (ICCV 2019), "Correlation Congruence for Knowledge Distillation".

The RepDistiller form: student and teacher penultimate features are each
projected by a trainable linear embedding (``embed_dim`` = 128), f = E_s(x_s),
g = E_t(x_t); with d_i = |f_i - g_i| (elementwise) over consecutive samples of the batch,

    cc = weight * mean over i = 1..B-1 of sum_k d_{i-1,k} * d_{i,k}

which is the first-order Taylor form of the paper's correlation-congruence
term. Defaults: weight 0.02, ``pre_logits``. Both embeddings train with the
student (the teacher network itself stays frozen).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdrun import distributed
from kdrun.losses.adapters import Embed
from kdrun.losses.base import RelationLoss, check, register_loss


@register_loss("cc")
class CC(RelationLoss):
    fixed_when_built = ("embed_dim",)

    def __init__(self, weight: float = 0.02, embed_dim: int = 128, **kw):
        super().__init__(weight=weight, **kw)
        check("embed_dim", embed_dim, int(embed_dim) == embed_dim and embed_dim > 0, "an integer > 0")
        self.embed_dim = int(embed_dim)
        self.embed_t = nn.ModuleList()

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if i == 0:
            self.embed_t = nn.ModuleList()
        self.embed_t.append(Embed(math.prod(t_shape[1:]), self.embed_dim))
        return Embed(math.prod(s_shape[1:]), self.embed_dim)

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        delta = distributed.global_batch(self.adapters[i](f_s) - self.embed_t[i](f_t)).abs()  # the whole batch
        return (delta[:-1] * delta[1:]).sum(1).mean()
