"""ResNet-9 for small images (Page, "How to train your ResNet", Myrtle.ai 2018; the DAWNBench CIFAR-10 entry).

Wide and shallow: per multiply-add it trains faster on a CPU than the thin CIFAR ResNets (2 cores,
bf16: 593 img/s at width 32 against resnet20's 948, for 2.3x its multiply-adds); Page reports 94 %
CIFAR-10 in 24 epochs at full width. ``resnet9``: a 3x3 stem of ``width`` channels, then three stages of a 3x3
convolution that doubles the channels and a 2x2 max-pool; stages 1 and 3 end in a residual block
of two 3x3 convolutions. Global max-pool and a linear classifier whose output is scaled by
``logit_scale`` (0.125 in Page's recipe, which keeps the initial logits small).
``width=64`` is Page's network (6.6M parameters, 0.38 G multiply-adds at 32x32); ``width=32`` is a quarter
of its cost (1.6M parameters, 95 M multiply-adds), the teacher of ``experiment=cifar10_cpu``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.registry import register_model


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    """x + f(x), f = two conv-BN-ReLU layers."""

    def __init__(self, channels: int):
        super().__init__()
        self.res1 = conv_bn_relu(channels, channels)
        self.res2 = conv_bn_relu(channels, channels)

    def forward(self, x):
        return x + self.res2(self.res1(x))


class Stage(nn.Sequential):
    """conv-BN-ReLU to ``cout`` channels, 2x2 max-pool, then a residual block when ``residual``."""

    def __init__(self, cin: int, cout: int, residual: bool):
        super().__init__(conv_bn_relu(cin, cout), nn.MaxPool2d(2), *([Residual(cout)] if residual else []))


class ResNet9(nn.Module):
    def __init__(self, width: int, num_classes: int, in_chans: int = 3, logit_scale: float = 0.125):
        super().__init__()
        self.stem = conv_bn_relu(in_chans, width)
        self.layer1 = Stage(width, 2 * width, residual=True)
        self.layer2 = Stage(2 * width, 4 * width, residual=False)
        self.layer3 = Stage(4 * width, 8 * width, residual=True)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        self.logit_scale = logit_scale
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.feature_points = {
            "stem": "stem",
            "stage1": "layer1",
            "stage2": "layer2",
            "stage3": "layer3",
            "pre_logits": "fc:input",
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1)) * self.logit_scale


@register_model("resnet9")
def resnet9(num_classes: int, in_chans: int = 3, img_size: int = 32, width: int = 64, logit_scale: float = 0.125):
    """Page's ResNet-9 (DAWNBench CIFAR-10); ``width``: the stem's channels (64 in the original; the
    stages have 2x, 4x and 8x), ``logit_scale``: the classifier's output scale (0.125 in the original)."""
    if width < 1:
        raise ConfigError(f"kwargs.width={width}: must be a positive channel count")
    if logit_scale <= 0:
        raise ConfigError(f"kwargs.logit_scale={logit_scale}: must be > 0")
    return ResNet9(width, num_classes, in_chans, logit_scale)
