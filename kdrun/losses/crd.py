"""Contrastive representation distillation.

Tian, Krishnan & Isola (ICLR 2020), "Contrastive Representation Distillation".

Student and teacher penultimate features are embedded by trainable linear maps
and L2-normalised (s_i, t_i, ``embed_dim`` 128). Two memory banks hold one
momentum-averaged embedding per training sample (M_s, M_t). For each sample i,
its own slot plus K negatives j drawn uniformly from the training set give

    h(a, m) = exp(a . m / tau) / Z,   Z fixed from the first batch's mean score times N
    P_pos = h(s_i, M_t[i]),  P_neg = h(s_i, M_t[j])   (and symmetrically t_i against M_s)
    nce  = -(1/B) sum_i [ log(P_pos / (P_pos + K/N)) + sum_j log((K/N) / (P_neg + K/N)) ]
    crd  = weight * (nce_student_anchor + nce_teacher_anchor)

after which M[i] <- normalise(m * M[i] + (1 - m) * embedding_i) (momentum m).
RepDistiller defaults: weight 0.8, K = 16384, tau = 0.07, m = 0.5, N = training-set size.

K is clamped to N - 1 when the training set has fewer than K + 1 samples (a
small run cannot draw 16384 distinct negatives meaningfully); negatives are
drawn uniformly (RepDistiller's default CIFAR mode draws them from other
classes, here a negative may share the anchor's class or, rarely, be itself).

``negatives``: ``per_anchor`` (RepDistiller's, the default) draws K negatives for each
anchor, i.e. gathers a [B, K, embed_dim] block of each bank every step (1 GB at B = 128,
K = 16384): fine on a GPU, about 6 s a step on one CPU core. ``shared`` draws one set of K
for the whole batch (as MoCo's queue does) and scores it with one [B, d] x [d, K] product:
each anchor's negatives are still K uniform draws, so each anchor's expected loss is the
same; only the draws of anchors in one batch are no longer independent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import distributed
from kdrun.errors import ConfigError
from kdrun.losses.adapters import Embed
from kdrun.losses.base import RelationLoss, check, register_loss

EPS = 1e-7


def nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss of [B, 1+K] normalised scores (column 0: the positive), summed over pairs, batch mean."""
    k = scores.shape[1] - 1
    noise = k / num_samples
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(log_pos.sum() + log_neg.sum()) / len(scores)


@register_loss("crd")
class CRD(RelationLoss):
    fixed_when_built = ("embed_dim", "nce_k", "negatives")
    max_pairs = 1
    memory_s: torch.Tensor  # buffers (build): the memory banks of student and teacher embeddings
    memory_t: torch.Tensor
    z: torch.Tensor  # the two banks' normalising constants, set from the first batch

    def __init__(
        self,
        weight: float = 0.8,
        embed_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        negatives: str = "per_anchor",
        **kw,
    ):
        super().__init__(weight=weight, **kw)
        check("embed_dim", embed_dim, int(embed_dim) == embed_dim and embed_dim > 0, "an integer > 0")
        check("nce_k", nce_k, int(nce_k) == nce_k and nce_k > 0, "an integer > 0")
        check("nce_t", nce_t, nce_t > 0, "a number > 0")
        check("nce_m", nce_m, 0 <= nce_m < 1, "a number in [0, 1)")
        check("negatives", negatives, negatives in ("per_anchor", "shared"), "per_anchor or shared")
        self.negatives = negatives
        self.embed_dim, self.nce_k, self.nce_t, self.nce_m = int(embed_dim), int(nce_k), nce_t, nce_m
        self.k = self.nce_k
        self.embed_t = nn.Identity()
        self.z_known = [False, False]  # z[i] set (from the first batch, or a checkpoint's buffer)

    def build_pair(self, i, t_shape, s_shape, num_samples):
        if num_samples < 2:
            raise ConfigError(f"loss.nce_k: crd needs a training set of at least 2 samples, got {num_samples}")
        self.k = min(self.nce_k, num_samples - 1)
        self.num_samples = num_samples
        stdv = 1.0 / math.sqrt(self.embed_dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(num_samples, self.embed_dim).mul_(2 * stdv).add_(-stdv))
        # Z of the student- and of the teacher-anchored scores; -1: not set yet
        self.register_buffer("z", torch.full((2,), -1.0))
        self.z_known = [False, False]
        self.embed_t = Embed(math.prod(t_shape[1:]), self.embed_dim, normalize=True)
        return Embed(math.prod(s_shape[1:]), self.embed_dim, normalize=True)

    def sample_negatives(self, batch: int, device) -> torch.Tensor:
        """[batch, K] training-set positions drawn uniformly ([1, K] with ``negatives=shared``)."""
        rows = 1 if self.negatives == "shared" else batch
        return torch.randint(0, self.num_samples, (rows, self.k), device=device)

    def _scores(
        self, anchor: torch.Tensor, memory: torch.Tensor, index: torch.Tensor, neg: torch.Tensor, which: int
    ) -> torch.Tensor:
        """exp(anchor . memory[j] / tau) / Z for j = the anchor's own slot, then its K negatives: [B, 1+K]; Z set
        once from the first batch. ``neg``: [B, K] positions, or [1, K] shared by the batch."""
        pos = (anchor * memory[index]).sum(1, keepdim=True)
        if self.negatives == "shared":
            neg_dot = anchor @ memory[neg[0]].T
        else:
            neg_dot = torch.einsum("bd,bkd->bk", anchor, memory[neg])
        out = torch.exp(torch.cat([pos, neg_dot], dim=1) / self.nce_t)
        if not self.z_known[which]:  # a Python flag: no data-dependent branch (a graph break) after the first step
            if self.z[which] < 0:  # data parallel: the mean over every rank's shard, so all ranks share one Z
                self.z[which] = distributed.all_sum(out.mean().detach()) / distributed.size() * self.num_samples
            self.z_known[which] = True
        return out / self.z[which].clone()

    @torch.no_grad()
    def _update(self, memory: torch.Tensor, index: torch.Tensor, emb: torch.Tensor) -> None:
        memory[index] = F.normalize(memory[index] * self.nce_m + emb.detach() * (1 - self.nce_m), dim=1)

    def pair_loss(self, i, f_s, f_t, ctx) -> torch.Tensor:
        s, t = self.adapters[0](f_s), self.embed_t(f_t)
        index = ctx.index.to(s.device)
        neg = self.sample_negatives(len(index), s.device)
        loss = nce_loss(self._scores(s, self.memory_t, index, neg, 0), self.num_samples) + nce_loss(
            self._scores(t, self.memory_s, index, neg, 1), self.num_samples
        )
        # data parallel: every rank applies the whole global batch's updates, so all ranks hold the same banks
        index, s, t = (distributed.all_gather_cat(v.detach()) for v in (index, s, t))
        self._update(self.memory_s, index, s)
        self._update(self.memory_t, index, t)
        return loss
