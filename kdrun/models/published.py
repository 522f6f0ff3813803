"""Published parameter counts (millions) at 100 classes, 32x32 RGB input.

As quoted for the CIFAR-100 models of RepDistiller (Tian, Krishnan & Isola, 2020, "Contrastive
Representation Distillation") in the knowledge-distillation literature, under this package's names.
"""

PUBLISHED_PARAMS_M = {
    "resnet20": 0.28,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.97,
    "vgg13": 9.46,
    "resnet50_cifar": 23.71,
    "shufflenet_v1": 0.95,
    "shufflenet_v2_cifar": 1.36,
    "mbv2_cifar": 0.81,
}
