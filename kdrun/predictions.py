"""Per-image predictions of a run's models (``predictions.pt``), for paired comparisons between runs.

Next to ``metrics.json`` a run writes the class each of its models predicts for every image of the test split
and, with a validation split (``trainer.val_fraction``), of that split too: last epoch, single view, and with
flip TTA where ``evaluate.flip_tta`` scored it. Two runs scored on the same images can then be compared image by
image (``kdrun compare``, :mod:`kdrun.compare`), a test that sees differences two accuracies with their own
sampling noise hide. A few bytes an image and model (int32 classes), a checksummed artifact (:mod:`kdrun.io`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from kdrun import io
from kdrun.evaluation import predict, top1

FILE = "predictions.pt"
KIND = "predictions"


@dataclass(frozen=True)
class SplitPredictions:
    """One split's labels and each model's predicted classes, in the split's order."""

    images: str  # which images, in which order: the dataset's content key and the split (val: its fraction and seed)
    labels: torch.Tensor  # int64 [N]
    top1: dict[str, torch.Tensor]  # model name -> predicted class [N] (int32): last epoch, single view
    flip_tta: dict[str, torch.Tensor] = field(default_factory=dict)  # the same with flip TTA, where scored
    # the same images named by the dataset's identity (an image folder's: with its files' times), as a kdrun
    # before the content key named them in ``images``: a run of then still pairs with one of now
    by_identity: str = ""

    def same_images(self, other: SplitPredictions) -> bool:
        """Whether ``other`` names the same images, in the same order: by the content key, or, when one of the two
        was written before it (no :attr:`by_identity`), by the identity it recorded in ``images``."""
        if self.by_identity and other.by_identity:
            return self.images == other.images
        return self.images == other.images or other.images == self.by_identity or self.images == other.by_identity

    def correct(self, model: str, tta: bool = False) -> torch.Tensor:
        """Per image: does ``model`` (a name in :attr:`top1`) get it right (bool [N])."""
        return (self.flip_tta if tta else self.top1)[model] == self.labels

    def every_other(self, start: int) -> SplitPredictions:
        """Images ``start``, ``start + 2``, ... of the split (``start`` 0 or 1: its two halves)."""
        return SplitPredictions(
            f"{self.images}[{start}::2]",
            self.labels[start::2],
            {k: v[start::2] for k, v in self.top1.items()},
            {k: v[start::2] for k, v in self.flip_tta.items()},
            f"{self.by_identity}[{start}::2]" if self.by_identity else "",
        )


@dataclass(frozen=True)
class RunPredictions:
    roles: dict[str, str]  # role (teacher, student, baseline) -> model name, as metrics.json ``roles``
    splits: dict[str, SplitPredictions]  # "test", and "val" with a validation split


def _top1(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: top1(lg).to(torch.int32) for name, lg in logits.items()}


def collect(cfg, data, stages, roles, evaluation) -> RunPredictions:
    """The predictions of every model of the run (``data``: its :class:`kdrun.run_data.RunData`; ``stages``: its
    :class:`kdrun.stages.StageRunner`; ``evaluation``: :func:`kdrun.report.evaluate`'s test-split result; the
    validation split is predicted here)."""
    content, identity = data.data.content_key(), data.data.identity  # copies of the same images compare
    splits = {
        "test": SplitPredictions(
            f"{content}/test",
            data.test_loader.labels.cpu().long(),
            _top1(evaluation.logits),
            _top1(evaluation.flip_tta),
            f"{identity}/test",
        )
    }
    if data.val_loader is not None:
        loader = data.val_loader
        single = {name: predict(t.model, loader) for name, t in stages.models.items()}
        tta = {}
        if evaluation.flip_tta:
            tta = {n: predict(t.model, loader, flip_tta=True, single=single[n]) for n, t in stages.models.items()}
        tr = cfg.trainer
        val = f"/val(val_fraction={float(tr.val_fraction)}, seed={int(tr.seed)})"
        splits["val"] = SplitPredictions(
            f"{content}{val}", loader.labels.cpu().long(), _top1(single), _top1(tta), f"{identity}{val}"
        )
    return RunPredictions(dict(roles.items()), splits)


def write(run_dir: str, preds: RunPredictions) -> None:
    splits = {name: dict(vars(s)) for name, s in preds.splits.items()}  # read() rebuilds them from these fields
    io.save({"roles": preds.roles, "splits": splits}, os.path.join(run_dir, FILE), KIND)


def read(run_dir: str) -> RunPredictions:
    """The verified ``predictions.pt`` of ``run_dir`` (:class:`kdrun.io.DamagedArtifact` if missing or damaged)."""
    path = os.path.join(run_dir, FILE)
    blob = io.load(path, KIND)
    try:
        splits = {n: SplitPredictions(**d) for n, d in blob["splits"].items()}
        return RunPredictions(dict(blob["roles"]), splits)
    except (KeyError, TypeError, AttributeError) as e:  # sound bytes, foreign layout
        raise io.DamagedArtifact(path, f"not the layout this kdrun writes ({type(e).__name__}: {e})") from None
