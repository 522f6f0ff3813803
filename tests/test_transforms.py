"""ImageNet-style replayable transforms: random-resized crop boxes, the evaluation resize + centre crop, and
stream mode's (index, view) pixels, bit-identical however and whenever they are produced."""

import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from kdrun.data.base import FileSet, ImageSet
from kdrun.data.decode import decode_files
from kdrun.data.loader import Augment, Normalize, TensorLoader
from kdrun.data.stream import StreamLoader
from kdrun.data.transforms import RandomResizedCrop, fit_image, make_augment, to_array
from kdrun.errors import ConfigError


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- crop parameters


@pytest.mark.parametrize("height, width", [(32, 32), (375, 500), (480, 120), (7, 9)])
def test_resized_crop_boxes_lie_inside_with_area_and_ratio_in_range(height, width):
    rrc = RandomResizedCrop(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=3)
    n = 2000
    index, view = torch.arange(n), torch.arange(n) % 5
    b = rrc.boxes(index, view, height, width)
    assert (b.top >= 0).all() and (b.left >= 0).all() and (b.height >= 1).all() and (b.width >= 1).all()
    assert (b.top + b.height <= height).all() and (b.left + b.width <= width).all()
    # rounding to whole pixels moves area and ratio by at most half a pixel per side
    h, w = b.height.double(), b.width.double()
    area = h * w / (height * width)
    slack_area = ((h + 0.5) * (w + 0.5) - h * w) / (height * width)
    fallback = (h == height) | (w == width)  # after 10 misses: the largest centred box of an allowed ratio
    ok = ~fallback
    assert (area[ok] >= 0.08 - slack_area[ok]).all() and (area <= 1.0).all()
    ratio = w / h
    assert (ratio[ok] >= 3 / 4 * (w[ok] - 0.5) / w[ok] * h[ok] / (h[ok] + 0.5)).all()
    assert (ratio[ok] <= 4 / 3 * (w[ok] + 0.5) / w[ok] * h[ok] / (h[ok] - 0.5)).all()
    if min(height, width) >= 32 and 3 / 4 <= width / height <= 4 / 3:
        assert area.min() < 0.15 and area.max() > 0.8  # the whole scale range is used
        assert ok.float().mean() > 0.9
    assert 0.45 < b.flip.float().mean() < 0.55
    # deterministic, independent of the batch it is computed in, and a function of the seed and the view
    again = rrc.boxes(index.flip(0), view.flip(0), height, width)
    assert torch.equal(again.top.flip(0), b.top) and torch.equal(again.width.flip(0), b.width)
    one = rrc.boxes(index[7:8], view[7:8], height, width)
    assert (int(one.top), int(one.left), int(one.height), int(one.width)) == tuple(
        int(t[7]) for t in (b.top, b.left, b.height, b.width)
    )
    other_seed = RandomResizedCrop(seed=4).boxes(index, view, height, width)
    other_view = rrc.boxes(index, view + 1, height, width)
    for other in (other_seed, other_view):
        assert (other.top != b.top).float().mean() > 0.5 or (other.width != b.width).float().mean() > 0.5
    assert not RandomResizedCrop(flip=False, seed=3).boxes(index, view, height, width).flip.any()


def test_resized_crop_falls_back_to_torchvisions_centre_crop():
    """A 10 x 200 strip: no box of area >= 8 % and ratio <= 4/3 fits, so every try fails."""
    b = RandomResizedCrop(seed=0).boxes(torch.arange(20), torch.zeros(20, dtype=torch.long), 10, 200)
    w = int(round(10 * 4 / 3))  # torchvision: in_ratio > max(ratio) -> h = height, w = round(h * max(ratio))
    assert set(b.height.tolist()) == {10} and set(b.width.tolist()) == {w}
    assert set(b.top.tolist()) == {0} and set(b.left.tolist()) == {(200 - w) // 2}


def test_resized_crop_one_image_is_torchvisions_crop_resize_and_flip():
    im = _image(47, 61)
    rrc = RandomResizedCrop(seed=1)
    for i in range(12):
        b = rrc.boxes(torch.tensor([i]), torch.tensor([2]), 47, 61)
        ref = TF.resized_crop(im, int(b.top), int(b.left), int(b.height), int(b.width), [24, 24])
        ref = TF.hflip(ref) if bool(b.flip) else ref
        assert np.array_equal(rrc.one(im, i, 2, 24), to_array(ref))


def test_resized_crop_in_memory_crops_the_stored_images_in_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8, generator=g)
    index, view = torch.arange(16), torch.full((16,), 3)
    rrc = RandomResizedCrop(seed=5)
    out = rrc(images, index, view)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out[4:9], rrc(images[4:9], index[4:9], view[4:9]))  # one sample's pixels need no others
    assert not torch.equal(out, rrc(images, index, view + 1))
    # a box covering the whole image, not flipped, gives the image back
    whole = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, seed=5)
    assert torch.equal(whole(images, index, view), images)
    flipped = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True, seed=5)
    f = flipped.boxes(index, view, 20, 20).flip
    assert f.any() and not f.all()
    assert torch.equal(flipped(images, index, view), torch.where(f.view(-1, 1, 1, 1), images.flip(-1), images))


# ---------------------------------------------------------------- evaluation view


@pytest.mark.parametrize("h, w", [(200, 300), (300, 200), (256, 256), (100, 100)])
def test_eval_view_resizes_the_shorter_side_then_centre_crops(h, w):
    im = _image(h, w)
    got = fit_image(im, 224, 0.875)
    assert got.size == (224, 224)
    ref = T.Compose([T.Resize(256), T.CenterCrop(224)])(im)  # 224 / 0.875 = 256
    assert np.array_equal(to_array(got), to_array(ref))
    plain = fit_image(im, 64)  # no crop fraction: the whole image squeezed to the square, as before
    assert np.array_equal(to_array(plain), to_array(im.resize((64, 64), Image.Resampling.BILINEAR)))


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "mixup"}, "dataset.augment.kind=mixup: valid: pad_crop, random_resized_crop"),
        (
            {"crop_pads": 4},
            "dataset.augment.crop_pads: unknown key; valid keys: kind, crop_pad, flip, cutout, scale, ratio",
        ),
        ({"cutout": -1}, "dataset.augment.cutout=-1: must be an integer >= 0"),
        ({"kind": "random_resized_crop", "cutout": 8}, "dataset.augment.cutout=8: only with kind=pad_crop"),
        ({"kind": "random_resized_crop", "scale": [0.5, 0.1]}, "dataset.augment.scale=[0.5, 0.1]: must be"),
        ({"ratio": [0, 1]}, "dataset.augment.ratio=[0, 1]: must be"),
        ({"flip": "yes"}, "dataset.augment.flip=yes: must be true or false"),
        ({"crop_pad": -1}, "dataset.augment.crop_pad=-1: must be an integer >= 0"),
    ],
)
def test_make_augment_names_the_bad_key(spec, message):
    with pytest.raises(ConfigError) as e:
        make_augment(spec, 0)
    assert str(e.value).startswith(message)


def test_make_augment_defaults_keep_pad_crop_and_its_store_identity():
    a = make_augment({"crop_pad": 4, "flip": True}, 7)
    assert a == Augment(4, True, 7) and a.identity() == [4, True]  # the store keys of before
    full = make_augment({"kind": "pad_crop", "crop_pad": 4, "flip": True, "scale": [0.08, 1], "ratio": [0.75, 1]}, 7)
    assert full == a
    r = make_augment({"kind": "random_resized_crop", "crop_pad": 4, "flip": True, "scale": [0.25, 1]}, 7)
    assert r == RandomResizedCrop((0.25, 1.0), (0.75, 4 / 3), True, 7) and r.identity()[0] == "random_resized_crop"
    cut = make_augment({"crop_pad": 4, "flip": True, "cutout": 8}, 7, mean=[0.4913, 0.4821, 0.4465])
    assert cut == Augment(4, True, 7, cutout=8, fill=(125, 123, 114))  # the mean colour: 0 once normalised
    assert cut.identity() == [4, True, {"cutout": 8, "fill": [125, 123, 114]}]
    with pytest.raises(ConfigError, match=r"^teacher\.augment\.cutout=x: must be an integer >= 0"):
        make_augment({"cutout": "x"}, 7, where="teacher.augment")


def test_cutout_erases_one_square_of_the_mean_colour_replayably():
    """Each image loses one cutout x cutout square (only its part inside the image when the hashed centre is
    near an edge), every channel set to its fill; the square is a function of (seed, index, view)."""
    n, size, side = 400, 16, 6
    cut = Augment(0, False, seed=5, cutout=side, fill=(10, 20, 30))
    images = torch.full((n, 3, size, size), 200, dtype=torch.uint8)
    index, view = torch.arange(n), torch.arange(n) % 3
    out = cut(images, index, view)
    erased = out[:, 0] == 10
    assert torch.equal(erased, out[:, 1] == 20) and torch.equal(erased, out[:, 2] == 30)
    assert ((out == 200) | erased[:, None]).all()  # nothing else touched
    rows, cols = erased.any(2), erased.any(1)
    assert torch.equal(erased, rows[:, :, None] & cols[:, None, :])  # one axis-aligned rectangle
    height, width = rows.sum(1), cols.sum(1)
    assert (height >= side // 2).all() and (height <= side).all() and (width <= side).all()
    clipped = rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1]
    assert ((height * width == side * side) | clipped).all() and 0 < clipped.float().mean() < 0.7
    first_row = rows.float().argmax(1)
    assert len(first_row.unique()) > size // 2  # the squares wander over the whole image
    again = cut(images[:50].flip(0), index[:50].flip(0), view[:50].flip(0)).flip(0)
    assert torch.equal(again, out[:50])  # replayable, in any batch
    assert not torch.equal(cut(images, index, view + 1), out)
    assert torch.equal(Augment(0, False, seed=5)(images, index, view), images)  # cutout 0: off


# ---------------------------------------------------------------- stream mode: replayable views


@pytest.fixture
def files(tmp_path) -> FileSet:
    """14 RGB images of assorted sizes and aspect ratios in two classes."""
    paths, labels = [], []
    sizes = [(40, 30), (30, 40), (64, 48), (25, 70), (33, 33), (50, 20), (45, 60)]
    for i in range(14):
        h, w = sizes[i % len(sizes)]
        p = tmp_path / f"{i}.png"
        _image(h, w, seed=i).save(p)
        paths.append(str(p))
        labels.append(i % 2)
    return FileSet(paths, torch.tensor(labels), 16, 3)


def _pixels_by_pair(loader, epochs) -> dict:
    out = {}
    for e in epochs:
        for b in loader.epoch(e):
            for i, v, x in zip(b.index.tolist(), b.view.tolist(), b.x):
                assert (i, v) not in out or torch.equal(out[(i, v)], x)
                out[(i, v)] = x
    return out


@pytest.mark.parametrize("augment", [RandomResizedCrop(seed=11), Augment(3, True, 11)], ids=["rrc", "pad_crop"])
def test_stream_views_are_bit_identical_however_and_whenever_they_are_made(files, augment):
    norm = Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 3, "cpu")
    views = 4
    common = dict(normalize=norm, augment=augment, seed=11, views=views)
    # the student stage: batch 4, two decoding workers, one process
    student = _pixels_by_pair(StreamLoader(files, 4, **common, num_workers=2), range(3))
    # the same pairs from another loader shape: batch 3, no workers, two data-parallel shards
    sharded = {}
    for rank in (0, 1):
        sharded |= _pixels_by_pair(StreamLoader(files, 3, **common, num_workers=0, shard=(rank, 2)), range(3))
    common_pairs = set(student) & set(sharded)
    assert len(common_pairs) >= 10
    assert all(torch.equal(student[p], sharded[p]) for p in common_pairs)
    # recomputed later for given pairs, in another order, in batches of 5
    pairs = sorted(student, reverse=True)
    index, view = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    later = StreamLoader(files, 8, **common, num_workers=1)
    rebuilt = torch.cat([b.x for b in later.batches(index, view, batch_size=5)])
    assert torch.equal(rebuilt, torch.stack([student[p] for p in pairs]))
    # every image of every view is at image_size, and views of one image differ
    assert rebuilt.shape[1:] == (3, 16, 16)
    every = StreamLoader(files, 8, **common, num_workers=0)
    index, view = torch.arange(14).repeat(views), torch.arange(views).repeat_interleave(14)
    per_view = torch.cat([b.x for b in every.batches(index, view)]).view(views, 14, 3, 16, 16)
    for v in range(1, views):
        assert (per_view[v] != per_view[0]).flatten(1).any(1).float().mean() > 0.7


def test_stream_eval_view_is_the_decoded_memory_view(files):
    """views=0 (evaluation): resize + centre crop in the worker, the pixels memory mode decodes and keeps;
    pad-crop views of it are the same in both modes."""
    norm = Normalize([0.5] * 3, [0.25] * 3, 3, "cpu")
    cropped = FileSet(files.files, files.labels, 16, 3, crop_fraction=0.875)
    stream = StreamLoader(cropped, 5, norm, RandomResizedCrop(seed=1), shuffle=False, views=0, num_workers=0)
    memory_images = decode_files(files.files, 16, 3, workers=1, crop_fraction=0.875)
    memory = TensorLoader(
        ImageSet(memory_images, files.labels), 5, norm, RandomResizedCrop(seed=1), shuffle=False, views=0
    )
    for a, b in zip(stream.epoch(0), memory.epoch(0), strict=True):
        assert torch.equal(a.x, b.x)
    # pad-crop perturbs that view in both modes alike
    common = dict(shuffle=True, seed=3, views=2)
    stream = StreamLoader(cropped, 5, norm, Augment(2, True, 3), **common, num_workers=0)
    memory = TensorLoader(ImageSet(memory_images, files.labels), 5, norm, Augment(2, True, 3), **common)
    for a, b in zip(stream.epoch(1), memory.epoch(1), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.view, b.view)
    ref = T.Compose([T.Resize(round(16 / 0.875)), T.CenterCrop(16)])(Image.open(files.files[3]).convert("RGB"))
    assert torch.equal(memory_images[3], torch.from_numpy(to_array(ref)))


# ---------------------------------------------------------------- the development copies (skip when absent)

DEV_CACHE = os.environ.get("KDRUN_DEV_CACHE", os.path.expanduser("~/.cache/kdrun-dev"))


@pytest.mark.parametrize(
    "name, split, classes, size", [("imagenette", "val", 10, 224), ("tiny-imagenet-200", "val", 200, 64)]
)
def test_development_copies_stream_replayable_views(name, split, classes, size):
    """scripts/prepare_dev_data.py's folders: the class count, and real JPEGs' views replayed exactly."""
    root = os.path.join(DEV_CACHE, name)
    if not os.path.isdir(os.path.join(root, split)):
        pytest.skip(f"{root} absent (see DEVELOPERS.md)")
    wnids = sorted(os.listdir(os.path.join(root, "train")))
    assert len(wnids) == classes and sorted(os.listdir(os.path.join(root, split))) == wnids
    paths = [os.path.join(root, split, w, sorted(os.listdir(os.path.join(root, split, w)))[0]) for w in wnids[:6]]
    files = FileSet(paths, torch.arange(6), size, 3, crop_fraction=0.875)
    norm = Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 3, "cpu")
    loader = StreamLoader(files, 4, norm, RandomResizedCrop(seed=2), seed=2, views=2, num_workers=0)
    seen = _pixels_by_pair(loader, range(2))
    pairs = sorted(seen)
    index, view = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    again = torch.cat([b.x for b in loader.batches(index, view, batch_size=3)])
    assert again.shape[1:] == (3, size, size) and torch.equal(again, torch.stack([seen[p] for p in pairs]))
