"""KD methods: every module of this package is imported here, and each registers its method by name on import,
so a new method is its own module plus its ``configs/loss/<name>.yaml``, listed nowhere else."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from kdrun.losses.base import LOSSES, DistillLoss, Outputs, StepContext, register_loss  # noqa: E402, F401
from kdrun.losses.kd import kd_loss, soft_kl  # noqa: E402, F401
