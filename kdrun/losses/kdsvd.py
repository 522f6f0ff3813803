"""Self-supervised KD with singular value decomposition.

Lee, Kim & Song (ECCV 2018), "Self-supervised Knowledge Distillation Using Singular Value Decomposition".

Each feature map F [B,C,H,W] is read as a (H*W) x C matrix per sample and decomposed, F = U S V^T.
The leading right singular vectors (channel space) carry the map's knowledge: the teacher keeps
its first k, the student its first k + 3, and each teacher vector is matched by the student vector
of largest |cosine| (sign-corrected). Each set of vectors is L2-normalised over channels and
scaled by the teacher's normalised leading singular values s_t (unit norm over the k values):

    v_t = normalize(V_t[:, :k]) * s_t,   v_s = align(normalize(V_s[:, :k+3]), v_t) * s_t
    G(v, v')[c, c', j] = exp(-(v[c, j] - v'[c', j])^2 / 8)       (between consecutive layers l-1, l)
    kdsvd = weight * sum over l >= 1 of sum over (c, c', j) of (G(v_s^l, v_s^{l-1}) - G(v_t^l, v_t^{l-1}))^2 / B

Entries that are not finite (degenerate decompositions) are set to 0, as the authors' code does.
This is RepDistiller's transcription of the authors' TensorFlow code (distiller_zoo/KDSVD.py;
``CFG.KDSVD`` in mdistiller: k 1, weight 1, CE weight 1, all stages). The layers need square maps
and, at each pair, equal teacher and student channel counts; at least two pairs. The
decomposition runs in float64 (stable singular-vector gradients; the maps are small).
Difference: mdistiller reshapes the map to (C*H) x W before the SVD; kdrun follows RepDistiller
and the paper ((H*W) x C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.losses.base import (
    FeatureLoss,
    Outputs,
    StepContext,
    check,
    register_loss,
    shared_stages,
    sum_terms,
)


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_singular(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [B,C,n] normalised over channels, S [B,n] normalised over the n values) of the (HW) x C map."""
    b, c, h, w = feat.shape
    x = feat.reshape(b, c, h * w).transpose(-2, -1)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = _finite(vh.transpose(-2, -1))
    return F.normalize(v[:, :, :n], dim=1), F.normalize(_finite(s)[:, :n], dim=1)


def align(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine|, with the cosine's sign: [B,C,k]."""
    cosine = v_s.transpose(-2, -1) @ v_t  # [B, k+3, k]
    best = cosine.abs().amax(1, keepdim=True)
    mask = torch.where(best == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask


def _rbf(v: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


@register_loss("kdsvd")
class KDSVD(FeatureLoss):
    min_pairs = 2

    def __init__(self, weight: float = 1.0, k: int = 1, **kw):
        super().__init__(weight=weight, **kw)
        check("k", k, int(k) == k and k >= 1, "an integer >= 1")
        self.k = int(k)

    def default_layers(self, teacher_points, student_points):
        stages = shared_stages(teacher_points, student_points)
        return stages, list(stages)

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != 4 or len(s_shape) != 4:
            raise self.shape_error(i, t_shape, s_shape, "kdsvd needs two feature maps [C,H,W]")
        if t_shape[1] != s_shape[1]:
            raise self.shape_error(i, t_shape, s_shape, "kdsvd needs equal teacher and student channel counts")
        if t_shape[2] != t_shape[3] or s_shape[2] != s_shape[3]:
            raise self.shape_error(i, t_shape, s_shape, "kdsvd needs square maps")

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        terms, prev = [], None
        for f_s, f_t in zip(s.feats, t.feats):
            v_t, s_t = leading_singular(f_t.detach().double(), self.k)
            v_s, _ = leading_singular(f_s.double(), self.k + 3)
            v_s = align(v_s, v_t)
            v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
            if prev is not None:
                diff = (_rbf(v_s, prev[0]) - _rbf(v_t, prev[1])).pow(2)
                terms.append(_finite(diff).sum() / len(f_s))
            prev = (v_s, v_t)
        return {self.term: self.weight * sum_terms(terms).float()}
