"""Streaming from image files, for folders too big to hold decoded in memory.

:class:`StreamLoader` has :class:`~kdrun.data.loader.TensorLoader`'s interface
(``epoch(epoch, start_step)``, ``__len__``, ``num_samples``, ``shard``, ``batches``) and yields
the same :class:`~kdrun.data.loader.Batch` objects in the same order; only the source differs: each
DataLoader worker process decodes the file of a sample and computes its (index, view) augmentation itself
(:mod:`kdrun.data.transforms`: pad-crop, or a random-resized crop taken from the file's full-resolution
pixels, and flip), returning uint8 at the image size; the main process only normalises (pinned memory on
CUDA). A view is a pure function of (seed, index, view, file), so :meth:`StreamLoader.batches` recomputes
the exact pixels an epoch produced, in any order, with any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from kdrun import distributed
from kdrun.data.base import FileSet
from kdrun.data.decode import decode_image, open_image
from kdrun.data.loader import Augment, Batch, Normalize, epoch_batches, epoch_plan, make_batch
from kdrun.data.transforms import RandomResizedCrop
from kdrun.errors import ConfigError, UnreadableImage

MODES = ("auto", "memory", "stream")


def stream_workers(dcfg) -> int:
    """The DataLoader workers that decode a streamed split: ``dataset.workers`` (0: in the main process), 2 when
    it is null (the decode pool of an in-memory folder takes every CPU instead)."""
    workers = dcfg.get("workers")
    return int(workers) if workers is not None else 2


def select_mode(mode: str, decoded_bytes: int, max_memory_gb: float) -> str:
    """``memory`` or ``stream``: ``auto`` streams when the decoded images would exceed ``max_memory_gb`` GiB."""
    if mode not in MODES:
        raise ConfigError(f"dataset.mode={mode}: valid: {', '.join(MODES)}")
    if mode == "auto":
        return "stream" if decoded_bytes > float(max_memory_gb) * 2**30 else "memory"
    return mode


class _Views(Dataset):
    """Item ``(index, view)``: the uint8 ``[C, S, S]`` pixels of sample ``index`` under ``view`` (in a worker),
    and ``""``; for a file it cannot decode, zeros and the one-line error, which the main process raises (a
    DataLoader worker's own exception would reach the user as a traceback of the worker)."""

    def __init__(self, data: FileSet, augment: Augment | RandomResizedCrop | None):
        self.data = data
        self.augment = augment

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, str]:
        i, v = item
        d = self.data
        try:
            if self.augment is None:
                pixels = decode_image(d.files[i], d.image_size, d.in_chans, d.crop_fraction)
            else:
                pixels = self.augment.one(open_image(d.files[i], d.in_chans), i, v, d.image_size, d.crop_fraction)
        except ConfigError as e:
            return torch.zeros((d.in_chans, d.image_size, d.image_size), dtype=torch.uint8), str(e)
        return torch.from_numpy(pixels), ""


class StreamLoader:
    """Epochs of batches decoded from the files of a :class:`FileSet`; arguments as ``TensorLoader``'s,
    plus ``num_workers`` decoding processes and ``pin_memory`` (default: when ``device`` is CUDA)."""

    def __init__(
        self,
        data: FileSet,
        batch_size: int,
        normalize: Normalize,
        augment: Augment | RandomResizedCrop | None = None,
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
        self.device = torch.device(device)
        self.labels = data.labels.to(self.device)
        self.batch_size = batch_size
        self.normalize = normalize
        self.augment = augment if (augment is not None and augment.enabled and views != 0) else None
        self.files = _Views(data, self.augment)
        self.shuffle = shuffle
        self.seed = seed
        self.views = views
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.bounds = epoch_batches(self.num_samples, batch_size, drop_last, shard[1])  # each epoch's batches

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        return len(self.bounds)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order, views = epoch_plan(self.num_samples, self.seed, epoch, self.shuffle, self.views)
        steps = [distributed.shard(order[self.bounds[s]], *self.shard) for s in range(start_step, len(self))]
        return self._load([(idx, views[idx]) for idx in steps])

    def batches(self, index: torch.Tensor, view: torch.Tensor, batch_size: int | None = None) -> Iterator[Batch]:
        """The batches of samples ``index`` under views ``view`` (in that order, ``batch_size`` at a time, default
        the loader's), decoded by the workers: the same pixels an epoch gives those (index, view) pairs."""
        b = batch_size or self.batch_size
        index, view = index.cpu(), view.cpu()
        return self._load([(index[s : s + b], view[s : s + b]) for s in range(0, len(index), b)])

    def _load(self, plan: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[Batch]:
        """Batches of (index, view) pairs: each worker decodes and augments the samples of a batch."""
        loader = DataLoader(
            self.files,
            batch_sampler=[list(zip(idx.tolist(), v.tolist())) for idx, v in plan],
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for (host_idx, host_view), (images, errors) in zip(plan, loader):
            if any(errors):
                self._failed(UnreadableImage(next(e for e in errors if e)))
            idx = host_idx.to(self.device)
            yield make_batch(
                images.to(self.device, non_blocking=True),
                self.labels[idx],
                idx,
                host_view.to(self.device),
                None,  # augmented in the worker
                self.normalize,
                (host_idx, host_view),
            )

    def _failed(self, err: ConfigError) -> None:
        """An image this worker could not decode. Alone, or where every worker reads the same files (evaluation),
        raised at once; a worker with its own shard of a training epoch holds it for the workers' next agreement
        (:func:`kdrun.distributed.defer`), so that all of them end together instead of the others waiting in their
        next collective. Until then the image is zeros, and nothing this worker computes is stored."""
        if self.shard[1] > 1:
            distributed.defer(err)
        else:
            raise err
