"""Online distillation as deep mutual learning (Zhang et al. 2018, "Deep Mutual Learning").

K peers (any architectures, ``scheme.peers``: model names or ``{name, kwargs}``
items; default two copies of the student) train together from scratch. Peer i minimises

    CE(y, z_i) + kl_weight / (K - 1) * sum_{j != i} T^2 * KL(softmax(z_j / T) || softmax(z_i / T))

with the other peers' predictions treated as constants (detached), as in the
paper's alternating updates. Every peer is evaluated and saved
(``checkpoints/peerN.pt``); the student is the peer with the best validation
accuracy when ``trainer.val_fraction > 0``, else the first peer (never chosen
on the test set). The peers train on the student stages' images (``dataset.student_fraction``,
``dataset.student_exclude``) with fresh augmentation; with ``baseline=true`` each peer architecture is also
trained alone with CE on those images from the same initial weights (``baseline_peerN``).
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
from kdrun.schemes import model_cfg, register_scheme
from kdrun.train import Roles


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


@register_scheme("online")
def online(run) -> Roles:
    sc, stages = run.cfg.scheme, run.stages
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
    val_scores, val_loader = [], data.val_loader
    ema = stages.ema.get("online")  # trainer.ema: the EMA of every peer's weights, one Peers module
    for i, (peer, mcfg) in enumerate(zip(peers, cfgs), start=1):
        stages.export(f"peer{i}", peer, mcfg)
        if ema is not None:
            stages.ema[f"peer{i}"] = ema[i - 1]
        stages.record(f"peer{i}", peer, mcfg, None)
        if val_loader is not None:
            val_scores.append(accuracy(predict(peer, val_loader), val_loader.labels)[0])
    best = 1 + (max(range(len(val_scores)), key=val_scores.__getitem__) if val_scores else 0)
    stages.log.note(
        "online",
        student_peer=best,
        val_top1_by_model={f"peer{i}": v for i, v in enumerate(val_scores, start=1)},
        chosen_by="validation accuracy" if val_scores else "first peer (no validation split)",
    )
    if run.cfg.baseline:
        for i, mcfg in enumerate(cfgs, start=1):
            run.ce_model(f"baseline_peer{i}", mcfg, who=f"scheme.peers[{i - 1}]", seed_offset=i - 1)
    return Roles(student=f"peer{best}", baseline=f"baseline_peer{best}" if run.cfg.baseline else None)
