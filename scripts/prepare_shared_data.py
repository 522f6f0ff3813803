"""Unpack the shared real-data copies into a cache folder outside the repository (once).

    python scripts/prepare_shared_data.py [--shared DIR] [--out DIR]

``--shared`` defaults to ``$KDRUN_SHARED_DATA`` or ``../shared/datasets`` next to the repository;
``--out`` to ``$KDRUN_DEV_CACHE`` or ``~/.cache/kdrun-dev``.

gives OUT/cifar10-jpg/{train,test}/<class>/*.jpg (for ``dataset=imagefolder``) and
OUT/mnist/MNIST/raw/* uncompressed (torchvision's layout, for ``dataset=mnist dataset.root=OUT/mnist``;
``dataset.root`` may also point straight at the folder of .gz files). Existing outputs are kept.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tarfile
from pathlib import Path

SHARED = os.environ.get("KDRUN_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
DEV_CACHE = os.environ.get("KDRUN_DEV_CACHE", str(Path.home() / ".cache" / "kdrun-dev"))  # outside the repository
CIFAR10_JPG = os.path.join(DEV_CACHE, "cifar10-jpg")


def extract_cifar10(shared: str, out: str) -> str:
    """OUT/cifar10-jpg from SHARED/cifar10-jpg.tar.gz (extracted next to it, then renamed: never half-done)."""
    dest = os.path.join(out, "cifar10-jpg")
    if not os.path.isdir(os.path.join(dest, "train")):
        tmp = f"{dest}.tmp{os.getpid()}"
        with tarfile.open(os.path.join(shared, "cifar10-jpg.tar.gz")) as tar:
            tar.extractall(tmp, filter="data")
        os.makedirs(out, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def gunzip_mnist(shared: str, out: str) -> str:
    """OUT/mnist/MNIST/raw/<idx files> from SHARED/mnist/*.gz."""
    raw = os.path.join(out, "mnist", "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in sorted(os.listdir(os.path.join(shared, "mnist"))):
        dest = os.path.join(raw, name.removesuffix(".gz"))
        if name.endswith(".gz") and not os.path.exists(dest):
            with gzip.open(os.path.join(shared, "mnist", name)) as src, open(dest + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(dest + ".tmp", dest)
    return os.path.dirname(os.path.dirname(raw))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=SHARED)
    p.add_argument("--out", default=DEV_CACHE)
    a = p.parse_args()
    print("cifar10 image folder:", extract_cifar10(a.shared, a.out))
    print("mnist root:", gunzip_mnist(a.shared, a.out))


if __name__ == "__main__":
    main()
