"""Model zoo: every module of this package is imported here, and each registers its models by name on import,
so a new model family is its own module plus a ``configs/student/<name>.yaml`` per model (and a
``configs/teacher/<name>.yaml`` for ``teacher=<name>``; ``teacher.name=<name>`` needs none), listed nowhere else."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from kdrun.models.features import FeatureTap, resolve  # noqa: E402, F401
from kdrun.models.registry import MODELS, build_model, register_model  # noqa: E402, F401
