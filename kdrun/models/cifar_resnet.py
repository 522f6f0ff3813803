"""CIFAR ResNets of He et al. (2016), as in RepDistiller/mdistiller's benchmark tables.

``resnet{8,14,20,32,44,56,110}``: 3 stages of basic blocks, widths 16/32/64;
``resnet8x4`` / ``resnet32x4``: widths 32/64/128/256 (x4 stem). Depth = 6n + 2.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdrun.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()  # a module so that its input (the block's pre-activation) is a feature point

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, ...], num_classes: int, in_chans: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n + 2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin, stages = widths[0], []
        for i, w in enumerate(widths[1:]):
            blocks = [BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.feature_points = {
            "stem": "bn1",
            "stage1": "layer1",
            "stage2": "layer2",
            "stage3": "layer3",
            "pre_logits": "fc:input",
        }
        # pre-activation stage outputs (before the last block's ReLU), for OFD / ReviewKD teachers
        self.feature_points |= {f"stage{i + 1}_preact": f"layer{i + 1}.{n - 1}.relu:input" for i in range(3)}
        # the BatchNorm before each pre-activation point's ReLU (OFD's margins, as mdistiller's get_bn_before_relu)
        self.preact_bn = {f"stage{i + 1}_preact": f"layer{i + 1}.{n - 1}.bn2" for i in range(3)}

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _register(name: str, depth: int, widths: tuple[int, ...]) -> None:
    @register_model(name)
    def build(num_classes: int, in_chans: int = 3, img_size: int = 32):
        return CifarResNet(depth, widths, num_classes, in_chans)

    build.__doc__ = f"CIFAR ResNet, depth {depth}, widths {widths}."


for _d in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_d}", _d, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))
