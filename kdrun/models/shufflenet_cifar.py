"""ShuffleNet V1 (Zhang et al., 2018) and V2 (Ma et al., 2018) for CIFAR, as in RepDistiller's tables.

Both use a 1x1 stem of 24 channels and no early downsampling, so 32 px inputs
reach 4x4 after three stride-2 stages.
``shufflenet_v1``: groups 3, stage widths 240/480/960, blocks 4/8/4; 0.95M params at 100 classes.
``shufflenet_v2_cifar``: width 1x, stage widths 116/232/464, 1024-channel head,
a down-sampling unit then 3/7/3 basic units per stage; 1.36M params at 100 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.registry import register_model


def channel_shuffle(x, groups: int):
    """[N, g*c, H, W] -> interleave the g groups' channels."""
    n, ch, h, w = x.shape
    return x.view(n, groups, ch // groups, h, w).transpose(1, 2).reshape(n, ch, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; stride 2 concatenates an avg-pooled shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        self.g1 = 1 if cin == 24 else groups  # the first unit after the stem is not grouped
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()  # a module, so the unit's pre-activation output is its input

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(
        self, widths: tuple[int, ...], blocks: tuple[int, ...], groups: int, num_classes: int, in_chans: int = 3
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin, stages = 24, []
        for width, n in zip(widths, blocks):
            # the stride-2 unit concatenates its input, so its branch makes width - cin channels
            units = [ShuffleV1Unit(cin, width - cin, 2, groups)] + [
                ShuffleV1Unit(width, width, 1, groups) for _ in range(n - 1)
            ]
            stages.append(nn.Sequential(*units))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.feature_points = {
            "stem": "bn1",
            "stage1": "layer1",
            "stage2": "layer2",
            "stage3": "layer3",
            "pre_logits": "fc:input",
        }
        # each stage before its last unit's ReLU (RepDistiller's preact=True), and the BatchNorm before that ReLU
        # (the last unit of a stage has stride 1: bn3 covers all its channels)
        last = {i: blocks[i - 1] - 1 for i in range(1, 4)}
        self.feature_points |= {f"stage{i}_preact": f"layer{i}.{last[i]}.relu:input" for i in range(1, 4)}
        self.preact_bn = {f"stage{i}_preact": f"layer{i}.{last[i]}.bn3" for i in range(1, 4)}

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class ShuffleV2Unit(nn.Module):
    """Split channels in half; 1x1 - depthwise 3x3 - 1x1 on one half; concatenate; shuffle; ReLU.

    The final ReLU acts on the whole shuffled map: the kept half is a ReLU's output already, so this is the
    branch's own ReLU, and the ReLU's input is RepDistiller's ``preact`` (the kept half next to the branch's
    BatchNorm output, shuffled)."""

    def __init__(self, ch: int):
        super().__init__()
        half = ch // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
        )
        self.relu = nn.ReLU()

    def forward(self, x):
        keep, work = x.chunk(2, dim=1)
        return self.relu(channel_shuffle(torch.cat([keep, self.branch(work)], 1), 2))


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: two branches on the full input, each producing half the output channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
        )
        self.right = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
        )

    def forward(self, x):
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self, widths: tuple[int, ...], blocks: tuple[int, ...], head: int, num_classes: int, in_chans: int = 3
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin, stages = 24, []
        for width, n in zip(widths, blocks):
            stages.append(nn.Sequential(ShuffleV2Down(cin, width), *[ShuffleV2Unit(width) for _ in range(n)]))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(cin, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)
        self.feature_points = {
            "stem": "bn1",
            "stage1": "layer1",
            "stage2": "layer2",
            "stage3": "layer3",
            "pre_logits": "fc:input",
        }
        # each stage before its last unit's ReLU (RepDistiller's preact=True); no BatchNorm covers all of its
        # channels (half are the kept input), so none is declared for OFD's margins
        self.feature_points |= {f"stage{i}_preact": f"layer{i}.{blocks[i - 1]}.relu:input" for i in range(1, 4)}

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("shufflenet_v1")
def shufflenet_v1(num_classes: int, in_chans: int = 3, img_size: int = 32):
    """RepDistiller's ShuffleV1: groups 3, widths 240/480/960, units 4/8/4."""
    return _init(ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_chans))


@register_model("shufflenet_v2_cifar")
def shufflenet_v2_cifar(num_classes: int, in_chans: int = 3, img_size: int = 32):
    """RepDistiller's ShuffleV2 (1x): widths 116/232/464, 3/7/3 basic units after each down unit, head 1024."""
    return _init(ShuffleNetV2((116, 232, 464), (3, 7, 3), 1024, num_classes, in_chans))
