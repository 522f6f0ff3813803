"""In-memory image datasets: uint8 tensors decoded once.

Every dataset factory returns a :class:`DataBundle` whose splits are
``ImageSet(images uint8 [N, C, H, W], labels int64 [N])``. Training samples
batches straight from these tensors (:mod:`kdrun.data.loader`), so files are
read and decoded once, not every epoch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdrun.errors import ConfigError
from kdrun.registry import Registry


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx])

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


@dataclass
class FileSet:
    """A split kept on disk (``dataset.mode=stream``): image files decoded batch by batch.

    Same ``labels``/``subset``/``__len__`` as :class:`ImageSet`; read it with
    :class:`kdrun.data.stream.StreamLoader` instead of ``TensorLoader``.
    """

    files: list[str]
    labels: torch.Tensor  # int64 [N]
    image_size: int
    in_chans: int
    crop_fraction: float | None = None  # the un-augmented view: None resized, else resize + centre crop

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> FileSet:
        files = [self.files[i] for i in idx.tolist()]
        return FileSet(files, self.labels[idx], self.image_size, self.in_chans, self.crop_fraction)


@dataclass
class DataBundle:
    name: str
    train: ImageSet | FileSet
    test: ImageSet | FileSet
    classes: list[str]
    identity: str  # stable string naming exactly this data (used in cache keys)
    # how an image of the data becomes the models' uint8 pixels, for a deployer (``kdrun export`` records it);
    # "": the data set's own images, as they are
    pixels: str = ""
    # what the data is, wherever its files lie (:meth:`content_key`); "": the identity says it already
    content: str = ""

    def content_key(self) -> str:
        """What the data is, for artifact-store keys, a teacher checkpoint's record and paired comparisons. An image
        folder's is a hash of its files' relative paths and bytes (:func:`kdrun.data.decode.files_digest`) with how
        they are decoded, not of where they lie or their times, so the same files copied elsewhere (another
        ``dataset.root``, new file times: a cluster job's local scratch, a download from object storage) reuse the
        store's teachers and logit caches; :attr:`identity` holds the times, as the key of the decoded copy must.
        Other datasets' identity is a hash of their pixels already."""
        return self.content or self.identity

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def layout(self) -> str:
        """A short hash of what a stage trains on, wherever the files lie and whatever their times: the classes,
        each split's labels in order, a streamed split's file names (class folder / file), and, after a ``+``, the
        pixels of the splits held in memory. A checkpoint of other data (images added, removed, changed or moved
        to another class) does not resume; the same data copied to another disk does (:attr:`identity` holds the
        files' times, as a cache key must). A streamed split's files are checked by name only: a file a run could
        not decode resumes once fixed (:class:`kdrun.errors.UnreadableImage`). The part before the ``+`` is the
        whole layout of a kdrun before pixels counted (:func:`layout_matches`)."""
        h = hashlib.sha1(repr(self.classes).encode())
        for split in (self.train, self.test):
            h.update(tensor_digest(split.labels).encode())
            if isinstance(split, FileSet):
                h.update("\n".join(os.path.join(*f.split(os.sep)[-2:]) for f in split.files).encode())
        pixels = [split.images for split in (self.train, self.test) if isinstance(split, ImageSet)]
        return h.hexdigest()[:16] + (f"+{tensor_digest(*pixels)}" if pixels else "")

    @property
    def in_chans(self) -> int:
        return self.train.in_chans

    @property
    def image_size(self) -> int:
        return self.train.image_size

    def check(
        self, num_classes: int | None = None, image_size: int | None = None, in_chans: int | None = None
    ) -> DataBundle:
        """Raise ConfigError when the config's num_classes/image_size/in_chans disagree with the data."""
        for key, want, have in (
            ("num_classes", num_classes, self.num_classes),
            ("image_size", image_size, self.image_size),
            ("in_chans", in_chans, self.in_chans),
        ):
            if want is not None and int(want) != have:
                raise ConfigError(
                    f"dataset.{key}={want}: the {self.name} data has {key}={have}; set dataset.{key}={have}"
                )
        return self


DatasetFn = Callable[..., DataBundle]
DATASETS: Registry[DatasetFn] = Registry("dataset", "dataset.name")
register_dataset = DATASETS.register


def layout_matches(saved: str, layout: str) -> bool:
    """Whether a checkpoint's data layout ``saved`` is that of the data now (:meth:`DataBundle.layout`); one saved
    before pixels counted (no ``+``) is checked by the rest."""
    return saved == layout or ("+" not in saved and saved == layout.partition("+")[0])


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Short content hash of tensors (identity of in-memory data)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
