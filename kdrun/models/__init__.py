"""Model zoo: every module here registers its models by name on import."""
from kdrun.models import cifar_resnet, mobilenetv2_cifar  # noqa: F401  (registers models)
from kdrun.models.features import FeatureTap, resolve  # noqa: F401
from kdrun.models.registry import MODELS, build_model, register_model  # noqa: F401
