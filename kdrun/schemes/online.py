"""Online distillation as deep mutual learning (Zhang et al. 2018, "Deep Mutual Learning").

K peers (any architectures, ``scheme.peers``: model names or ``{name, kwargs}``
items; default two copies of the student) train together from scratch. Peer i minimises

    CE(y, z_i) + kl_weight / (K - 1) * sum_{j != i} T^2 * KL(softmax(z_j / T) || softmax(z_i / T))

with the other peers' predictions treated as constants (detached). kdrun updates every peer at once, from one
forward pass of the batch (one module, one optimiser step; ``optim.grad_clip`` clips the cohort's gradients as one
vector); the paper's Algorithm 1 and its authors' code update the peers in turn, each from predictions recomputed
after the previous peer's step (and the code sums the KL terms, the paper averages them: the same for two peers).
The ``online`` stage's validation figures (``val_top1``, a best epoch) are those of the peers' mean logits.

Every peer is evaluated and saved (``checkpoints/peerN.pt``). The student is the first peer that is the configured
``student`` (the first peer when none is), compared with that peer's own baseline: chosen in advance, never on
a split's scores, so its KD gain is not the best of K draws (every peer's scores are in ``metrics.json``, and each
peer's validation top-1 in its ``stages.online.val_top1_by_model``). The peers train on the student stages' images
(``dataset.student_fraction``, ``dataset.student_exclude``) with fresh augmentation; with ``baseline=true`` each
peer architecture is also trained alone with CE on those images from the same initial weights (``baseline_peerN``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.data.loader import Batch
from kdrun.errors import ConfigError
from kdrun.evaluation import accuracy, predict
from kdrun.losses.base import sum_terms
from kdrun.losses.kd import soft_kl
from kdrun.schemes import model_cfg, note_unused, register_scheme
from kdrun.train import Roles
from kdrun.weights import model_identity


class Peers(nn.ModuleList):
    """The peers as one module (one optimiser, one checkpoint, one DDP/compiled module).

    ``forward(x)`` gives their mean logits; ``forward(x, each=True)`` every peer's, as a list (the training
    objective calls the possibly compiled or DDP-wrapped module this way, never iterates over it).
    """

    def forward(self, x, each: bool = False):
        logits = [p(x) for p in self]
        return logits if each else torch.stack(logits).mean(0)

    def apply_constraints(self) -> None:
        """Each peer's own weight constraints (e.g. an MLP's max-norm), as the trainer applies a model's."""
        for peer in self:
            constrain = getattr(peer, "apply_constraints", None)
            if callable(constrain):
                constrain()


class MutualObjective:
    def __init__(self, temperature: float, kl_weight: float):
        self.T, self.w = temperature, kl_weight

    def __call__(self, peers: nn.Module, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        logits = peers(batch.x, each=True)
        k, terms = len(logits), {}
        for i, z in enumerate(logits):
            terms[f"ce_peer{i + 1}"] = F.cross_entropy(z, batch.y)
            kl = sum_terms(soft_kl(z, logits[j].detach(), self.T) for j in range(k) if j != i)
            terms[f"kl_peer{i + 1}"] = self.w * kl / (k - 1)
        return terms


@register_scheme("online", pairs=lambda cfg: [])  # no KD method: the peers' own KL
def online(run) -> Roles:
    sc, stages = run.cfg.scheme, run.stages
    note_unused(run, "online", peers=True)
    items = list(sc.peers or [run.cfg.student.name, run.cfg.student.name])
    if len(items) < 2:
        raise ConfigError(f"scheme.peers={items}: give two or more peer models")
    cfgs = [model_cfg(item, run.cfg.student) for item in items]
    # peer i starts from seed + i: identical peers would learn identical functions and teach nothing
    peers = Peers([stages.build(f"scheme.peers[{i}]", c, seed_offset=i) for i, c in enumerate(cfgs)])
    data = run.data
    # the student stages' images (dataset.student_fraction, student_exclude) on fresh views, as the baselines'
    loader = data.train_loader(None, data.student_set)
    objective = MutualObjective(float(sc.temperature), float(sc.kl_weight))
    stages.fit("online", peers, objective, epochs=run.tr.epochs, loader=loader)
    val_scores, val_loader = {}, data.val_loader
    ema = stages.ema.get("online")  # trainer.ema: the EMA of every peer's weights, one Peers module
    for i, (peer, mcfg) in enumerate(zip(peers, cfgs), start=1):
        stages.export(f"peer{i}", peer, mcfg)
        if ema is not None:
            stages.ema[f"peer{i}"] = ema[i - 1]
        stages.record(f"peer{i}", peer, mcfg, None)
        if val_loader is not None:
            val_scores[f"peer{i}"] = accuracy(predict(peer, val_loader), val_loader.labels)[0]
    student_model = model_identity(run.cfg.student, data.data)  # architecture, source and options
    is_student = [model_identity(c, data.data) == student_model for c in cfgs]
    student = 1 + (is_student.index(True) if any(is_student) else 0)
    stages.log.note(
        "online",
        student_peer=student,
        val_top1_by_model=val_scores,
        chosen_by="the configured student" if any(is_student) else "first peer (none is the configured student)",
    )
    if run.cfg.baseline:
        for i, mcfg in enumerate(cfgs, start=1):
            run.ce_model(f"baseline_peer{i}", mcfg, who=f"scheme.peers[{i - 1}]", seed_offset=i - 1)
    return Roles(student=f"peer{student}", baseline=f"baseline_peer{student}" if run.cfg.baseline else None)
