"""Logit-standardised KD: Sun, Ren, Li, Wang & Cao (CVPR 2024), "Logit Standardization in Knowledge Distillation".

Each sample's logits are z-scored before the usual KD term, so the student
matches the teacher's logit *relations* rather than their scale:

    Z(z) = (z - mean_c z) / (std_c z + 1e-7)           (std with Bessel's correction, as the paper's code)
    ls_kd = weight * T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T))   (sum over classes, batch mean)

The CIFAR-100 setting of the paper's code (on mdistiller's KD): T = 2 (the
"base temperature"), KD weight 9, CE weight 0.1.
"""

from __future__ import annotations

import torch

from kdrun.losses.base import DistillLoss, Outputs, StepContext, check, register_loss
from kdrun.losses.kd import soft_kl


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row of ``logits``."""
    logits = logits.float()
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


@register_loss("ls_kd")
class LSKD(DistillLoss):
    def __init__(self, temperature: float = 2.0, weight: float = 9.0, **kw):
        super().__init__(**kw)
        check("temperature", temperature, temperature > 0, "a number > 0")
        check("weight", weight, weight >= 0, "a number >= 0")
        self.temperature, self.weight = temperature, weight

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"ls_kd": self.weight * soft_kl(standardize(s.logits), standardize(t.logits.detach()), self.temperature)}
