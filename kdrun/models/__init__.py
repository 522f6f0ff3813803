"""Model zoo: every module here registers its models by name on import."""

from kdrun.models import (  # noqa: F401  (each import registers its models)
    cifar_resnet,
    mlp,
    mobilenetv2_cifar,
    resnet9,
    resnet_cifar_bottleneck,
    shufflenet_cifar,
    torchvision_models,
    vgg,
    wrn,
)
from kdrun.models.features import FeatureTap, resolve  # noqa: F401
from kdrun.models.registry import MODELS, build_model, register_model  # noqa: F401
