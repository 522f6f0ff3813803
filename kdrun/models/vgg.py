"""VGG (Simonyan & Zisserman, 2015) with batch norm for CIFAR, as in RepDistiller/mdistiller's tables.

No hidden FC layers. Five conv blocks (3x3 conv-BN-ReLU), 2x2 max-pooling after the first three (and
the fourth for inputs of 64 px or more), global average pooling, one Linear. Feature points as RepDistiller's
``feat`` list: the first block is ``stem`` (its f0, which no method there distils), blocks 2-5 are
``stage1``-``stage4`` (f1-f4), so FitNet's ``stage2`` and AT's stages 1-4 are the maps the authors matched;
``stageN_preact`` are the same maps before their last ReLU (RepDistiller's ``preact=True``).
``vgg8`` has one conv per stage; ``vgg11/13/16/19`` follow VGG configs A/B/D/E.
``vgg13`` has 9.46M parameters at 100 classes, ``vgg8`` 3.97M.
"""

from __future__ import annotations

from torch import nn

from kdrun.models.registry import register_model

CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _stage(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers = []
    for w in widths:  # conv keeps its bias, as in the reference
        layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, cfg, num_classes: int, in_chans: int = 3, img_size: int = 32):
        super().__init__()
        cins = (in_chans,) + tuple(s[-1] for s in cfg[:-1])
        self.block1, self.block2, self.block3, self.block4, self.block5 = (_stage(c, s) for c, s in zip(cins, cfg))
        # 3 pools (4 from 64 px up), but never pool an input below 1x1
        n_pools = min(4 if img_size >= 64 else 3, max(img_size.bit_length() - 1, 0))
        self.pool1, self.pool2, self.pool3, self.pool4 = (
            nn.MaxPool2d(2) if i < n_pools else nn.Identity() for i in range(4)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg[-1][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # RepDistiller's feature list: f0 (block1 here, the stem) is never distilled, f1..f4 are blocks 2..5
        self.feature_points = (
            {"stem": "block1"} | {f"stage{i}": f"block{i + 1}" for i in range(1, 5)} | {"pre_logits": "fc:input"}
        )
        # each stage before its last ReLU (RepDistiller's preact features; AB, OFD, ReviewKD) and the BatchNorm
        # before that ReLU (OFD's margins, as mdistiller's get_bn_before_relu)
        last = {i: len(cfg[i]) * 3 - 1 for i in range(1, 5)}  # conv, BN, ReLU per layer
        self.feature_points |= {f"stage{i}_preact": f"block{i + 1}.{last[i]}:input" for i in range(1, 5)}
        self.preact_bn = {f"stage{i}_preact": f"block{i + 1}.{last[i] - 1}" for i in range(1, 5)}

    def forward(self, x):
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        x = self.block5(self.pool4(self.block4(x)))
        return self.fc(self.pool(x).flatten(1))


def _register(name: str) -> None:
    @register_model(name)
    def build(num_classes: int, in_chans: int = 3, img_size: int = 32):
        return VGG(CONFIGS[name], num_classes, in_chans, img_size)

    build.__doc__ = f"CIFAR {name} with batch norm, {'/'.join(str(len(s)) for s in CONFIGS[name])} convs per stage."


for _name in CONFIGS:
    _register(_name)
