"""Training-batch throughput: kdrun's decode-once loader vs torchvision's per-epoch decoding.

    python scripts/bench_data.py [--root DIR] [--batches 100] [--warmup 10]

Both sides read the same CIFAR-10 JPEG folder and produce normalised float batches of 128 with
pad-4 random crop and horizontal flip:

* kdrun: ``dataset=imagefolder`` (decoded once into a cached uint8 tensor) + ``TensorLoader``;
* torchvision: ``ImageFolder`` + ``transforms`` (RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize) + ``DataLoader(num_workers=2)``.

Warm-up batches (worker start-up, first cache read) are not timed. Without ``--root`` the folder is
extracted from ``$KDRUN_SHARED_DATA/cifar10-jpg.tar.gz`` into ``$KDRUN_DEV_CACHE``
(default ``~/.cache/kdrun-dev``) once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import count, islice

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from kdrun.data import DATASETS
from kdrun.data.loader import Augment, Normalize, TensorLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_shared_data import DEV_CACHE, SHARED, extract_cifar10  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def images_per_s(batches, n: int, warmup: int) -> float:
    """Images per second over ``n`` batches after ``warmup`` untimed ones."""
    for _ in islice(batches, warmup):
        pass
    t0, seen = time.perf_counter(), 0
    for x, _y in islice(batches, n):
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def kdrun_batches(root: str, batch_size: int, cache_dir: str | None):
    t0 = time.perf_counter()
    data = DATASETS.get("imagefolder")(root=root, image_size=32, num_classes=10, cache_dir=cache_dir)
    print(f"kdrun data ready in {time.perf_counter() - t0:.1f}s ({len(data.train)} train images)")
    loader = TensorLoader(
        data.train, batch_size, Normalize(MEAN, STD, 3, "cpu"), Augment(4, True, 0), shuffle=True, seed=0
    )
    return ((b.x, b.y) for e in count() for b in loader.epoch(e))


def torchvision_batches(root: str, batch_size: int, workers: int):
    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    ds = datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True)
    return (b for _ in count() for b in loader)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="extracted CIFAR-10 JPEG folder (train/<class>/*.jpg)")
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir", help="decode cache (default: $KDRUN_CACHE_DIR or ~/.cache/kdrun/data)")
    a = p.parse_args()
    root = a.root or extract_cifar10(SHARED, DEV_CACHE)
    print(
        f"CIFAR-10 train folder {root}, batch {a.batch_size}, {a.batches} timed batches after {a.warmup}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    ours = images_per_s(kdrun_batches(root, a.batch_size, a.cache_dir), a.batches, a.warmup)
    print(f"kdrun decode-once TensorLoader:          {ours:10,.0f} images/s")
    theirs = images_per_s(torchvision_batches(root, a.batch_size, a.workers), a.batches, a.warmup)
    print(f"torchvision ImageFolder+DataLoader (w={a.workers}): {theirs:10,.0f} images/s")
    print(f"ratio: {ours / theirs:.1f}x")


if __name__ == "__main__":
    main()
