"""The student stage: its trainable module (student + KD method) and its objective.

    terms = {"ce": ce_weight * CE(y, s)} | method(student outputs, teacher outputs)

:class:`StudentStep` is the one trainable module of the stage: the student and the
method (its adapters, heads and memory banks) in one ``nn.Module`` whose forward
returns the loss terms, so DDP reduces every gradient of the stage and
``torch.compile`` compiles the whole student side. Teacher logits come from the
logit cache (indexed by sample and view) when the method needs only logits;
otherwise the frozen teacher runs outside that module, in eval mode and without
autograd. Features of both networks are captured by hooks registered once per
stage on the original modules (:class:`Distill` is a context manager that
removes them at the end of the stage).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import distributed
from kdrun.cache import FP16_MAX, LogitCache
from kdrun.data.loader import Batch
from kdrun.engine import autocast
from kdrun.errors import KdrunError
from kdrun.losses.base import DistillLoss, Outputs, StepContext
from kdrun.models.features import FeatureTap


def freeze(model: nn.Module) -> nn.Module:
    """``model`` as a teacher: eval mode (BatchNorm running statistics, no dropout) and no autograd."""
    return model.eval().requires_grad_(False)


class StudentStep(nn.Module):
    """The student plus the KD method, as one module: ``forward`` gives the stage's weighted loss terms."""

    def __init__(self, student: nn.Module, method: DistillLoss, epochs: int, num_samples: int):
        super().__init__()
        self.student = student
        self.method = method
        self.epochs, self.num_samples = epochs, num_samples
        self.tap = FeatureTap(student, method.student_layers)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        t_logits: torch.Tensor,
        t_feats: list[torch.Tensor],
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        logits = self.student(x)
        s = Outputs(logits, [self.tap.features[n] for n in self.method.student_layers])
        ctx = StepContext(y, index, epoch, self.epochs, self.num_samples)
        terms = {}
        if self.method.ce_weight > 0:
            terms["ce"] = self.method.ce_weight * F.cross_entropy(logits, y)
        terms.update(self.method(s, Outputs(t_logits, t_feats), ctx))
        return terms


class Distill:
    """The student stage's objective; ``module`` is the stage's trainable :class:`StudentStep`.

    The teacher's outputs come from ``teacher`` run online on every batch, or from a :class:`LogitCache`
    (logit-only methods) that the teacher fills on first use: only the batch's (sample, view) pairs not yet
    in the cache go through the teacher. ``teacher_precision``: autocast of the teacher's forward (fp32,
    bf16, fp16); None: the step's own.

    Use as a context manager around the stage: the feature hooks are registered on entry and removed on exit.
    """

    def __init__(
        self,
        method: DistillLoss,
        student: nn.Module,
        epochs: int,
        num_samples: int,
        teacher: nn.Module | None = None,
        cache: LogitCache | None = None,
        teacher_precision: str | None = None,
    ):
        assert teacher is not None or (cache is not None and cache.complete), "give a teacher or a complete cache"
        self.method = method
        self.module = StudentStep(student, method, epochs, num_samples)
        self.teacher = freeze(teacher) if teacher is not None else None
        self.cache = cache
        self.teacher_tap = FeatureTap(teacher, method.teacher_layers) if teacher is not None and cache is None else None
        self.teacher_precision = teacher_precision

    def __enter__(self) -> Self:
        self.module.tap.attach()
        if self.teacher_tap is not None:
            self.teacher_tap.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.module.tap.close()
        if self.teacher_tap is not None:
            self.teacher_tap.close()
        if self.cache is not None:
            self.cache.flush()

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        if self.teacher.training:  # whoever trained this model last: a teacher always runs in eval mode
            freeze(self.teacher)
        precision = self.teacher_precision
        with torch.no_grad(), autocast(x.device, precision) if precision else nullcontext():
            return self.teacher(x)

    def teacher_outputs(self, batch: Batch) -> Outputs:
        if self.cache is None:
            logits = self._teacher(batch.x)
            assert self.teacher_tap is not None
            return Outputs(logits, [self.teacher_tap.features[n] for n in self.method.teacher_layers])
        index, view = batch.on_host()  # no device-to-host copy: the loader keeps them
        logits, have = self.cache.lookup(index, view)
        if not bool(have.all()):  # first use of some (sample, view): the teacher runs on those images only
            miss = (~have).nonzero().squeeze(1)
            fresh = self._teacher(batch.x[miss.to(batch.x.device)])
            try:
                logits[miss] = self.cache.write(index[miss], view[miss], fresh)
            except KdrunError as e:  # a logit fp16 cannot hold: alone, raised here; with several workers, by
                distributed.defer(e)  # every one at the engine's next agreement, before any checkpoint
                # finite until then, so that no other check (a non-finite loss) speaks first
                logits[miss] = fresh.float().cpu().clamp(-FP16_MAX, FP16_MAX).nan_to_num()
        return Outputs(logits.to(batch.x.device, non_blocking=True))

    def __call__(self, net: nn.Module, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        """``net``: the stage's trainable module, possibly DDP-wrapped and compiled."""
        t = self.teacher_outputs(batch)
        return net(batch.x, batch.y, batch.index, t.logits, t.feats, epoch)


@torch.no_grad()
def probe_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Size]:
    """Shapes of the named features for input ``x`` (one forward pass, eval mode)."""
    was = model.training
    model.eval()
    with FeatureTap(model, names) as tap:
        model(x)
    model.train(was)
    return [tap.features[n].shape for n in names]
