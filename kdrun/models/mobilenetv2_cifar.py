"""MobileNetV2 (Sandler et al., 2018) for small images.

``mbv2_cifar``: RepDistiller's ``mobile_half`` (expansion 6, width 0.5, stride-2
stem, 1280-channel head), 0.81M parameters at 100 classes; ``student.kwargs``
``width`` and ``head`` make it narrower (``{width: 0.25, head: 512}``: 0.18M
parameters, 4.6 MFLOPs at 10 classes, the student of ``experiment=cifar10_cpu``).
``mbv2_tiny``: three inverted-residual blocks at about width 0.25 (stride-1 stem,
256-channel head), about 17K parameters at 10 classes; the default student on
8x8 digits, shallow enough to be faster than resnet20 at batch 1 on a CPU.

Stride-2 layers whose input is already at ``min_size`` pixels run at stride 1, so
any input from 8x8 up works (final maps are never below ``min_size``).
"""

from __future__ import annotations

from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.registry import register_model


def conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand  # expands even at ratio 1, like the reference
        self.conv = nn.Sequential(
            conv_bn_relu(cin, mid, 1),
            conv_bn_relu(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """``setting``: rows (expand t, channels c, blocks n, first stride s); one ``blocks[i]`` per row.

    ``stages`` lists the rows whose output is stage1, stage2, ...
    """

    def __init__(
        self,
        setting,
        stem: int,
        head: int,
        stem_stride: int,
        stages: tuple[int, ...],
        num_classes: int,
        in_chans: int = 3,
        img_size: int = 32,
        min_size: int = 1,
    ):
        super().__init__()
        size = img_size

        def stride(s: int) -> int:  # a stride-2 layer only while the map stays >= min_size
            nonlocal size
            if s == 2 and size // 2 >= min_size:
                size = (size + 1) // 2
                return 2
            return 1

        self.conv1 = conv_bn_relu(in_chans, stem, 3, stride(stem_stride))
        cin, blocks = stem, []
        for t, c, n, s in setting:
            first = stride(s)
            blocks.append(
                nn.Sequential(*[InvertedResidual(cin if j == 0 else c, c, first if j == 0 else 1, t) for j in range(n)])
            )
            cin = c
        self.blocks = nn.ModuleList(blocks)
        self.conv2 = conv_bn_relu(cin, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.feature_points = {"stem": "conv1"} | {f"stage{i + 1}": f"blocks.{r}" for i, r in enumerate(stages)}
        self.feature_points["pre_logits"] = "fc:input"
        # an inverted residual block ends linear (no activation after its projection): a stage's output is its
        # own pre-activation feature (AB, OFD, ReviewKD)
        self.feature_points |= {f"stage{i + 1}_preact": f"blocks.{r}" for i, r in enumerate(stages)}
        # the BatchNorm of each stage's last projection (OFD's margins, as mdistiller's get_bn_before_relu)
        self.preact_bn = {
            f"stage{i + 1}_preact": f"blocks.{r}.{len(blocks[r]) - 1}.conv.3" for i, r in enumerate(stages)
        }

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.pool(self.conv2(x)).flatten(1))


# RepDistiller's MobileNetV2 rows (t, c, n, s); mobile_half uses t=6 and channels int(c * 0.5)
_CIFAR = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


@register_model("mbv2_cifar")
def mbv2_cifar(num_classes: int, in_chans: int = 3, img_size: int = 32, width: float = 0.5, head: int = 1280):
    """RepDistiller's mobile_half: MobileNetV2, expansion 6, width 0.5; ``width`` scales every row's
    channels (at least 8), ``head`` is the last 1x1 convolution's width."""
    if not 0 < width <= 4:
        raise ConfigError(f"kwargs.width={width}: must be in (0, 4]")
    if head < 1:
        raise ConfigError(f"kwargs.head={head}: must be a positive channel count")
    setting = [(t, max(8, int(c * width)), n, s) for t, c, n, s in _CIFAR]
    # stages as RepDistiller's features f1..f4: after rows 1, 2, 4 and 6
    return MobileNetV2(setting, 16, head, 2, (1, 2, 4, 6), num_classes, in_chans, img_size)


@register_model("mbv2_tiny")
def mbv2_tiny(num_classes: int, in_chans: int = 3, img_size: int = 32):
    """A tiny MobileNetV2 (about width 0.25, 3 blocks) that keeps maps >= 2x2 (8x8 input: 8 -> 4 -> 2)."""
    setting = [(1, 8, 1, 1), (4, 16, 1, 2), (4, 32, 1, 2)]
    return MobileNetV2(setting, 8, 256, 1, (0, 1, 2), num_classes, in_chans, img_size, min_size=2)
