"""Wide ResNets of Zagoruyko & Komodakis (2016), as in RepDistiller/mdistiller's CIFAR tables.

``wrn_{depth}_{k}``: pre-activation basic blocks (BN-ReLU-conv), 3 stages of
``n = (depth - 4) / 6`` blocks with widths 16k/32k/64k, then BN-ReLU, pooling and
the classifier. ``wrn_40_2`` has 2.26M parameters at 100 classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdrun.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut (1x1 conv on the activated input when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        out = F.dropout(out, self.drop, self.training) if self.drop else out
        out = self.conv2(out)
        # like the reference WRN: a projection shortcut sees the activated input, an identity one the raw input
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    def __init__(self, depth: int, k: int, num_classes: int, in_chans: int = 3, drop: float = 0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, "depth must be 6n + 4"
        n = (depth - 4) // 6
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages = []
        for i in range(3):
            cin, cout, stride = widths[i], widths[i + 1], 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    *[PreActBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, drop) for j in range(n)]
                )
            )
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[-1])  # final BN-ReLU of the pre-activation design
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # stage3 is the raw (pre-BN) output of the last block, as RepDistiller's feature f3
        self.feature_points = {
            "stem": "conv1",
            "stage1": "block1",
            "stage2": "block2",
            "stage3": "block3",
            "pre_logits": "fc:input",
        }
        # pre-activation of each stage: its output through the next BN, before that BN's ReLU (mdistiller's
        # preact_feats), for OFD / ReviewKD / AB; preact_bn: that BatchNorm (OFD's margins)
        self.preact_bn = {"stage1_preact": "block2.0.bn1", "stage2_preact": "block3.0.bn1", "stage3_preact": "bn"}
        self.feature_points |= self.preact_bn

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


def _register(depth: int, k: int) -> None:
    @register_model(f"wrn_{depth}_{k}")
    def build(num_classes: int, in_chans: int = 3, img_size: int = 32, drop: float = 0.0):
        return WideResNet(depth, k, num_classes, in_chans, drop)

    build.__doc__ = f"WideResNet-{depth}-{k} for CIFAR (kwarg drop: dropout between the convs of a block)."


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _k)
