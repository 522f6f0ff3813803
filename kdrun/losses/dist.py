"""DIST: Huang, You, Wang, Qian & Xu (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher".

With Y_s = softmax(Z_s / tau), Y_t = softmax(Z_t / tau) ([B, C]) and
rho(u, v) the Pearson correlation of two vectors:

    inter = 1 - mean over samples i of rho(Y_s[i, :], Y_t[i, :])     (relations between classes)
    intra = 1 - mean over classes c of rho(Y_s[:, c], Y_t[:, c])     (relations within a class)
    dist  = tau^2 * (beta * inter + gamma * intra)

The constructor defaults are the paper's general ones (beta = gamma = tau = 1);
``configs/loss/dist.yaml`` holds the CIFAR-100 setting (beta = gamma = 2, tau = 4).
"""

from __future__ import annotations

import torch

from kdrun import distributed
from kdrun.losses.base import DistillLoss, Outputs, StepContext, check, register_loss


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: [N]."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss("dist")
class DIST(DistillLoss):
    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, **kw):
        super().__init__(**kw)
        check("beta", beta, beta >= 0, "a number >= 0")
        check("gamma", gamma, gamma >= 0, "a number >= 0")
        check("tau", tau, tau > 0, "a number > 0")
        self.beta, self.gamma, self.tau = beta, gamma, tau

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        y_s = distributed.global_batch((s.logits.float() / self.tau).softmax(1))  # data parallel: the whole batch
        y_t = distributed.global_batch((t.logits.detach().float() / self.tau).softmax(1))
        inter = 1 - pearson_rows(y_s, y_t).mean()
        intra = 1 - pearson_rows(y_s.T, y_t.T).mean()
        return {"dist": self.tau**2 * (self.beta * inter + self.gamma * intra)}
