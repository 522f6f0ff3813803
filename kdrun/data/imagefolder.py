"""``dataset=imagefolder``: ``root/<train_split>/<class>/*`` and ``root/<test_split>/<class>/*``.

Classes are the sorted folder names of the training split; every class needs
images in both splits. Images are decoded once into uint8 tensors and cached
(:mod:`kdrun.data.decode`) under a key made of the file list, sizes, mtimes
and image size, so a second run reads one file instead of decoding again.
Folders too big for memory (``dataset.mode``, ``dataset.max_memory_gb``)
come back as :class:`~kdrun.data.base.FileSet` splits for
:class:`~kdrun.data.stream.StreamLoader`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import unicodedata

import torch

from kdrun import distributed
from kdrun.data.base import DataBundle, FileSet, ImageSet, register_dataset
from kdrun.data.decode import (
    IMG_EXTENSIONS,
    decode_files,
    files_digest,
    files_keys,
    load_cached,
    open_image,
    save_cached,
)
from kdrun.data.decode import cache_dir as resolve_cache_dir
from kdrun.data.stream import select_mode
from kdrun.errors import ConfigError

log = logging.getLogger("kdrun")

ROOT_NOT_SET = (
    "dataset.root is not set: give the folder holding <train_split>/<class>/<image> "
    "and <test_split>/<class>/<image>, e.g. dataset.root=/data/myset"
)


def _entries(path: str) -> list[os.DirEntry]:
    """The entries of folder ``path``; one line naming it when it cannot be read (permissions, I/O)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        raise ConfigError(f"dataset.root: {path}: not readable ({e.strerror or e})") from e


def _check_name(entry: os.DirEntry) -> None:
    """One line for a file or folder whose name is not UTF-8 (kdrun records names in its caches and reports)."""
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(entry.path).decode("utf-8", "backslashreplace")
        raise ConfigError(f"dataset.root: {shown}: its name is not valid UTF-8; rename it") from None


def _subdirs(path: str) -> list[str]:
    """The class folders in ``path``, sorted; one line for a class folder that is a link to nothing (a share not
    mounted: its class would be missing) and for two names that differ only in Unicode normalisation (one folder
    on macOS, two here; the classes would print alike)."""
    names = []
    for e in _entries(path):
        if e.name.startswith(".") or not (e.is_dir() or e.is_symlink()):  # hidden, or a file beside the classes
            continue
        _check_name(e)
        if e.is_symlink() and not os.path.exists(e.path):
            raise ConfigError(
                f"dataset.root: {e.path}: a link to {os.readlink(e.path)}, which does not exist (a share not "
                "mounted?); mount it, or remove the link to train without that class"
            )
        if e.is_dir():
            names.append(e.name)
    seen: dict[str, str] = {}
    for name in sorted(names):
        twin = seen.setdefault(unicodedata.normalize("NFC", name), name)
        if twin != name:
            raise ConfigError(
                f"dataset.root: {path} has class folders {ascii(twin)} and {ascii(name)}, one name in two Unicode "
                "normalisations (NFC and NFD); merge or rename them"
            )
    return sorted(names)


def scan_split(root: str, split: str, classes: list[str]) -> tuple[list[str], torch.Tensor]:
    """Sorted image files of ``root/split/<class>/`` for every class, and their labels; what else the class folders
    hold (other files, subfolders, hidden files such as macOS's ``._*``) is skipped with one warning counting it."""
    files: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    dangling: list[str] = []  # links to nothing
    nested = 0  # images in subfolders of class folders (torchvision's ImageFolder would read them; kdrun does not)
    for label, c in enumerate(classes):
        d = os.path.join(root, split, c)
        if not os.path.isdir(d):
            raise ConfigError(
                f"dataset.root={root}: class '{c}' of the training split has no folder {d} "
                f"(every class needs images in dataset.train_split and dataset.test_split)"
            )
        found: list[str] = []
        for e in _entries(d):
            image = e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS)
            if image:
                _check_name(e)  # an image read (a skipped file's name does not matter)
                found.append(e.path)
            elif e.is_symlink() and not os.path.exists(e.path):
                dangling.append(e.path)
            else:
                skipped.append(e.path)
                if e.is_dir() and not e.name.startswith("."):
                    nested += _count_images(e.path)
        found.sort()
        if not found:
            raise ConfigError(
                f"dataset.root={root}: {d} has no images (expected files ending in {', '.join(IMG_EXTENSIONS)})"
            )
        files += found
        labels += [label] * len(found)
    where = os.path.join(root, split)
    if skipped:
        skipped.sort()
        log.warning(
            "data: %s: skipped %d %s of the class folders that %s not image files (subfolders, hidden files, other "
            "extensions), e.g. %s%s",
            where,
            len(skipped),
            "entry" if len(skipped) == 1 else "entries",
            "is" if len(skipped) == 1 else "are",
            ", ".join(os.path.relpath(p, where) for p in skipped[:3]),
            f"; their subfolders hold {nested} image{'' if nested == 1 else 's'}, which kdrun does not read (a class's "
            "images lie directly in its folder)"
            if nested
            else "",
        )
    if dangling:
        dangling.sort()
        log.warning(
            "data: %s: skipped %d %s to nothing (dangling), e.g. %s",
            where,
            len(dangling),
            "link" if len(dangling) == 1 else "links",
            ", ".join(os.path.relpath(p, where) for p in dangling[:3]),
        )
    return files, torch.tensor(labels, dtype=torch.long)


def _count_images(folder: str) -> int:
    """The number of image files under ``folder`` (any depth; unreadable subfolders count 0)."""
    n = 0
    for _here, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        n += sum(1 for name in names if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS))
    return n


def _check_layout(root: str, train_split: str, test_split: str) -> None:
    """The root and both split folders exist, and are two folders."""
    if not os.path.isdir(root):
        what = "a file, not a folder" if os.path.isfile(root) else "no such folder"
        raise ConfigError(f"dataset.root={root}: {what} (expected {root}/<split>/<class>/<image>)")
    for key, split in (("train_split", train_split), ("test_split", test_split)):
        if not split or os.path.normpath(split) in (".", "..") or os.path.isabs(split):
            raise ConfigError(
                f"dataset.{key}={split}: must name a folder inside dataset.root={root} (expected "
                f"{root}/<split>/<class>/<image>, e.g. train and test)"
            )
        if not os.path.isdir(os.path.join(root, split)):
            parent = os.path.dirname(root)
            if os.path.basename(root) in (train_split, test_split) and os.path.isdir(os.path.join(parent, split)):
                raise ConfigError(
                    f"dataset.root={root}: a split folder, not the data set's; give dataset.root={parent} (expected "
                    f"{parent}/<split>/<class>/<image>)"
                )
            others = [d for d in _subdirs(root) if d not in (train_split, test_split)]
            hint = (
                f"; set dataset.{key}={others[0]}, the other folder there"
                if len(others) == 1
                else f"; its other folders: {', '.join(others)}"
                if others
                else ""
            )
            raise ConfigError(
                f"dataset.{key}={split}: no folder {os.path.join(root, split)} "
                f"(expected {root}/<split>/<class>/<image>){hint}"
            )
    if os.path.samefile(os.path.join(root, train_split), os.path.join(root, test_split)):  # Train = train on macOS
        raise ConfigError(
            f"dataset.test_split={test_split}: the same folder as dataset.train_split; the test images must be "
            "held out of training (a best epoch is chosen on trainer.val_fraction of the training split)"
        )


@register_dataset("imagefolder")
def imagefolder(
    root: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_size: int | None = None,
    in_chans: int = 3,
    num_classes: int | None = None,
    cache_dir: str | None = None,
    max_memory_gb: float = 8.0,
    mode: str = "auto",
    workers: int | None = None,
    eval_crop_fraction: float | None = None,
    **_,
) -> DataBundle:
    """Images from class folders; ``image_size`` None takes the first training image's height.

    ``eval_crop_fraction`` None: the un-augmented view of an image (evaluation, ``cache.views=0``) is the whole
    image resized to ``image_size`` squared; a fraction (ImageNet: 0.875): the shorter side resized to
    ``image_size / eval_crop_fraction``, then the centre crop (:func:`kdrun.data.transforms.fit_image`). In
    memory mode that view is what is decoded and kept, so augmentations crop it (stream mode crops the file).
    """
    if not root:
        raise ConfigError(ROOT_NOT_SET)
    if in_chans not in (1, 3):
        raise ConfigError(f"dataset.in_chans={in_chans}: valid: 1 (grey) or 3 (RGB)")
    root = os.path.abspath(os.path.expanduser(root))
    _check_layout(root, train_split, test_split)
    classes = _subdirs(os.path.join(root, train_split))
    if len(classes) < 2:
        raise ConfigError(
            f"dataset.root={root}: {os.path.join(root, train_split)} has {len(classes)} class folder"
            f"{'' if len(classes) == 1 else 's'}{': ' + classes[0] if classes else ''}; a classifier needs at "
            "least 2 (one folder of images per class)"
        )
    extra = sorted(set(_subdirs(os.path.join(root, test_split))) - set(classes))
    if extra:
        nfc = {unicodedata.normalize("NFC", c): c for c in classes}
        twins = [(c, nfc[unicodedata.normalize("NFC", c)]) for c in extra if unicodedata.normalize("NFC", c) in nfc]
        why = "; ".join(f"{ascii(c)} in {test_split}/, {ascii(t)} in {train_split}/" for c, t in twins)
        raise ConfigError(
            f"dataset.root={root}: {test_split}/ has classes not in {train_split}/: {', '.join(extra)}"
            + (f" (the same names in two Unicode normalisations, NFC and NFD: {why}; rename one)" if twins else "")
        )
    if num_classes is not None and int(num_classes) != len(classes):
        raise ConfigError(
            f"dataset.num_classes={num_classes}: {os.path.join(root, train_split)} has "
            f"{len(classes)} class folders; set dataset.num_classes={len(classes)}"
        )
    train_files, train_labels = scan_split(root, train_split, classes)
    test_files, test_labels = scan_split(root, test_split, classes)
    if image_size is None:
        image_size = open_image(train_files[0], in_chans).size[1]  # one line when it is unreadable
    image_size = int(image_size)
    eval_crop_fraction = float(eval_crop_fraction) if eval_crop_fraction is not None else None
    crop = () if eval_crop_fraction is None else (eval_crop_fraction,)  # none: the keys of before
    files = train_files + test_files
    key, files_alone = files_keys(root, files, train_split, test_split, image_size, in_chans, *crop)
    identity = f"imagefolder-{key}"
    folder = resolve_cache_dir(cache_dir)
    # what the data is (the store's keys, `kdrun compare`): the files' bytes, however they are decoded; read by
    # rank 0 alone when data-parallel workers load the data
    digest = distributed.shared(lambda: files_digest(root, files, files_alone, folder, held_out=len(train_files)))
    what = (digest, train_split, test_split, image_size, in_chans, *crop)
    content = hashlib.sha1(repr(what).encode()).hexdigest()[:20]
    n = len(files)
    pixels = f"each file decoded to {'RGB' if in_chans == 3 else 'grey'} and " + (
        f"resized to {image_size}x{image_size} (bilinear; as is when already that size)"
        if eval_crop_fraction is None
        else f"its shorter side resized to {int(round(image_size / eval_crop_fraction))} (bilinear), then the "
        f"centre {image_size}x{image_size} crop"
    )
    if select_mode(mode, n * in_chans * image_size**2, max_memory_gb) == "stream":
        why = f"> dataset.max_memory_gb={max_memory_gb} decoded" if mode == "auto" else "(dataset.mode=stream)"
        log.info("data: %d images %s: streaming from files", n, why)
        return DataBundle(
            "imagefolder",
            FileSet(train_files, train_labels, image_size, in_chans, eval_crop_fraction),
            FileSet(test_files, test_labels, image_size, in_chans, eval_crop_fraction),
            classes,
            identity,
            pixels,
            f"imagefolder-{content}",
        )
    path = os.path.join(folder, f"{identity}.pt")
    cached = load_cached(path, key)
    if cached is None:
        t0 = time.perf_counter()
        tensors = {
            split: decode_files(files, image_size, in_chans, workers, f"decode {name}", eval_crop_fraction)
            for split, files, name in (("train", train_files, train_split), ("test", test_files, test_split))
        }
        kept = save_cached(path, key, tensors, {"classes": classes, "root": root})
        where = f", cached in {path}" if kept else ""
        log.info("data: decoded %d images in %.1fs%s", n, time.perf_counter() - t0, where)
    else:
        tensors = cached[0]
        log.info("data: %d decoded images from the cache %s", n, path)
    return DataBundle(
        "imagefolder",
        ImageSet(tensors["train"], train_labels),
        ImageSet(tensors["test"], test_labels),
        classes,
        identity,
        pixels,
        f"imagefolder-{content}",
    )
