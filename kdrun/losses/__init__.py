"""KD methods: each module registers one method by name on import."""
from kdrun.losses import kd  # noqa: F401  (registers)
from kdrun.losses.base import LOSSES, DistillLoss, Outputs, StepContext, register_loss  # noqa: F401
from kdrun.losses.kd import kd_loss, soft_kl  # noqa: F401
