"""The student stage's objective: CE plus a KD method's terms.

    terms = {"ce": ce_weight * CE(y, s)} | method(student outputs, teacher outputs)

Teacher logits come from the logit cache (indexed by sample and view) when the
method needs only logits; otherwise the frozen teacher runs online, in eval
mode and without autograd, and both networks' features are captured with hooks
in the same forward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.data.loader import Batch
from kdrun.losses.base import DistillLoss, Outputs, StepContext
from kdrun.models.features import FeatureTap


class Distill:
    def __init__(self, method: DistillLoss, epochs: int, num_samples: int,
                 teacher: nn.Module | None = None, cached_logits: torch.Tensor | None = None):
        assert (teacher is None) != (cached_logits is None), "give a teacher or its cached logits"
        self.method = method
        self.teacher = teacher
        self.cached = cached_logits
        self.epochs = epochs
        self.num_samples = num_samples

    def teacher_outputs(self, batch: Batch) -> Outputs:
        if self.cached is not None:
            return Outputs(self.cached[batch.index, batch.view].float())
        with torch.no_grad(), FeatureTap(self.teacher, self.method.teacher_layers) as tap:
            logits = self.teacher(batch.x)
        return Outputs(logits, [tap.features[n] for n in self.method.teacher_layers])

    def __call__(self, student: nn.Module, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        with FeatureTap(student, self.method.student_layers) as tap:
            logits = student(batch.x)
        s = Outputs(logits, [tap.features[n] for n in self.method.student_layers])
        t = self.teacher_outputs(batch)
        ctx = StepContext(batch.y, batch.index, epoch, self.epochs, self.num_samples)
        terms = {}
        if self.method.ce_weight > 0:
            terms["ce"] = self.method.ce_weight * F.cross_entropy(logits, batch.y)
        terms.update(self.method(s, t, ctx))
        return terms


@torch.no_grad()
def probe_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Size]:
    """Shapes of the named features for input ``x`` (one forward pass, eval mode)."""
    was = model.training
    model.eval()
    with FeatureTap(model, names) as tap:
        model(x)
    model.train(was)
    return [tap.features[n].shape for n in names]
