"""Evaluation: a model's logits over a split, and top-k accuracy."""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def predict(model: nn.Module, loader, flip_tta: bool = False, single: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``model`` over the loader's split, in order (float32, on CPU; one copy at the end).

    ``flip_tta``: the mean of the logits of each image and of its mirror image (horizontal-flip test-time
    augmentation, as Page's DAWNBench ResNet-9 and airbench report CIFAR-10 accuracy); ``single``: this model's
    single-view logits when already computed, so only the mirror images are run."""
    if flip_tta:
        plain = single if single is not None else _logits(model, loader, mirror=False)
        return 0.5 * (plain + _logits(model, loader, mirror=True))
    return _logits(model, loader, mirror=False)


def _logits(model: nn.Module, loader, mirror: bool) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = [model(b.x.flip(-1) if mirror else b.x).float() for b in loader.epoch(0)]
    model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0)


def top1(logits: torch.Tensor) -> torch.Tensor:
    """Each image's predicted class (argmax: ties to the lower index), -1 where a logit is not finite: such an
    image is wrong (argmax took a NaN for the largest value) and agrees with no model."""
    return torch.where(torch.isfinite(logits).all(1), logits.argmax(1), -1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Top-k accuracies in percent."""
    labels = labels.to(logits.device)
    # the true class's rank with exact ties broken by class index, as argmax breaks them: top-1 is argmax's (as
    # errors, agreement and the McNemar test count), and an image right at top-1 is right at every k
    own = logits.gather(1, labels[:, None])
    earlier = torch.arange(logits.shape[1], device=logits.device)[None, :] < labels[:, None]
    rank = (logits > own).sum(1) + ((logits == own) & earlier).sum(1)
    # a NaN compares False with everything: its true class ranked first, a broken model scored 100 %
    rank = torch.where(torch.isfinite(logits).all(1), rank, logits.shape[1])
    return [100.0 * (rank < min(k, logits.shape[1])).float().mean().item() for k in ks]
