"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    p_t = softmax(t / T),  log p_s = log_softmax(s / T)
    soft = T^2 * KL(p_t || p_s) = T^2 * sum_c p_t,c (log p_t,c - log p_s,c)   (per sample)
    loss = alpha * mean_batch(soft) + (1 - alpha) * CE(y, s)                   (CE at T = 1)

Both sides go through ``log_softmax`` (``kl_div(..., log_target=True)``), so
large logits give no inf/nan; the KL direction is teacher || student; the
reduction is a sum over classes then the batch mean; and the T^2 factor (which
keeps the soft gradients' scale independent of T) applies whatever alpha is.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.base import DistillLoss, Outputs, StepContext, check, register_loss


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch."""
    T = temperature
    log_ps = F.log_softmax(student_logits.float() / T, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return kl * (T * T)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """The Hinton KD objective: alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(y, s). Scalar, batch-mean.

    The teacher's logits are a fixed target: no gradient flows into ``teacher_logits``.
    """
    soft = soft_kl(student_logits, teacher_logits.detach(), temperature)
    hard = F.cross_entropy(student_logits.float(), target)
    return alpha * soft + (1.0 - alpha) * hard


@register_loss("kd")
class KD(DistillLoss):
    """Hinton KD; ``alpha`` weighs the soft term and ``1 - alpha`` the hard CE term."""

    value_rules: ClassVar[dict] = {"alpha": (lambda v: 0 <= v <= 1, "a number in [0, 1]")}

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, **kw):
        if "ce_weight" in kw:  # the base class would take it, and ce_weight below would ignore it
            raise ConfigError("loss.ce_weight: KD weighs its CE term by 1 - loss.alpha; set loss.alpha instead")
        super().__init__(**kw)
        check("temperature", temperature, temperature > 0, "a number > 0")
        check("alpha", alpha, 0 <= alpha <= 1, "a number in [0, 1]")
        self.temperature = temperature
        self.alpha = alpha

    @property
    def ce_weight(self) -> float:
        return 1.0 - self.alpha

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"kd": self.alpha * soft_kl(s.logits, t.logits.detach(), self.temperature)}
