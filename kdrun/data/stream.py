"""Streaming from image files, for folders too big to hold decoded in memory.

:class:`StreamLoader` has :class:`~kdrun.data.loader.TensorLoader`'s interface
(``epoch(epoch, start_step)``, ``__len__``, ``num_samples``) and yields the
same :class:`~kdrun.data.loader.Batch` objects in the same order with the same
hashed augmentation; only the source differs: files are decoded batch by batch
in DataLoader worker processes (pinned memory on CUDA) instead of being sliced
from one in-memory tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from kdrun import distributed
from kdrun.data.base import FileSet
from kdrun.data.decode import decode_image
from kdrun.data.loader import Augment, Batch, Normalize, epoch_plan, make_batch
from kdrun.errors import ConfigError

MODES = ("auto", "memory", "stream")


def select_mode(mode: str, decoded_bytes: int, max_memory_gb: float) -> str:
    """``memory`` or ``stream``: ``auto`` streams when the decoded images would exceed ``max_memory_gb`` GiB."""
    if mode not in MODES:
        raise ConfigError(f"dataset.mode={mode}: valid: {', '.join(MODES)}")
    if mode == "auto":
        return "stream" if decoded_bytes > float(max_memory_gb) * 2**30 else "memory"
    return mode


class _Files(Dataset):
    def __init__(self, data: FileSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_image(self.data.files[i], self.data.image_size, self.data.in_chans))


class StreamLoader:
    """Epochs of batches decoded from the files of a :class:`FileSet`; arguments as ``TensorLoader``'s,
    plus ``num_workers`` decoding processes and ``pin_memory`` (default: when ``device`` is CUDA)."""

    def __init__(
        self,
        data: FileSet,
        batch_size: int,
        normalize: Normalize,
        augment: Augment | None = None,
        shuffle: bool = True,
        seed: int = 0,
        device="cpu",
        views: int | None = None,
        drop_last: bool = False,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        self.shard = shard  # (rank, world): this worker's share of every global batch
        self.files = _Files(data)
        self.device = torch.device(device)
        self.labels = data.labels.to(self.device)
        self.batch_size = batch_size
        self.normalize = normalize
        self.augment = augment if (augment is not None and augment.enabled and views != 0) else None
        self.shuffle = shuffle
        self.seed = seed
        self.views = views
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order, views = epoch_plan(self.num_samples, self.seed, epoch, self.shuffle, self.views)
        steps = [
            distributed.shard(order[s * self.batch_size : (s + 1) * self.batch_size], *self.shard)
            for s in range(start_step, len(self))
        ]
        loader = DataLoader(
            self.files,
            batch_sampler=[idx.tolist() for idx in steps],
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        views = views.to(self.device)
        for idx, images in zip(steps, loader):
            idx = idx.to(self.device)
            yield make_batch(
                images.to(self.device, non_blocking=True),
                self.labels[idx],
                idx,
                views[idx],
                self.augment,
                self.normalize,
            )
