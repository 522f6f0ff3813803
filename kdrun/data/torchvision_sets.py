"""Standard datasets via torchvision: ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn``.

``dataset.root`` is where the files are (torchvision's layout), ``dataset.download=true`` lets
torchvision fetch them. MNIST and Fashion-MNIST are read from their four idx files, plain or
``.gz``, either directly in ``root`` or in torchvision's ``root/<MNIST|FashionMNIST>/raw``.
Missing files (or a failed download) raise a one-line ConfigError saying what is expected where.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch
from torchvision import datasets as tvd

from kdrun.data.base import DataBundle, ImageSet, register_dataset, tensor_digest
from kdrun.errors import ConfigError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEFAULT_ROOT = "data"


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _how(download: bool) -> str:
    return (
        "check the internet connection or copy the files there"
        if download
        else "set dataset.download=true or copy the files there"
    )


def read_idx(path: str) -> torch.Tensor:
    """An idx file (plain or .gz) as a uint8 tensor of its stored shape."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) > 4 else 0
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if raw[:3] != b"\0\0\x08" or ndim == 0 or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise ConfigError(f"{path}: not a complete uint8 idx file; copy it again or use dataset.download=true")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()).view(dims)


def _find_idx(dirs: list[str]) -> list[str | None]:
    def find(stem: str) -> str | None:
        for d in dirs:
            for p in (os.path.join(d, stem), os.path.join(d, stem + ".gz")):
                if os.path.isfile(p):
                    return p
        return None

    return [find(stem) for stem in IDX_FILES]


def _idx_dataset(name: str, tv_cls, root: str, download: bool) -> DataBundle:
    dirs = [root, os.path.join(root, tv_cls.__name__, "raw")]
    paths = _find_idx(dirs)
    why = ""
    if None in paths and download:
        try:
            tv_cls(root, train=True, download=True)
        except Exception as e:  # network or checksum failure
            why = f"download failed ({_why(e)}); "
        paths = _find_idx(dirs)
    found = [p for p in paths if p is not None]
    if len(found) < len(paths):
        raise ConfigError(
            f"dataset.root={root}: {name} files not found: {why}expected {', '.join(IDX_FILES)} "
            f"(plain or .gz) in {root} or {dirs[1]}; {_how(download)}"
        )
    x_train, y_train, x_test, y_test = (read_idx(p) for p in found)
    train, test = (
        ImageSet(x_train[:, None].contiguous(), y_train.long()),
        ImageSet(x_test[:, None].contiguous(), y_test.long()),
    )
    for split in (train, test):
        if len(split.images) != len(split.labels):
            raise ConfigError(f"dataset.root={root}: {name} image and label files disagree in length")
    return DataBundle(name, train, test, list(tv_cls.classes), f"{name}-{tensor_digest(*_tensors(train, test))}")


def _tensors(*sets: ImageSet) -> list[torch.Tensor]:
    return [t for s in sets for t in (s.images, s.labels)]


def _tv_dataset(name: str, make, root: str, download: bool, expected: str) -> tuple:
    """(train, test) torchvision datasets, or a one-line ConfigError."""
    try:
        return make(root, True, download), make(root, False, download)
    except Exception as e:  # missing, corrupt, or failed download
        why = f"download failed ({_why(e)}); " if download else ""
        raise ConfigError(
            f"dataset.root={root}: {name} not found: {why}expected {expected}; {_how(download)}"
        ) from None


def _root(root: str | None) -> str:
    return os.path.expanduser(root or DEFAULT_ROOT)


@register_dataset("mnist")
def mnist(
    root: str | None = None, download: bool = False, num_classes=None, image_size=None, in_chans=None, **_
) -> DataBundle:
    """MNIST: 60,000/10,000 28x28 grey digits."""
    return _idx_dataset("mnist", tvd.MNIST, _root(root), download).check(num_classes, image_size, in_chans)


@register_dataset("fashion_mnist")
def fashion_mnist(
    root: str | None = None, download: bool = False, num_classes=None, image_size=None, in_chans=None, **_
) -> DataBundle:
    """Fashion-MNIST: 60,000/10,000 28x28 grey clothing images."""
    return _idx_dataset("fashion_mnist", tvd.FashionMNIST, _root(root), download).check(
        num_classes, image_size, in_chans
    )


def _cifar(name: str, tv_cls, folder: str, root: str | None, download: bool) -> DataBundle:
    root = _root(root)
    train, test = _tv_dataset(
        name,
        lambda r, t, d: tv_cls(r, train=t, download=d),
        root,
        download,
        f"the extracted python version in {os.path.join(root, folder)}",
    )
    sets = [
        ImageSet(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
        for ds in (train, test)
    ]
    return DataBundle(name, sets[0], sets[1], list(train.classes), f"{name}-{tensor_digest(*_tensors(*sets))}")


@register_dataset("cifar10")
def cifar10(
    root: str | None = None, download: bool = False, num_classes=None, image_size=None, in_chans=None, **_
) -> DataBundle:
    """CIFAR-10: 50,000/10,000 32x32 RGB images, 10 classes."""
    return _cifar("cifar10", tvd.CIFAR10, "cifar-10-batches-py", root, download).check(
        num_classes, image_size, in_chans
    )


@register_dataset("cifar100")
def cifar100(
    root: str | None = None, download: bool = False, num_classes=None, image_size=None, in_chans=None, **_
) -> DataBundle:
    """CIFAR-100: 50,000/10,000 32x32 RGB images, 100 fine classes."""
    return _cifar("cifar100", tvd.CIFAR100, "cifar-100-python", root, download).check(num_classes, image_size, in_chans)


@register_dataset("svhn")
def svhn(
    root: str | None = None, download: bool = False, num_classes=None, image_size=None, in_chans=None, **_
) -> DataBundle:
    """SVHN (cropped digits): 73,257 train / 26,032 test 32x32 RGB images; label 0 is the digit 0."""
    root = _root(root)
    train, test = _tv_dataset(
        "svhn",
        lambda r, t, d: tvd.SVHN(r, split="train" if t else "test", download=d),
        root,
        download,
        f"train_32x32.mat and test_32x32.mat in {root}",
    )
    sets = [
        ImageSet(torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).long()) for ds in (train, test)
    ]
    return DataBundle(
        "svhn", sets[0], sets[1], [str(i) for i in range(10)], f"svhn-{tensor_digest(*_tensors(*sets))}"
    ).check(num_classes, image_size, in_chans)
