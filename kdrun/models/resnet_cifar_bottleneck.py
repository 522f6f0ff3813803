"""CIFAR ResNet-50 with bottleneck blocks (He et al., 2016): the teacher of RepDistiller/mdistiller's tables.

ImageNet ResNet-50 layout (bottlenecks [3, 4, 6, 3], widths 64..512, expansion 4)
with a 3x3 stride-1 stem and no max-pool, so 32 px inputs end at 4x4.
23.71M parameters at 100 classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdrun.models.registry import register_model


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()  # a module, so the block's pre-activation output is its input

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarBottleneckResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layers = [Bottleneck(cin if j == 0 else width * 4, width, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = width * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
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
            "stage4": "layer4",
            "pre_logits": "fc:input",
        }
        # pre-activation stage outputs (before the last block's ReLU; RepDistiller's preact=True), for AB, OFD,
        # ReviewKD; the BatchNorm before that ReLU (OFD's margins, as mdistiller's get_bn_before_relu)
        last = {i: n - 1 for i, n in enumerate(blocks, 1)}
        self.feature_points |= {f"stage{i}_preact": f"layer{i}.{last[i]}.relu:input" for i in range(1, 5)}
        self.preact_bn = {f"stage{i}_preact": f"layer{i}.{last[i]}.bn3" for i in range(1, 5)}

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


@register_model("resnet50_cifar")
def resnet50_cifar(num_classes: int, in_chans: int = 3, img_size: int = 32):
    """CIFAR ResNet-50 (bottlenecks [3, 4, 6, 3], 3x3 stride-1 stem)."""
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes, in_chans)
