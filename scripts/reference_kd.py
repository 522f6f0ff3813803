"""The knowledge-distillation loop every tutorial writes: the baseline kdrun is measured against.

    python scripts/reference_kd.py [--root DIR] [--subset 5000] [--steps 30]

* data: torchvision ``ImageFolder`` + ``DataLoader(num_workers=2, shuffle=True)``, every image decoded
  from its JPEG and augmented with PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize) each time it is drawn;
* teacher: trained with cross-entropy, then run online in fp32 on every distillation batch (eval mode,
  ``torch.no_grad``); there is no logit cache, so the stage standing in for kdrun's cache build is one
  teacher inference pass over the training images (:func:`teacher_pass`);
* student: fp32, plain SGD (momentum 0.9, weight decay 5e-4), Hinton KD loss with T=4, alpha=0.9
  (:func:`kdrun.losses.kd.kd_loss`: log_softmax on both sides, T^2, batch mean).

Every stage returns its throughput in images/s. Training stages run a fixed number of steps of
``drop_last`` batches and time the steps after the first ``warmup`` ones (the timed steps include
fetching their batches from the workers).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from itertools import count, islice

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from kdrun.losses.kd import kd_loss
from kdrun.models import build_model

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ROOT = os.path.join(os.environ.get("KDRUN_DEV_CACHE", os.path.expanduser("~/.cache/kdrun-dev")), "cifar10-jpg")


def subset_indices(total: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct sorted positions out of ``total``, seeded (the same images on both sides of a benchmark)."""
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return perm[: min(n, total)].sort().values


def train_transform() -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def eval_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def image_loader(
    root: str, subset: int, transform, batch_size: int, train: bool, workers: int = 2, seed: int = 0
) -> DataLoader:
    """``ImageFolder(root/train)`` cut to ``subset`` images (:func:`subset_indices`); shuffled, full batches
    when ``train``."""
    ds = datasets.ImageFolder(os.path.join(root, "train"), transform=transform)
    ds = Subset(ds, subset_indices(len(ds), subset, seed).tolist())
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(loader: DataLoader, steps: int) -> Iterator:
    """Exactly ``steps`` batches, starting new epochs of ``loader`` as needed."""
    return islice((b for _ in count() for b in loader), steps)


def timed_steps(
    step: Callable[[torch.Tensor, torch.Tensor], None],
    loader: DataLoader,
    steps: int,
    warmup: int,
    device: torch.device,
) -> float:
    """Run ``step(x, y)`` on ``steps`` batches; images/s over the steps after the first ``warmup``."""
    if steps <= warmup:
        raise ValueError(f"steps={steps} must exceed warmup={warmup}")
    seen, t0 = 0, 0.0
    for i, (x, y) in enumerate(batches(loader, steps)):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        step(x.to(device), y.to(device))
        if i >= warmup:
            seen += len(y)
    sync(device)
    return seen / (time.perf_counter() - t0)


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def train_ce(
    model: nn.Module, loader: DataLoader, steps: int, warmup: int, device: torch.device, lr: float = 0.05
) -> float:
    """Cross-entropy training (the teacher stage, or a student alone); returns images/s."""
    model.train()
    opt = sgd(model, lr)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed_steps(step, loader, steps, warmup, device)


@torch.no_grad()
def teacher_pass(teacher: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """One teacher inference pass over ``loader`` (what the logit cache saves the reference); images/s."""
    teacher.eval()
    seen = 0
    t0 = time.perf_counter()
    for x, _y in loader:
        teacher(x.to(device))
        seen += len(x)
    sync(device)
    return seen / (time.perf_counter() - t0)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: DataLoader,
    steps: int,
    warmup: int,
    device: torch.device,
    temperature: float = 4.0,
    alpha: float = 0.9,
    lr: float = 0.05,
) -> float:
    """KD with the teacher run online on every batch (fp32, eval mode, no grad); returns images/s."""
    teacher.eval()
    student.train()
    opt = sgd(student, lr)

    def step(x, y):
        with torch.no_grad():
            t_logits = teacher(x)
        loss = kd_loss(student(x), t_logits, y, temperature, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed_steps(step, loader, steps, warmup, device)


def cifar_model(name: str, device: torch.device, num_classes: int = 10) -> nn.Module:
    """A kdrun model for ``num_classes`` classes of 32x32 RGB images, seeded like kdrun's runs."""
    torch.manual_seed(0)
    return build_model(name, num_classes, 3, 32).to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=ROOT, help="folder with train/<class>/*.jpg")
    p.add_argument("--subset", type=int, default=5000, help="training images used (seeded choice)")
    p.add_argument("--steps", type=int, default=30, help="steps per training stage")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each training stage")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=512, help="batch of the teacher inference pass")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    device = torch.device(a.device)
    train = image_loader(a.root, a.subset, train_transform(), a.batch, True, a.workers)
    classes = len(train.dataset.dataset.classes)
    teacher = cifar_model(a.teacher, device, classes)
    print(f"teacher CE ({a.teacher}):        {train_ce(teacher, train, a.steps, a.warmup, device):8.0f} images/s")
    plain = image_loader(a.root, a.subset, eval_transform(), a.eval_batch, False, a.workers)
    print(f"teacher inference pass:      {teacher_pass(teacher, plain, device):8.0f} images/s")
    rate = distill(cifar_model(a.student, device, classes), teacher, train, a.steps, a.warmup, device)
    print(f"distillation ({a.student}, online): {rate:8.0f} images/s")


if __name__ == "__main__":
    main()
