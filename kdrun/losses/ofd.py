"""Overhaul of feature distillation: Heo, Kim, Yun, Park, Kwak & Choi (ICCV 2019),
"A Comprehensive Overhaul of Feature Distillation".

The student's pre-ReLU stage features go through a connector r (1x1 conv + BN, no ReLU) and are
matched to the teacher's pre-ReLU features (average-pooled to the student's size) with a partial
L2 distance that ignores what the teacher's ReLU would discard anyway:

    d(s, t) = (s - m)^2   where s > m and t <= m      (a negative teacher response: only push s down to m)
            + (s - t)^2   where s > t and m < t <= 0
            + (s - t)^2   where t > 0
    ofd = weight * sum over pairs i = 1..n of sum over (c, h, w) of mean over the batch of d(r(s_i), t_i) / 2^(n - i)

m is the teacher's per-channel "margin", the expectation of its negative responses, computed from
the BatchNorm before the ReLU as if the pre-activation were N(beta, gamma^2):
m = beta - |gamma| phi(beta / |gamma|) / Phi(-beta / |gamma|) when Phi(-beta / |gamma|) > 0.001, else -3 |gamma|.
This is mdistiller's ``OFD`` (CIFAR-100: weight 0.001, CE weight 1, 1x1 connector, all stages;
the connector's conv initialised N(0, 2 / C_t), BN weight 1, bias 0). Layers: the teacher's
``stageN_preact`` points and the BatchNorm it declares for each (``model.preact_bn``); the
student's ``stageN_preact`` (CIFAR ResNets, WRNs, VGGs, ShuffleNets, ResNet-50; a MobileNet's stage outputs,
linear already), else, with a warning, its post-ReLU stage outputs (e.g. torchvision's ResNets).

Deliberately unlike mdistiller's ``OFD.train()`` and the authors' ``train_with_distillation.py``, which put the
teacher in training mode while distilling: there its BatchNorm layers normalise each batch with the batch's own
statistics (and update their running statistics), so the targets t differ from the teacher's eval-mode features
by the batch's deviation from those statistics. kdrun's teacher is frozen in eval mode, as for every method (one
fixed teacher, whose logits can be cached); the margins m come from the BatchNorm's affine parameters in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.losses.base import FeatureLoss, preact_stages, register_loss
from kdrun.models.features import unwrap


def margin_from_bn(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel E[x | x < 0] for x ~ N(bias, weight^2) (the BN's affine output), -3|weight| in the far tail."""
    std, mean = bn.weight.detach().double().abs(), bn.bias.detach().double()
    normal = torch.distributions.Normal(0.0, 1.0)
    tail = normal.cdf(-mean / std)
    density = torch.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(tail > 0.001, -std * density / tail + mean, -3 * std)
    return margin.float()


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's distance, summed over (C, H, W) and averaged over the batch."""
    m = margin.view(1, -1, 1, 1)
    loss = (
        (source - m) ** 2 * ((source > m) & (target <= m))
        + (source - target) ** 2 * ((source > target) & (target > m) & (target <= 0))
        + (source - target) ** 2 * (target > 0)
    )
    return loss.mean(0).sum()


def connector(c_s: int, c_t: int) -> nn.Sequential:
    conv = nn.Conv2d(c_s, c_t, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_t))
    return nn.Sequential(conv, nn.BatchNorm2d(c_t))


@register_loss("ofd")
class OFD(FeatureLoss):
    def __init__(self, weight: float = 0.001, **kw):
        super().__init__(weight=weight, **kw)
        self.register_buffer("_margins", torch.zeros(0))  # every pair's margins, concatenated (bind_teacher)
        self._sizes: list[int] = []

    def default_layers(self, teacher_points, student_points):
        return preact_stages("ofd", teacher_points, student_points)

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if len(t_shape) != 4 or len(s_shape) != 4:
            raise self.shape_error(i, t_shape, s_shape, "ofd needs two feature maps [C,H,W]")
        return connector(s_shape[1], t_shape[1])

    def bind_teacher(self, teacher: nn.Module) -> None:
        teacher = unwrap(teacher)
        declared = getattr(teacher, "preact_bn", {})
        modules = dict(teacher.named_modules())
        margins = []
        for name in self.teacher_layers:
            bn = modules.get(declared.get(name, ""))
            if not isinstance(bn, nn.BatchNorm2d):
                raise ConfigError(
                    f"loss.layers.teacher: ofd computes its margins from the BatchNorm before the "
                    f"ReLU of {name}, which {type(teacher).__name__} does not declare; layers it "
                    f"declares: {', '.join(sorted(declared)) or 'none'}"
                )
            margins.append(margin_from_bn(bn))
        self._margins = torch.cat(margins)  # one buffer: saved with the method, moved with .to(device)
        self._sizes = [len(m) for m in margins]

    def _margin(self, i: int) -> torch.Tensor:
        start = sum(self._sizes[:i])
        return self._margins[start : start + self._sizes[i]]

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        source = self.adapters[i](f_s)
        target = F.adaptive_avg_pool2d(f_t, source.shape[-2:])
        return partial_l2(source, target, self._margin(i)) / 2 ** (len(self.adapters) - i - 1)
