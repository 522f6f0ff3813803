"""Replayable augmentations: every augmented image is a pure function of (seed, sample index, view).

The parameters of each (index, view) (crop offsets, crop box, flip) are hashed from those integers with
:func:`hash3`, never drawn from a stateful RNG, so the pixels a teacher saw when its logits were cached can be
rebuilt later, in any order, by any process. Two kinds (``dataset.augment.kind``):

- :class:`Augment` (``pad_crop``, the CIFAR recipe): pad by ``crop_pad`` pixels, crop back, maybe flip, maybe
  erase a ``cutout`` x ``cutout`` square (DeVries & Taylor 2017);
- :class:`RandomResizedCrop` (``random_resized_crop``, the ImageNet recipe): a crop of ``scale`` of the area
  and aspect ratio in ``ratio`` (torchvision's rule: 10 tries, then a centre crop), resized to the image size,
  maybe flipped.

Each has two implementations of the same function: ``__call__`` on a uint8 batch ``[B, C, H, W]`` (memory mode,
on the device; random-resized crop then crops the stored, already resized image), and ``one`` on one decoded
PIL image (stream mode, in the DataLoader workers: the crop is taken from the file's full-resolution pixels).
:func:`make_augment` builds one from the ``dataset.augment`` mapping and checks every key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kdrun.errors import ConfigError

_M31 = 0x7FFFFFFF
TRIES = 10  # torchvision's RandomResizedCrop: tries before the centre-crop fallback


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (products stay below 2^62: no int64 overflow)."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _M31
    return x ^ (x >> 15)


def hash3(seed: int, index: torch.Tensor, view: torch.Tensor, salt: int) -> torch.Tensor:
    """Deterministic pseudo-random 31-bit integers for each (seed, index, view, salt)."""
    h = _mix(torch.full_like(index, (seed * 7919 + salt) & _M31))
    h = _mix(h ^ (index & _M31))
    return _mix(h ^ (view & _M31))


def to_array(im: Image.Image) -> np.ndarray:
    """A PIL image (mode L or RGB) -> uint8 ``[C, H, W]``."""
    a = np.array(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def fit_image(im: Image.Image, size: int, crop_fraction: float | None = None) -> Image.Image:
    """The un-augmented view at ``size`` x ``size``.

    ``crop_fraction`` None: the whole image resized to the square (unchanged when it already is); a fraction:
    the evaluation recipe of ImageNet, the shorter side resized to ``round(size / crop_fraction)`` (longer side
    in proportion, as torchvision's ``Resize``), then the centre ``size`` x ``size`` crop (as ``CenterCrop``).
    """
    if crop_fraction is None:
        return im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BILINEAR)
    w, h = im.size
    short = int(round(size / crop_fraction))
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class Augment:
    """``pad_crop``: pad-and-random-crop plus horizontal flip, parameters hashed from (seed, index, view).

    ``cutout`` > 0 then sets a ``cutout`` x ``cutout`` square of every image to ``fill`` (one uint8 value per
    channel, or one for all: the dataset's mean colour, which is 0 after normalisation, as in DeVries & Taylor,
    "Improved regularization of convolutional neural networks with cutout", 2017). As in their code, the square's
    centre is any pixel, so near an edge only the part inside the image is erased (Page's ResNet-9 code keeps the
    whole square inside).
    """

    crop_pad: int = 0
    flip: bool = False
    seed: int = 0
    cutout: int = 0
    fill: tuple[int, ...] = (0,)

    @property
    def enabled(self) -> bool:
        return self.crop_pad > 0 or self.flip or self.cutout > 0

    def identity(self) -> list:
        """What determines the pixels (store keys), without the seed; ``cutout`` only when set, so the keys
        of runs without it are those of before it existed."""
        return [self.crop_pad, self.flip, *([{"cutout": self.cutout, "fill": list(self.fill)}] if self.cutout else [])]

    def params(self, index: torch.Tensor, view: torch.Tensor):
        span = 2 * self.crop_pad + 1
        dy = hash3(self.seed, index, view, 1) % span
        dx = hash3(self.seed, index, view, 2) % span
        flip = (hash3(self.seed, index, view, 3) & 1).bool() & self.flip
        return dy, dx, flip

    def __call__(self, images: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Augment a uint8 batch [B, C, H, W]; returns uint8 of the same shape.

        Pad, crop and flip are one gather: every output pixel reads its source pixel, or a zero
        appended after the last one where the crop window reaches into the padding.
        """
        if not self.enabled:
            return images
        B, C, H, W = images.shape
        dev, p = images.device, self.crop_pad
        index, view = index.to(dev), view.to(dev)
        dy, dx, flip = self.params(index, view)
        rows = dy[:, None] - p + torch.arange(H, device=dev)  # [B, H] source row of each output row
        j = torch.arange(W, device=dev)
        cols = dx[:, None] - p + torch.where(flip[:, None], W - 1 - j, j)  # [B, W]
        inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
        src = torch.where(inside, rows[:, :, None] * W + cols[:, None, :], H * W)  # [B, H, W]; H*W: the zero
        flat = F.pad(images.reshape(B, C, H * W), (0, 1))
        out = flat.gather(2, src.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)
        return self.erase(out, index, view) if self.cutout else out

    def erase(self, images: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Cutout: the square of side ``cutout`` centred on a hashed pixel of each image, set to ``fill``."""
        B, C, H, W = images.shape
        dev, half = images.device, self.cutout // 2
        cy = hash3(self.seed, index, view, 4) % H
        cx = hash3(self.seed, index, view, 5) % W
        rows = torch.arange(H, device=dev) - (cy[:, None] - half)  # [B, H]: inside when in [0, cutout)
        cols = torch.arange(W, device=dev) - (cx[:, None] - half)
        square = ((rows >= 0) & (rows < self.cutout))[:, :, None] & ((cols >= 0) & (cols < self.cutout))[:, None, :]
        fill = torch.tensor(self.fill, dtype=images.dtype, device=dev).view(1, -1, 1, 1)
        return torch.where(square[:, None], fill, images)

    def one(self, im: Image.Image, index: int, view: int, size: int, crop_fraction: float | None = None) -> np.ndarray:
        """The view of one decoded image: its un-augmented view (:func:`fit_image`, the one memory mode keeps),
        then the batch rule on a batch of one (an exact integer gather: the same pixels as in memory mode)."""
        a = torch.from_numpy(to_array(fit_image(im, size, crop_fraction)))[None]
        return self(a, torch.tensor([index]), torch.tensor([view]))[0].numpy()


@dataclass(frozen=True)
class CropBoxes:
    """Per-sample crop boxes in source pixels (int64 ``[B]`` each) and flips (bool ``[B]``)."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


@dataclass(frozen=True)
class RandomResizedCrop:
    """``random_resized_crop``: torchvision's ``RandomResizedCrop`` (+ horizontal flip) with hashed parameters.

    Try ``t`` (of 10) draws an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``
    from the hashes of (seed, index, view, salt t); the first box that fits is placed at hashed offsets;
    when none fits, the centre crop of the largest box with an aspect ratio in ``ratio`` (torchvision's
    fallback). The floating-point work runs per sample in Python on the CPU (no vectorised ``exp`` whose last
    bit could depend on the batch), so a box is the same in a worker, a batch, or a later recomputation.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0

    enabled = True

    def identity(self) -> list:
        return ["random_resized_crop", list(self.scale), list(self.ratio), self.flip]

    def boxes(self, index: torch.Tensor, view: torch.Tensor, height, width) -> CropBoxes:
        """The crop box and flip of each (index, view) in an image of ``height`` x ``width`` (ints or ``[B]``)."""
        index, view = index.cpu().long(), view.cpu().long()
        n = index.numel()
        hs = torch.as_tensor(height).expand(n).tolist()
        ws = torch.as_tensor(width).expand(n).tolist()
        u = torch.stack([hash3(self.seed, index, view, 16 + s) for s in range(2 * TRIES + 3)], 1).tolist()
        (s0, s1), (r0, r1) = self.scale, self.ratio
        lr0, lr1 = math.log(r0), math.log(r1)
        out = []
        for hh, ww, us in zip(hs, ws, u):
            area = hh * ww
            for t in range(TRIES):
                target = area * (s0 + (s1 - s0) * us[2 * t] / 2**31)
                aspect = math.exp(lr0 + (lr1 - lr0) * us[2 * t + 1] / 2**31)
                w = int(round(math.sqrt(target * aspect)))
                h = int(round(math.sqrt(target / aspect)))
                if 0 < w <= ww and 0 < h <= hh:
                    out.append((us[-3] % (hh - h + 1), us[-2] % (ww - w + 1), h, w))
                    break
            else:  # torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio, centred
                in_ratio = ww / hh
                if in_ratio < min(self.ratio):
                    w, h = ww, int(round(ww / min(self.ratio)))
                elif in_ratio > max(self.ratio):
                    w, h = int(round(hh * max(self.ratio))), hh
                else:
                    w, h = ww, hh
                out.append(((hh - h) // 2, (ww - w) // 2, h, w))
        top, left, box_h, box_w = torch.tensor(out, dtype=torch.long).view(-1, 4).unbind(1)
        flip = torch.tensor([x[-1] & 1 for x in u], dtype=torch.bool).view(-1) & self.flip
        return CropBoxes(top, left, box_h, box_w, flip)

    def __call__(self, images: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Memory mode: crop each stored image ``[B, C, H, W]`` (uint8) and resize back to H x W, in one
        ``roi_align`` (bilinear, averaging ceil(box/output) samples per output pixel), then flip."""
        from torchvision.ops import roi_align

        B, C, H, W = images.shape
        b = self.boxes(index, view, H, W)
        rois = torch.stack([torch.arange(B), b.left, b.top, b.left + b.width, b.top + b.height], 1).to(
            images.device, torch.float32
        )
        out = roi_align(images.float(), rois, (H, W), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
        return torch.where(b.flip.to(images.device).view(B, 1, 1, 1), out.flip(-1), out)

    def one(self, im: Image.Image, index: int, view: int, size: int, crop_fraction: float | None = None) -> np.ndarray:
        """Stream mode: the box cut from the whole decoded file's own pixels (``crop_fraction`` does not
        apply), resized to ``size`` (PIL bilinear) and maybe flipped: the pixels of torchvision's
        ``RandomResizedCrop`` on a PIL image given the same box."""
        w, h = im.size
        b = self.boxes(torch.tensor([index]), torch.tensor([view]), h, w)
        top, left, bh, bw = int(b.top), int(b.left), int(b.height), int(b.width)
        im = im.crop((left, top, left + bw, top + bh)).resize((size, size), Image.Resampling.BILINEAR)
        if bool(b.flip):
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_array(im)


AUGMENT_KEYS = ("kind", "crop_pad", "flip", "cutout", "scale", "ratio")


def _pair(where: str, key: str, v, ok, valid: str) -> tuple[float, float]:
    good = isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
    if not good or isinstance(v[0], bool) or not ok(float(v[0]), float(v[1])):
        raise ConfigError(f"{where}.{key}={v}: must be {valid}")
    return float(v[0]), float(v[1])


def _count(where: str, key: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{where}.{key}={v}: must be an integer >= 0")
    return v


def make_augment(
    spec: Mapping | None, seed: int, mean: Sequence[float] = (0.0,), where: str = "dataset.augment"
) -> Augment | RandomResizedCrop:
    """The augmentation of ``dataset.augment`` (``kind``: pad_crop (default) | random_resized_crop; ``crop_pad``,
    ``flip``, ``cutout``, ``scale``, ``ratio``); each kind reads its own keys. ``mean``: the dataset's mean (x/255)
    per channel, the colour cutout fills with. Raises ConfigError naming a bad key under ``where``."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(AUGMENT_KEYS)}")
    kind = spec.get("kind") or "pad_crop"
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind={kind}: valid: {', '.join(KINDS)}")
    pad = _count(where, "crop_pad", spec.get("crop_pad") or 0)
    cutout = _count(where, "cutout", spec.get("cutout") or 0)
    if cutout and kind != "pad_crop":
        raise ConfigError(f"{where}.cutout={cutout}: only with kind=pad_crop (the CIFAR recipe); valid here: 0")
    flip = spec.get("flip", False)
    if not isinstance(flip, bool):
        raise ConfigError(f"{where}.flip={flip}: must be true or false")
    scale = _pair(where, "scale", spec.get("scale", (0.08, 1.0)), lambda a, b: 0 < a <= b <= 1, "[min, max] in (0, 1]")
    ratio = _pair(
        where, "ratio", spec.get("ratio", (3 / 4, 4 / 3)), lambda a, b: 0 < a <= b, "[min, max], 0 < min <= max"
    )
    fill = tuple(min(255, max(0, round(255 * float(m)))) for m in mean)
    return KINDS[kind](pad, flip, cutout, fill, scale, ratio, seed)


KINDS: dict[str, Callable[..., Augment | RandomResizedCrop]] = {
    "pad_crop": lambda pad, flip, cutout, fill, scale, ratio, seed: Augment(pad, flip, seed, cutout, fill),
    "random_resized_crop": lambda pad, flip, cutout, fill, scale, ratio, seed: RandomResizedCrop(
        scale, ratio, flip, seed
    ),
}
