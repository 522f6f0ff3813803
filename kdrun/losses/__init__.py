"""KD methods: each module registers one method by name on import."""

from kdrun.losses import (  # noqa: F401  (registers)
    ab,
    at,
    cc,
    combo,
    crd,
    dist,
    dkd,
    fitnet,
    fsp,
    ft,
    kd,
    kdsvd,
    ls_kd,
    nst,
    ofd,
    pkt,
    reviewkd,
    rkd,
    sp,
    vid,
)
from kdrun.losses.base import LOSSES, DistillLoss, Outputs, StepContext, register_loss  # noqa: F401
from kdrun.losses.kd import kd_loss, soft_kl  # noqa: F401
