"""KD methods: each module registers one method by name on import."""
from kdrun.losses import at, cc, combo, crd, dist, dkd, fitnet, kd, ls_kd, nst, pkt, rkd, sp  # noqa: F401  (registers)
from kdrun.losses.base import LOSSES, DistillLoss, Outputs, StepContext, register_loss  # noqa: F401
from kdrun.losses.kd import kd_loss, soft_kl  # noqa: F401
