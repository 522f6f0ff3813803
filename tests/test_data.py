"""Datasets, the decode cache, augmentation and the loaders (CPU).

Tests named ``test_shared_*`` read the real MNIST/CIFAR-10 copies under
``$KDRUN_SHARED_DATA`` (default /work/shared/datasets) and skip when they are
absent; deselect them with ``-k "not shared"``.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdrun.data import DATASETS, FileSet, ImageSet
from kdrun.data import imagefolder as imagefolder_module
from kdrun.data.decode import load_cached
from kdrun.data.loader import Augment, Normalize, TensorLoader, epoch_batches
from kdrun.data.stream import StreamLoader, select_mode
from kdrun.errors import ConfigError

SHARED = os.environ.get("KDRUN_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load(name: str, **kw):
    return DATASETS.get(name)(**kw)


def one_line_error(fn, *needles: str) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---------------------------------------------------------------- synthetic image folders


def make_folder(root, classes=("cat", "ant", "bee"), per_split=None, size=8, mode="RGB"):
    """Write PNGs root/<split>/<class>/<i>.png with pixel value 10*label + i (plus a ramp, and 50 in the test split:
    no test image is a training image); returns the pixels."""
    per_split = per_split or {"train": 3, "test": 2}
    pixels = {}
    for split, n in per_split.items():
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            label = sorted(classes).index(c)
            for i in range(n):
                chans = 3 if mode == "RGB" else 1
                shift = 10 * label + i + 50 * (split == "test")
                a = (np.arange(size * size * chans).reshape(size, size, chans) + shift) % 256
                a = a.astype(np.uint8)
                Image.fromarray(a if chans == 3 else a[..., 0], mode).save(root / split / c / f"{i:03d}.png")
                pixels[(split, c, i)] = a.transpose(2, 0, 1)
    return pixels


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    return root, make_folder(root)


def test_synthetic_imagefolder_loads_pixels_labels_and_classes(folder, tmp_path):
    root, pixels = folder
    data = load("imagefolder", root=str(root), image_size=8, num_classes=3, cache_dir=str(tmp_path / "c"), workers=1)
    assert data.classes == ["ant", "bee", "cat"]
    assert (len(data.train), len(data.test)) == (9, 6)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (9, 3, 8, 8)
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert (data.num_classes, data.in_chans, data.image_size) == (3, 3, 8)
    assert torch.equal(data.train.images[4], torch.from_numpy(pixels[("train", "bee", 1)]))
    assert torch.equal(data.test.images[5], torch.from_numpy(pixels[("test", "cat", 1)]))


def test_imagefolder_resizes_odd_images_grey_and_parallel(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, per_split={"train": 2, "val": 1}, size=8, mode="L")
    Image.new("L", (20, 12), 200).save(root / "train" / "ant" / "big.png")
    data = load(
        "imagefolder",
        root=str(root),
        test_split="val",
        image_size=8,
        in_chans=1,
        cache_dir=str(tmp_path / "c"),
        workers=2,
    )
    assert data.train.images.shape == (7, 1, 8, 8) and data.test.images.shape == (3, 1, 8, 8)
    assert data.train.images[2].eq(200).all()  # ant/big.png sorts after 000/001, resized to 8x8


def _decoded(folder) -> list[str]:
    """The decoded copies in a decode-cache folder (beside them: the files' digests, ``files-*.sha1``)."""
    return [f for f in os.listdir(folder) if f.endswith(".pt")]


def test_second_load_hits_the_decode_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    kw = dict(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    first = load("imagefolder", **kw)
    assert len(_decoded(tmp_path / "c")) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(imagefolder_module, "decode_files", no_decode)
    second = load("imagefolder", **kw)
    assert torch.equal(first.train.images, second.train.images) and first.identity == second.identity


def test_cache_dir_env_override_and_key_follows_the_files(folder, tmp_path, monkeypatch):
    root, _ = folder
    monkeypatch.setenv("KDRUN_CACHE_DIR", str(tmp_path / "env"))
    first = load("imagefolder", root=str(root), image_size=8, workers=1)
    assert len(_decoded(tmp_path / "env")) == 1
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "train" / "ant" / "000.png")
    second = load("imagefolder", root=str(root), image_size=8, workers=1)
    assert second.identity != first.identity and len(_decoded(tmp_path / "env")) == 2
    assert second.train.images[0, :, 0, 0].tolist() == [1, 2, 3]
    assert load("imagefolder", root=str(root), image_size=4, workers=1).image_size == 4


def test_corrupt_cache_is_rebuilt_with_a_warning(folder, tmp_path, caplog):
    root, _ = folder
    kw = dict(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    good = load("imagefolder", **kw)
    (path,) = (tmp_path / "c").glob("*.pt")
    blob = torch.load(path, weights_only=True)
    blob["tensors"]["train"][0, 0, 0, 0] ^= 1  # one flipped bit: still a readable file
    torch.save(blob, path)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        again = load("imagefolder", **kw)
    assert "corrupt" in caplog.text
    assert torch.equal(again.train.images, good.train.images)
    key = again.identity.removeprefix("imagefolder-")
    assert load_cached(str(path), key) is not None  # rewritten intact
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        assert torch.equal(load("imagefolder", **kw).train.images, good.train.images)
    assert "unreadable" in caplog.text


def test_imagefolder_errors_are_one_line(folder, tmp_path):
    root, _ = folder
    kw = dict(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    one_line_error(lambda: load("imagefolder", **kw, num_classes=10), "dataset.num_classes=10", "3 class folders")
    one_line_error(lambda: load("imagefolder", **kw, test_split="val"), "dataset.test_split=val")
    one_line_error(lambda: load("imagefolder", root=None), "dataset.root")
    for f in (root / "test" / "bee").iterdir():
        f.unlink()
    one_line_error(lambda: load("imagefolder", **kw), "test/bee has no images")
    (root / "test" / "bee").rmdir()
    one_line_error(lambda: load("imagefolder", **kw), "class 'bee'", "test_split")


def test_class_folders_that_would_lose_or_double_a_class_are_refused(tmp_path):
    """A class folder that is a link to nothing (a share not mounted) was dropped without a word; two names in two
    Unicode normalisations were two classes printed alike; a name that is not UTF-8 ended in a traceback."""
    kw = dict(image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    root = tmp_path / "link"
    make_folder(root, classes=("ant", "bee"))
    os.symlink(tmp_path / "unmounted", root / "train" / "cat")
    one_line_error(lambda: load("imagefolder", root=str(root), **kw), "train/cat: a link to", "which does not exist")
    root = tmp_path / "twins"
    make_folder(root, classes=("ant", nfc, nfd))
    one_line_error(lambda: load("imagefolder", root=str(root), **kw), "'cafe\\u0301' and 'caf\\xe9'", "(NFC and NFD)")
    root = tmp_path / "split"
    make_folder(root, classes=("ant", nfc), per_split={"train": 3})
    make_folder(root, classes=("ant", nfd), per_split={"test": 2})
    one_line_error(
        lambda: load("imagefolder", root=str(root), **kw),
        "test/ has classes not in train/: cafe\u0301 (the same names in two Unicode normalisations",
        "'cafe\\u0301' in test/, 'caf\\xe9' in train/",
    )
    one_line_error(  # the root one level too deep
        lambda: load("imagefolder", root=str(tmp_path / "link" / "train"), **kw),
        f"dataset.root={tmp_path / 'link' / 'train'}: a split folder, not the data set's; give dataset.root="
        f"{tmp_path / 'link'} (expected",
    )
    root = tmp_path / "bytes"
    make_folder(root, classes=("ant", "bee"))
    bad = os.fsencode(root / "train" / "bee") + b"/\xff.png"
    os.rename(os.fsencode(root / "train" / "bee" / "000.png"), bad)
    one_line_error(lambda: load("imagefolder", root=str(root), **kw), "bee/\\xff.png: its name is not valid UTF-8")


def test_imagefolder_layout_errors_name_the_folder_and_the_fix(folder, tmp_path):
    root, _ = folder
    kw = dict(image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    missing = tmp_path / "nowhere"
    one_line_error(lambda: load("imagefolder", root=str(missing), **kw), f"dataset.root={missing}: no such folder")
    one_line_error(
        lambda: load("imagefolder", root=str(root), test_split="train", **kw),
        "dataset.test_split=train: the same folder as dataset.train_split",
    )
    os.symlink(root / "train", root / "train_link")  # another name of the same folder (or Train on macOS)
    one_line_error(
        lambda: load("imagefolder", root=str(root), test_split="train_link", **kw),
        "dataset.test_split=train_link: the same folder as dataset.train_split",
    )
    (root / "train_link").unlink()
    (root / "test").rename(root / "val")  # the usual other name of the held-out split
    one_line_error(lambda: load("imagefolder", root=str(root), **kw), "dataset.test_split=test", "test_split=val")
    one = tmp_path / "one"
    make_folder(one, classes=("cat",))
    one_line_error(lambda: load("imagefolder", root=str(one), **kw), "has 1 class folder", "at least 2")
    assert not (tmp_path / "c").exists()  # nothing decoded, nothing cached


def test_files_that_are_not_images_are_skipped_and_counted(folder, tmp_path, caplog):
    root, _ = folder
    (root / "train" / "ant" / "notes.txt").write_text("labels by hand")
    (root / "train" / "ant" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (root / "train" / "bee" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "bee" / "more" / "x.png")
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        data = load("imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    assert len(data.train) == 9
    assert "skipped 3 entries" in caplog.text and "notes.txt" in caplog.text, caplog.text
    assert "their subfolders hold 1 image, which kdrun does not read" in caplog.text  # what torchvision would read
    assert "dangling" not in caplog.text
    os.symlink(root / "nowhere.png", root / "train" / "cat" / "gone.png")  # a link to nothing: named as such
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        load("imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    assert "skipped 1 link to nothing (dangling), e.g. cat/gone.png" in caplog.text, caplog.text


def test_test_images_that_are_training_images_too_are_a_warning_each_run(folder, tmp_path, caplog):
    """A file copied (or linked) from the training split into the test split: the test split is not held out."""
    import shutil

    root, _ = folder
    kw = dict(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        load("imagefolder", **kw)
    assert "byte for byte training images" not in caplog.text
    (digest,) = (tmp_path / "c").glob("files-*.sha1")
    assert digest.read_text().splitlines()[1:] == ["leaks 0"]
    digest.write_text(digest.read_text().splitlines()[0] + "\n")  # as a kdrun before kept it: looked again
    load("imagefolder", **kw)
    assert digest.read_text().splitlines()[1:] == ["leaks 0"]
    shutil.copy(root / "train" / "ant" / "000.png", root / "test" / "bee" / "copy.png")
    os.symlink(root / "train" / "cat" / "001.png", root / "test" / "cat" / "link.png")
    for _ in range(2):  # the files hashed, then the digest read back: the warning both times
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kdrun"):
            load("imagefolder", **kw)
        assert "2 test images are byte for byte training images too (e.g. test/bee/copy.png = train/ant/000.png;" in (
            caplog.text
        ), caplog.text


def test_a_folder_that_cannot_be_read_or_a_split_that_is_not_a_subfolder_is_one_line(folder, tmp_path, monkeypatch):
    root, _ = folder
    kw = dict(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    for split in ("", ".", str(root)):
        expected = f"dataset.train_split={split}: must name"
        one_line_error(lambda s=split: load("imagefolder", **kw, train_split=s), expected)
    one_line_error(lambda: load("imagefolder", **kw, test_split="."), "dataset.test_split=.: must name a folder")
    one_line_error(lambda: load("imagefolder", **{**kw, "root": str(root / "train" / "cat" / "000.png")}), "a file")
    scandir, locked = os.scandir, str(root / "train" / "bee")

    def refuse(path="."):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)  # root cannot take permissions away: as an unreadable folder fails
    one_line_error(lambda: load("imagefolder", **kw), f"{locked}: not readable (Permission denied)")


def test_sixteen_bit_grey_images_are_scaled_to_eight_bits(tmp_path):
    """Pillow's own conversion of a 16-bit image to 8 bits clips: every pixel above 255 became 255."""
    root = tmp_path / "imgs"
    make_folder(root, classes=("a", "b"), size=4, mode="L")
    ramp = (np.arange(16, dtype=np.uint16) * 16).reshape(4, 4)
    Image.fromarray(ramp * 257).save(root / "train" / "a" / "000.png")  # 16 bits: 0 .. 61680
    with Image.open(root / "train" / "a" / "000.png") as im:
        assert im.mode.startswith("I;16")
    for chans in (1, 3):
        data = load("imagefolder", root=str(root), image_size=4, in_chans=chans, cache_dir=str(tmp_path / "c"))
        assert data.train.images[0].tolist() == [ramp.tolist()] * chans
    # 32-bit integers that say nothing of their depth: as they are in [0, 255] (not / 257: near black), else refused
    Image.fromarray(ramp.astype(np.int32)).save(root / "train" / "a" / "001.tif")
    data = load("imagefolder", root=str(root), image_size=4, in_chans=1, cache_dir=str(tmp_path / "c"))
    assert data.train.images[2, 0].tolist() == ramp.tolist()  # after 000.png, 001.png
    Image.fromarray(ramp.astype(np.int32) * 100).save(root / "train" / "a" / "001.tif")
    one_line_error(
        lambda: load("imagefolder", root=str(root), image_size=4, in_chans=1, cache_dir=str(tmp_path / "c")),
        "001.tif: 32-bit pixels in [0, 24000], whose range kdrun cannot know",
    )
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(root / "train" / "a" / "001.tif")
    one_line_error(
        lambda: load("imagefolder", root=str(root), image_size=4, in_chans=1, cache_dir=str(tmp_path / "c")),
        "001.tif: floating-point pixels",
    )


def test_a_new_decoder_makes_new_keys(folder, tmp_path, monkeypatch):
    """Images decoded (and teachers trained on them) before the decoder changed, e.g. 16-bit images clipped to
    white, are not reused: the dataset's identity, and so the decode cache and the store's keys, change with it."""
    from kdrun.data import decode

    root, _ = folder
    kw = dict(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    now = load("imagefolder", **kw).identity
    monkeypatch.setattr(decode, "DECODER", decode.DECODER - 1)
    assert load("imagefolder", **kw).identity != now


def test_an_image_too_large_for_pillow_and_an_unreadable_first_image_are_one_line(folder, tmp_path, monkeypatch):
    root, _ = folder
    kw = dict(root=str(root), cache_dir=str(tmp_path / "c"), workers=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # an 8x8 image is then a "decompression bomb"
    one_line_error(lambda: load("imagefolder", image_size=8, **kw), "000.png: not a readable image", "Decompression")
    monkeypatch.undo()
    (root / "train" / "ant" / "000.png").write_bytes(b"cut short")
    one_line_error(lambda: load("imagefolder", image_size=None, **kw), "ant/000.png: not a readable image")


def test_an_unwritable_decode_cache_warns_and_the_run_goes_on(folder, tmp_path, caplog):
    root, _ = folder
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        data = load("imagefolder", root=str(root), image_size=8, cache_dir=str(blocker / "cache"), workers=1)
    assert len(data.train) == 9 and "could not keep the decoded images" in caplog.text, caplog.text
    assert "could not keep the files' digest" in caplog.text, caplog.text
    assert blocker.read_text() == ""


# ---------------------------------------------------------------- torchvision datasets, idx files


def write_idx(path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(head + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("layout", ["gz", "torchvision"])
def test_mnist_reads_idx_files(tmp_path, layout):
    d, suffix = (tmp_path, ".gz") if layout == "gz" else (tmp_path / "MNIST" / "raw", "")
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x_tr, x_te = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 256, (20, 28, 28))
    for stem, arr in [
        ("train-images-idx3-ubyte", x_tr),
        ("train-labels-idx1-ubyte", np.arange(50) % 10),
        ("t10k-images-idx3-ubyte", x_te),
        ("t10k-labels-idx1-ubyte", np.arange(20) % 10),
    ]:
        write_idx(d / (stem + suffix), arr)
    data = load("mnist", root=str(tmp_path), num_classes=10, image_size=28, in_chans=1)
    assert data.train.images.shape == (50, 1, 28, 28) and len(data.test) == 20
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(x_te.astype(np.uint8)))
    assert data.train.labels.dtype == torch.int64 and data.train.labels[:12].tolist() == [*range(10), 0, 1]
    one_line_error(lambda: load("mnist", root=str(tmp_path), image_size=32), "dataset.image_size=32")


@pytest.mark.parametrize(
    "name, needles",
    [
        ("mnist", ["train-images-idx3-ubyte", "MNIST/raw"]),
        ("fashion_mnist", ["t10k-labels-idx1-ubyte", "FashionMNIST/raw"]),
        ("cifar10", ["cifar-10-batches-py"]),
        ("cifar100", ["cifar-100-python"]),
        ("svhn", ["train_32x32.mat"]),
    ],
)
def test_missing_files_say_what_is_expected_where(tmp_path, name, needles):
    one_line_error(
        lambda: load(name, root=str(tmp_path), download=False),
        f"dataset.root={tmp_path}",
        "dataset.download=true",
        *needles,
    )


# ---------------------------------------------------------------- augmentation and loaders


def test_augment_is_replayable_and_differs_across_views():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    index = torch.arange(64)
    aug = Augment(crop_pad=4, flip=True, seed=3)
    a = aug(images, index, torch.zeros(64, dtype=torch.long))
    assert torch.equal(a, aug(images.clone(), index, torch.zeros(64, dtype=torch.long)))
    assert torch.equal(a[10:20], aug(images[10:20], index[10:20], torch.zeros(10, dtype=torch.long)))
    b = aug(images, index, torch.ones(64, dtype=torch.long))
    assert (a != b).flatten(1).any(1).float().mean() > 0.9  # nearly every image gets another crop/flip
    assert not torch.equal(a, Augment(crop_pad=4, flip=True, seed=4)(images, index, torch.zeros(64, dtype=torch.long)))
    dy, dx, flip = aug.params(torch.arange(4000), torch.zeros(4000, dtype=torch.long))
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9)) and 0.4 < flip.float().mean() < 0.6


def test_select_mode():
    assert select_mode("auto", 9 * 2**30, 8) == "stream"
    assert select_mode("auto", 7 * 2**30, 8) == "memory"
    assert select_mode("memory", 9 * 2**30, 8) == "memory" and select_mode("stream", 1, 8) == "stream"
    one_line_error(lambda: select_mode("disk", 1, 8), "dataset.mode=disk", "auto, memory, stream")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_loader_yields_the_tensor_loaders_batches(folder, tmp_path, num_workers):
    root, _ = folder
    kw = dict(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    stream = load("imagefolder", **kw, max_memory_gb=1e-9)
    assert not (tmp_path / "c").exists() or not _decoded(tmp_path / "c")  # streaming writes no decoded cache
    memory = load("imagefolder", **kw, mode="memory")
    assert isinstance(stream.train, FileSet) and isinstance(memory.train, ImageSet)
    assert (stream.num_classes, stream.in_chans, stream.image_size) == (3, 3, 8)
    norm = Normalize([0.5] * 3, [0.25] * 3, 3, "cpu")
    common = dict(batch_size=4, normalize=norm, augment=Augment(2, True, 1), seed=5)
    ref = TensorLoader(memory.train, **common)
    got = StreamLoader(stream.train, **common, num_workers=num_workers)
    assert (len(got), got.num_samples) == (len(ref), ref.num_samples) == (2, 9)  # batches of 4 and 5 (not 4, 4, 1)
    for epoch, start in ((0, 0), (1, 1)):
        pairs = list(zip(ref.epoch(epoch, start), got.epoch(epoch, start), strict=True))
        assert len(pairs) == 2 - start
        if start == 0:
            assert sorted(torch.cat([a.index for a, _ in pairs]).tolist()) == list(range(9))
        for a, b in pairs:
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
            assert torch.equal(a.view, b.view)
    sub = stream.train.subset(torch.tensor([8, 0]))
    assert sub.labels.tolist() == [2, 0] and len(sub) == 2


def test_an_image_the_loaders_workers_cannot_decode_is_one_line_naming_it(tmp_path):
    """Streamed: the decoding happens in a DataLoader worker, whose exception used to reach the user as the
    worker's traceback ("Caught ConfigError in DataLoader worker process 0. Original Traceback ...")."""
    files = [str(tmp_path / f"{i}.png") for i in range(4)]
    for f in files[:3]:
        Image.new("L", (4, 4), 7).save(f)
    open(files[3], "wb").write(b"not an image")  # e.g. a download cut short
    data = FileSet(files, torch.tensor([0, 1, 0, 1]), 4, 1)
    loader = StreamLoader(data, 2, Normalize([0.5], [0.5], 1, "cpu"), shuffle=False, num_workers=1)
    first = next(iter(loader.epoch(0)))
    assert first.index.tolist() == [0, 1] and torch.equal(first.x, torch.full((2, 1, 4, 4), (7 / 255 - 0.5) / 0.5))
    one_line_error(lambda: list(loader.epoch(0)), f"{files[3]}: not a readable image")


@pytest.mark.parametrize(
    "n, drop_last, workers, sizes",
    [
        (129, False, 1, [64, 65]),  # a last batch of one image joins the one before
        (130, False, 1, [64, 64, 2]),
        (130, False, 2, [64, 66]),  # two workers: one image each
        (131, False, 2, [64, 64, 3]),
        (129, True, 1, [64, 64]),
        (128, False, 1, [64, 64]),
        (1, False, 1, [1]),
    ],
)
def test_an_epoch_never_ends_in_a_batch_of_one_image_per_worker(n, drop_last, workers, sizes):
    bounds = epoch_batches(n, 64, drop_last, workers)
    assert [s.stop - s.start for s in bounds] == sizes
    assert bounds[0].start == 0 and all(a.stop == b.start for a, b in zip(bounds, bounds[1:]))
    data = ImageSet(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.zeros(n, dtype=torch.long))
    norm = Normalize([0.5], [0.5], 1, "cpu")
    shares = [TensorLoader(data, 64, norm, drop_last=drop_last, shard=(r, workers)) for r in range(workers)]
    per_worker = [[len(b.y) for b in loader.epoch(0)] for loader in shares]
    assert per_worker == [[-(-size // workers) for size in sizes]] * workers  # a padded equal share of each
    seen = set(torch.cat([b.index for loader in shares for b in loader.epoch(3)]).tolist())
    assert len(seen) == (64 * (n // 64) if drop_last else n)  # every image in every epoch, unless dropped


# ---------------------------------------------------------------- the real shared copies (skip when absent)


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory):
    extracted = os.environ.get("KDRUN_CIFAR10_DIR", os.path.expanduser("~/.cache/kdrun-dev/cifar10-jpg"))
    if os.path.isdir(os.path.join(extracted, "train")):
        return extracted
    tarball = os.path.join(SHARED, "cifar10-jpg.tar.gz")
    if not os.path.isfile(tarball):
        pytest.skip(f"no CIFAR-10 JPEG copy at {tarball}")
    out = tmp_path_factory.mktemp("cifar10-jpg")
    with tarfile.open(tarball) as tar:
        tar.extractall(out, filter="data")
    return str(out)


def test_shared_mnist_folder_loads_60000_10000():
    root = os.path.join(SHARED, "mnist")
    if not os.path.isfile(os.path.join(root, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"no MNIST idx files in {root}")
    data = load("mnist", root=root, num_classes=10, image_size=28, in_chans=1)
    assert (len(data.train), len(data.test)) == (60_000, 10_000)
    assert torch.bincount(data.train.labels).tolist()[:2] == [5923, 6742]
    assert abs(data.train.images.float().mean().item() / 255 - 0.1307) < 1e-3


def test_shared_cifar10_imagefolder_and_its_cache(cifar10_folder, tmp_path, monkeypatch):
    kw = dict(root=cifar10_folder, image_size=32, num_classes=10, cache_dir=str(tmp_path / "c"))
    data = load("imagefolder", **kw)
    assert data.classes == CIFAR10_CLASSES
    assert (len(data.train), len(data.test)) == (50_000, 10_000)
    assert data.train.images.shape == (50_000, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert torch.bincount(data.train.labels).tolist() == [5000] * 10
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    assert abs(data.train.images[:, 0].float().mean().item() / 255 - 0.4914) < 0.01
    monkeypatch.setattr(imagefolder_module, "decode_files", None)  # a second load must not decode
    again = load("imagefolder", **kw)
    assert torch.equal(again.test.images, data.test.images)


def test_the_whole_training_split_as_transfer_set_is_not_a_second_copy():
    """dataset.student_fraction=1 with nothing excluded: the student stages train on the very split the teacher
    does, put on the device once (a second copy doubled the GPU memory the training images take)."""
    from kdrun.cli import compose
    from kdrun.run_data import RunData

    data = RunData(compose(["dataset.student_fraction=1.0"]), torch.device("cpu"))
    assert data.student_set is data.train_set
    data = RunData(compose(["dataset.student_fraction=0.5"]), torch.device("cpu"))
    assert data.student_set is not data.train_set and len(data.student_set) < len(data.train_set)


def test_top1_breaks_exact_ties_as_errors_agreement_and_mcnemar_do():
    """All-equal logits: argmax takes class 0 (the errors, agreement and McNemar count), topk took another."""
    from kdrun.evaluation import accuracy

    logits, labels = torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    assert accuracy(logits, labels, ks=(1,)) == [100.0]
    assert (logits.argmax(1) == labels).all()
    # top-k breaks the ties the same way, by class index: right at top-1 is right at top-5 (topk took 5-9 here)
    assert accuracy(logits, labels, ks=(1, 5)) == [100.0, 100.0]
    assert accuracy(logits, torch.tensor([4, 5, 9, 0]), ks=(1, 5)) == [25.0, 50.0]


def test_a_logit_beyond_fp16_is_refused_by_the_cache_not_stored_as_inf():
    from kdrun.cache import CacheShape, decode, encode
    from kdrun.errors import KdrunError

    shape = CacheShape(2, 0, 3, None)
    ok = torch.tensor([[60000.0, 1.0, -60000.0]])
    assert torch.equal(decode(encode(ok, shape), shape), ok.half().float())
    with pytest.raises(KdrunError, match=r"cache: a teacher logit of magnitude 7e\+04 does not fit the cache's fp16"):
        encode(torch.tensor([[70000.0, 1.0, 0.0]]), shape)
    with pytest.raises(KdrunError, match="does not fit"):
        encode(torch.tensor([[float("nan"), 1.0, 0.0]]), shape)


def test_errors_count_by_true_class_and_top_k_by_rank():
    from kdrun.evaluation import accuracy
    from kdrun.report import _scores

    logits = torch.tensor([[0.0, 5, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0, 0], [0.0, 0, 9, 0, 0, 0, 0]])
    scores = _scores(logits, torch.tensor([0, 0, 2]))
    assert scores["errors"] == 1 and scores["errors_by_class"] == [1, 0, 0, 0, 0, 0, 0]  # a 0 called 1: class 0's
    ranked = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]])  # the label, class 4, ranked exactly 5th
    assert accuracy(ranked, torch.tensor([4]), ks=(1, 4, 5)) == [0.0, 0.0, 100.0]


def test_the_validation_split_follows_the_seed_and_keeps_the_draw_the_presets_chose_on():
    """The presets' recorded choices were made on these splits: the draw is pinned, and each seed has its own."""
    from kdrun.run_data import split_validation

    train = ImageSet(torch.zeros(20, 1, 2, 2, dtype=torch.uint8), torch.arange(20))  # label = index

    def held_out(seed):
        rest, val = split_validation(train, 0.2, seed)
        assert sorted(rest.labels.tolist() + val.labels.tolist()) == list(range(20))  # held out of training
        return val.labels.tolist()

    assert held_out(0) == [9, 12, 15, 17] and held_out(1) == [3, 11, 17, 18]


def test_a_validation_split_that_takes_a_whole_class_is_a_warning(caplog):
    from kdrun.run_data import split_validation, warn_classes_held_out

    data = ImageSet(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, 1]))
    for seed in range(50):  # a seed whose draw holds out the one image of class "b"
        train, val = split_validation(data, 0.2, seed)
        if 1 in val.labels.tolist():
            break
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        warn_classes_held_out(train, ["a", "b"])
    assert "holds out every training image of 1 class(es): b" in caplog.text
    caplog.clear()
    warn_classes_held_out(data, ["a", "b"])
    assert not caplog.text


def test_workers_0_decodes_in_the_main_process_not_in_2_workers(folder, tmp_path, monkeypatch):
    """dataset.workers=0 used to become 2 DataLoader workers (``or 2``), and all CPUs for the decode pool."""
    from omegaconf import OmegaConf

    from kdrun.data import decode
    from kdrun.data.stream import stream_workers

    assert [stream_workers(OmegaConf.create({"workers": w})) for w in (0, 3, None)] == [0, 3, 2]
    root, _ = folder
    monkeypatch.setattr(decode, "ProcessPoolExecutor", lambda *a: pytest.fail("a process pool for workers=0"))
    data = load("imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=0)
    assert len(data.train) == 9


def _ppm_folder(root, seed, size=8, per_split=None):
    """Two classes of random PPM images: uncompressed, so every file has the same size whatever its pixels."""
    g = np.random.default_rng(seed)
    for split, n in (per_split or {"train": 3, "test": 3}).items():
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(n):
                pixels = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.ppm")


def test_the_content_key_is_the_files_bytes_not_their_place_times_or_sizes(tmp_path):
    """Copied elsewhere with new times: another identity (the decoded copy's key), the same content key (the store's,
    `kdrun compare`'s). Other pictures under the same names, every file the same size: another content key."""
    import shutil

    kw = dict(image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    _ppm_folder(tmp_path / "one", seed=0)
    _ppm_folder(tmp_path / "other", seed=1)
    shutil.copytree(tmp_path / "one", tmp_path / "copy", copy_function=shutil.copyfile)
    for f in (tmp_path / "copy").rglob("*.ppm"):
        os.utime(f, (1_000_000_000, 1_000_000_000))
    one, copy, other = (load("imagefolder", root=str(tmp_path / d), **kw) for d in ("one", "copy", "other"))
    sizes = {f.stat().st_size for d in ("one", "other") for f in (tmp_path / d).rglob("*.ppm")}
    assert len(sizes) == 1  # nothing but the bytes tells the folders apart
    assert one.identity != copy.identity and one.content_key() == copy.content_key()
    assert other.content_key() != one.content_key()
    assert load("imagefolder", root=str(tmp_path / "one"), **{**kw, "image_size": 4}).content_key() != one.content_key()


def test_the_files_digest_is_kept_and_a_damaged_one_computed_again(folder, tmp_path, monkeypatch):
    from kdrun.data import decode

    root, _ = folder
    kw = dict(root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1)
    first = load("imagefolder", **kw)
    (kept,) = (tmp_path / "c").glob("files-*.sha1")
    with monkeypatch.context() as m:  # the decoded copy is read back too: no pass over the files shows a bar
        m.setattr(decode, "progress", lambda **k: pytest.fail("hashed the files again"))
        assert load("imagefolder", **kw).content_key() == first.content_key()
    kept.write_text("cut sho")
    assert load("imagefolder", **kw).content_key() == first.content_key()
    assert re.fullmatch(r"[0-9a-f]{40}\nleaks 0\n", kept.read_text())


def test_a_file_that_cannot_be_read_for_the_digest_is_one_line(folder, tmp_path, monkeypatch):
    from kdrun.data import decode

    root, _ = folder
    locked = str(root / "train" / "bee" / "001.png")

    def refuse(name, *a, **k):
        if name == locked:
            raise PermissionError(13, "Permission denied", name)
        return open(name, *a, **k)

    monkeypatch.setattr(decode, "open", refuse, raising=False)
    one_line_error(
        lambda: load("imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), workers=1),
        f"{locked}: not readable (Permission denied)",
    )


def test_an_image_folder_normalised_with_imagenet_statistics_far_from_its_own_is_warned(tmp_path, caplog):
    """Custom data took ImageNet's mean and std (the image folder default) without a word; the data's own are said,
    unless a model starts from ImageNet weights (which want ImageNet's) or the statistics were given."""
    from kdrun.cli import compose
    from kdrun.run_data import RunData

    make_folder(tmp_path / "imgs", per_split={"train": 4, "test": 2}, size=8)
    base = ["trainer=smoke", "dataset=imagefolder", f"dataset.root={tmp_path / 'imgs'}", "dataset.image_size=8"]
    base += [f"dataset.cache_dir={tmp_path / 'c'}", "dataset.workers=1"]
    cases = [([], True), (["dataset.mean=[0.5,0.5,0.5]"], False), (["teacher.pretrained=x.pt"], False)]
    for extra, warned in [*cases, (["teacher.checkpoint=t.pt"], False)]:  # trained with these statistics
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kdrun"):
            RunData(compose([*base, *extra]), torch.device("cpu"))
        assert ("normalised with ImageNet's statistics" in caplog.text) == warned, (extra, caplog.text)
        assert not warned or "give dataset.mean=[" in caplog.text
