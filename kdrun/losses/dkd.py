"""Decoupled KD: Zhao, Cui, Song, Qiu & Liang (CVPR 2022), "Decoupled Knowledge Distillation".

With p = softmax(z / T) and g the target class, split each distribution into
the binary (target vs. rest) part b = [p_g, 1 - p_g] and the distribution over
the non-target classes p^ = softmax over c != g of z_c / T:

    TCKD = T^2 * KL(b_t || b_s),    NCKD = T^2 * KL(p^_t || p^_s)       (batch means)
    dkd  = min((epoch + 1) / warmup, 1) * (alpha * TCKD + beta * NCKD)

plus ``ce_weight * CE`` added by the stage. CIFAR-100 defaults of the paper's
code (mdistiller): alpha 1, beta 8, T 4, 20-epoch linear warm-up, CE weight 1.
The warm-up counts 1-based epochs, so epoch 0 already has weight 1/warmup;
with fewer epochs than ``warmup`` the term never reaches full weight.
Numerics: mdistiller takes log of the summed binary masses and removes the target class by
subtracting 1000 from its logit; kdrun uses logsumexp and a -1e9 mask. The values agree
(tests/test_losses_official.py) and kdrun stays finite where log(1 - p_g) would underflow.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kdrun.losses.base import DistillLoss, Outputs, StepContext, check, register_loss


def _binary_log_probs(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """log [p_g, 1 - p_g] from logits, computed with logsumexp (no log of a difference)."""
    logp = F.log_softmax(logits, dim=1)
    log_gt = logp.gather(1, gt[:, None])
    log_rest = logp.masked_fill(F.one_hot(gt, logits.shape[1]).bool(), float("-inf")).logsumexp(1, keepdim=True)
    return torch.cat([log_gt, log_rest], dim=1)


def _kl(log_p_t: torch.Tensor, log_p_s: torch.Tensor) -> torch.Tensor:
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def dkd_loss(student_logits, teacher_logits, target, alpha: float, beta: float, temperature: float):
    """alpha * TCKD + beta * NCKD (both with the T^2 factor), batch means."""
    T = temperature
    s, t = student_logits.float() / T, teacher_logits.float() / T
    tckd = _kl(_binary_log_probs(t, target), _binary_log_probs(s, target))
    gt_mask = F.one_hot(target, s.shape[1]).bool()
    nckd = _kl(F.log_softmax(t.masked_fill(gt_mask, -1e9), 1), F.log_softmax(s.masked_fill(gt_mask, -1e9), 1))
    return (alpha * tckd + beta * nckd) * T * T


@register_loss("dkd")
class DKD(DistillLoss):
    """Decoupled KD with a linear warm-up of its weight over the first ``warmup`` epochs."""

    value_rules: ClassVar[dict] = {"alpha": (lambda v: v >= 0, "a number >= 0 (the paper's CIFAR value is 1)")}

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20, **kw):
        super().__init__(**kw)
        check("alpha", alpha, alpha >= 0, "a number >= 0")
        check("beta", beta, beta >= 0, "a number >= 0")
        check("temperature", temperature, temperature > 0, "a number > 0")
        check("warmup", warmup, warmup >= 0 and float(warmup).is_integer(), "an integer >= 0 (0: no warm-up)")
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, int(warmup)

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        ramp = min((ctx.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0
        loss = dkd_loss(s.logits, t.logits.detach(), ctx.target, self.alpha, self.beta, self.temperature)
        return {"dkd": ramp * loss}
