"""Knowledge review: Chen, Liu, Zhao & Jia (CVPR 2021), "Distilling Knowledge via Knowledge Review".

The student's features of every level l = 1..L (its stages, then the pooled ``pre_logits``
vector as a 1x1 map) are fused from the deepest level down by attention-based fusion (ABF)
modules, so that each level's output "reviews" the deeper ones; each output is matched to the
teacher's feature of the same level (pre-activation stage maps when the teacher exposes
``stageN_preact`` points, then its ``pre_logits``) by the hierarchical context loss (HCL):

    x_L' = conv1x1_bn(x_L);             o_L = conv3x3_bn(resize(x_L', H_t^L))
    x_l' = a_l * conv1x1_bn(x_l) + b_l * up(x_{l+1}'),  [a_l, b_l] = sigmoid(conv1x1([conv1x1_bn(x_l), up(x_{l+1}')]))
    o_l  = conv3x3_bn(resize(x_l', H_t^l))               (up, resize: nearest; x_{l+1}' is the fused map of level l+1)
    HCL(o, t) = (mse(o, t) + sum over p in {4, 2, 1}, p < H, of 2^-j mse(pool_p(o), pool_p(t))) / (1 + sum 2^-j)
    reviewkd = weight * min((epoch + 1) / warmup, 1) * sum over levels of HCL(o_l, t_l)

(mse: mean over elements; pool_p: adaptive average pooling to p x p; j counts the pyramid
levels used, 1, 2, 3). The fused width is min(512, C_s^L). This is mdistiller's
``ReviewKD``: CE weight 1, weight 1, 20 warm-up epochs counted 1-based as for DKD, student features after
their activation (``STU_PREACT`` False). The ABFs train with the student. Teacher models
without ``stageN_preact`` points are matched on their post-activation stage outputs instead. The CIFAR-100
presets set the per-pair weights of the authors' own script (``CIFAR-100/script/reviewKD.sh``: 5, 8, 0.6).

Where kdrun (like mdistiller) differs from the authors' ``train.py``, deliberately: their warm-up counts epochs
from 0 (``min(1, epoch / 20)``: weight 0 in the first epoch, one epoch behind this one), and their teacher is
never put in eval mode, so its BatchNorm layers normalise with each batch's statistics (and update their running
ones) while it gives its targets; kdrun's teacher is always frozen in eval mode (its cached logits and every
other method assume one fixed teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.base import (
    FeatureLoss,
    Outputs,
    StepContext,
    check,
    register_loss,
    shared_stages,
    sum_terms,
)


class ABF(nn.Module):
    """One level's attention-based fusion: 1x1 conv + BN, fusion with the deeper level, 3x3 conv + BN."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        first, second = nn.Conv2d(c_in, c_mid, 1, bias=False), nn.Conv2d(c_mid, c_out, 3, 1, 1, bias=False)
        self.conv1 = nn.Sequential(first, nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(second, nn.BatchNorm2d(c_out))
        self.att_conv = nn.Sequential(nn.Conv2d(c_mid * 2, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(first.weight, a=1)
        nn.init.kaiming_uniform_(second.weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None, out_size) -> tuple[torch.Tensor, torch.Tensor]:
        """(this level's output, its fused map for the next, shallower level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            assert deeper is not None, "a fusing level always has a deeper one"
            deeper = F.interpolate(deeper, x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, deeper], dim=1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        fused = x
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), fused


def hcl(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss of one level: MSE plus MSEs of 4x4, 2x2, 1x1 poolings (smaller than the map)."""
    loss, weight, total = F.mse_loss(out, target), 1.0, 1.0
    for p in (4, 2, 1):
        if p >= out.shape[-2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(out, p), F.adaptive_avg_pool2d(target, p))
        total += weight
    return loss / total


def _as_map(f: torch.Tensor) -> torch.Tensor:
    return f[:, :, None, None] if f.dim() == 2 else f


@register_loss("reviewkd")
class ReviewKD(FeatureLoss):
    fixed_when_built = ("max_mid_channels",)

    def __init__(self, weight: float = 1.0, warmup: int = 20, max_mid_channels: int = 512, **kw):
        super().__init__(weight=weight, **kw)
        check("warmup", warmup, int(warmup) == warmup and warmup >= 0, "an integer >= 0 (0: no warm-up)")
        check(
            "max_mid_channels",
            max_mid_channels,
            int(max_mid_channels) == max_mid_channels and max_mid_channels > 0,
            "an integer > 0",
        )
        self.warmup, self.max_mid_channels = int(warmup), int(max_mid_channels)
        self.abfs = nn.ModuleList()

    def default_layers(self, teacher_points, student_points):
        stages = shared_stages(teacher_points, student_points)
        if "pre_logits" not in teacher_points or "pre_logits" not in student_points:
            raise ConfigError(
                "loss.layers: reviewkd uses the stages and pre_logits by default but a model has no "
                "pre_logits; set loss.layers.teacher=[...] and loss.layers.student=[...]"
            )
        teacher = [f"{s}_preact" if f"{s}_preact" in teacher_points else s for s in stages]
        return teacher + ["pre_logits"], stages + ["pre_logits"]

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) not in (2, 4) or len(s_shape) not in (2, 4):
            raise self.shape_error(i, t_shape, s_shape, "reviewkd needs feature maps [C,H,W] or vectors [C]")

    def build(self, t_shapes, s_shapes, num_samples):
        super().build(t_shapes, s_shapes, num_samples)
        s_ch = [int(s[1]) for s in s_shapes]
        t_ch = [int(t[1]) for t in t_shapes]
        mid = min(self.max_mid_channels, s_ch[-1])
        last = len(s_ch) - 1
        self.abfs = nn.ModuleList(ABF(c_s, mid, c_t, fuse=i < last) for i, (c_s, c_t) in enumerate(zip(s_ch, t_ch)))

    def forward(self, s: Outputs, t: Outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        s_feats = [_as_map(f.float()) for f in s.feats]
        t_feats = [_as_map(f.detach().float()) for f in t.feats]
        terms, deeper = [], None
        for level in reversed(range(len(s_feats))):
            out, deeper = self.abfs[level](s_feats[level], deeper, t_feats[level].shape[-2:])
            terms.append(hcl(out, t_feats[level]))
        ramp = min((ctx.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0
        return {self.term: self.weight * ramp * sum_terms(terms)}
