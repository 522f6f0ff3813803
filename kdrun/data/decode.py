"""Decode image files once into uint8 tensors, and keep them in a cache file.

:func:`decode_files` turns a list of image files into one uint8 tensor
``[N, C, H, W]`` with a process pool and a progress bar. :func:`save_cached`
/ :func:`load_cached` keep such tensors in a checksummed artifact of kind
``decoded`` (:mod:`kdrun.io`) verified on load: a truncated, corrupt or foreign
file is reported with a warning naming it and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

from kdrun import io
from kdrun.data.transforms import fit_image, to_array
from kdrun.errors import KdrunError, UnreadableImage
from kdrun.progress import progress

log = logging.getLogger("kdrun")
KIND = "decoded"
# what the decoder does to a file's pixels, in every key made from files (:func:`files_keys`): 2 scales 16-bit
# images to 8 bits (1 clipped them to white)
DECODER = 2
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CHUNK = 1024  # files per pool task


def cache_dir(path: str | None = None) -> str:
    """The decode-cache folder: ``path`` if given, else ``$KDRUN_CACHE_DIR``, else ``~/.cache/kdrun/data``."""
    return os.path.expanduser(path or os.environ.get("KDRUN_CACHE_DIR") or "~/.cache/kdrun/data")


def files_keys(root: str, files: list[str], *extra) -> tuple[str, str]:
    """Short hashes of the files' relative paths, sizes and mtimes, with ``extra`` (e.g. image size: the key of a
    decoded copy) and without (the key of the files alone: :func:`files_digest`'s), from one look at each file."""
    decoded = hashlib.sha1(repr((io.FORMAT, DECODER, extra)).encode())
    alone = hashlib.sha1(repr(("files", io.FORMAT)).encode())
    for f in files:
        st = os.stat(f)
        line = f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
        decoded.update(line)
        alone.update(line)
    return decoded.hexdigest()[:20], alone.hexdigest()[:20]


_DIGEST = re.compile(r"[0-9a-f]{40}")


def _warn_leaks(root: str, notes: list[str]) -> None:
    """The warning of test images that are training images too (``notes``: ``leaks N`` and up to 3 pairs)."""
    if not notes or not notes[0].startswith("leaks ") or notes[0] == "leaks 0":
        return
    log.warning(
        "data: %s: %s test images are byte for byte training images too (e.g. %s): the test split is not held out "
        "of training; remove them from one of the splits",
        root,
        notes[0].split()[1],
        "; ".join(notes[1:]),
    )


def files_digest(root: str, files: list[str], key: str, folder: str, held_out: int | None = None) -> str:
    """The SHA-1 of the files' relative paths and bytes: what they hold, wherever they lie and whatever their times.
    Reading every byte is a pass over the files, so the digest is kept in ``folder`` under ``key`` (the
    files' own :func:`files_keys`, times included): a run on the same files reads it back, whatever it decodes them
    to; a copy elsewhere (new times: a job's local scratch, a fresh download) pays the pass once. A file that cannot
    be read is :class:`UnreadableImage` naming it.

    ``held_out``: ``files[held_out:]`` are the test split; test files byte for byte the same as training files (the
    test images not held out) are a warning, each run (kept with the digest)."""
    path = os.path.join(folder, f"files-{key}.sha1")
    try:
        with open(path) as f:
            kept, *notes = f.read().strip().splitlines()
        # kept by a kdrun that did not look for test images among the training images: that pass is made once
        if _DIGEST.fullmatch(kept) and (held_out is None or (notes and notes[0].startswith("leaks "))):
            _warn_leaks(root, notes)
            return kept
    except (OSError, ValueError):
        pass
    h = hashlib.sha1()
    seen: dict[int, int] = {}  # a training file's bytes' SHA-1 (its first 8 bytes) -> its index
    leaks: list[str] = []  # "test file = training file"
    bar = progress(total=len(files), desc="hash files", unit="img")
    try:
        for i, name in enumerate(files):
            try:
                with open(name, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise UnreadableImage(f"{name}: not readable ({e.strerror or e})") from None
            one = hashlib.sha1(data).digest()
            h.update(f"{os.path.relpath(name, root)}\0".encode() + one)
            if held_out is not None:
                short = int.from_bytes(one[:8])
                if i < held_out:
                    seen.setdefault(short, i)
                elif short in seen:
                    leaks.append(f"{os.path.relpath(name, root)} = {os.path.relpath(files[seen[short]], root)}")
            bar.update(1)
    finally:
        bar.close()
    digest = h.hexdigest()
    notes = [f"leaks {len(leaks)}", *leaks[:3]] if held_out is not None else []
    _warn_leaks(root, notes)
    try:
        os.makedirs(folder, exist_ok=True)
        io.write_text(path, "\n".join([digest, *notes]) + "\n")
    except (OSError, KdrunError) as e:
        why = e if isinstance(e, OSError) else e.__cause__
        log.warning(
            "data: could not keep the files' digest in %s (%s); the next run reads the files again (set "
            "dataset.cache_dir or $KDRUN_CACHE_DIR to a writable folder)",
            path,
            why.strerror if isinstance(why, OSError) and why.strerror else why,
        )
    return digest


def open_image(path: str, in_chans: int) -> Image.Image:
    """One image file, decoded in full as grey (``in_chans`` 1) or RGB; :class:`UnreadableImage` naming a file it
    cannot read.

    16-bit grey pixels (PNG, TIFF: Pillow's modes ``I;16*``, and ``I`` for a file that says it holds 16 bits) are
    scaled to 8 bits (``/ 257``), where Pillow's own conversion clips every value above 255 to white. Integer pixels
    of another or unknown depth are used as they are when they lie in [0, 255], else refused, as are floating-point
    pixels: their range is the writer's choice."""
    try:
        with Image.open(path) as opened:
            opened.load()
            im: Image.Image = opened
            if im.mode.startswith("I"):
                im = _eight_bits(np.asarray(im), _bit_depth(im), path)
            elif im.mode == "F":
                raise UnreadableImage(
                    f"{path}: floating-point pixels (Pillow mode F), whose range kdrun cannot know; "
                    "save the images with 8- or 16-bit integer pixels"
                )
            return im.convert("L" if in_chans == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _bit_depth(im: Image.Image) -> int | None:
    """The bits per pixel an integer-mode image's file declares, where it says: 16 for Pillow's ``I;16*`` modes
    and for PNG (whose only integer mode beyond 8 bits is 16-bit grey), TIFF's BitsPerSample; else None."""
    if im.mode.startswith("I;16") or im.format == "PNG":
        return 16
    bits = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if bits else None


def _eight_bits(pixels: np.ndarray, bits: int | None, path: str) -> Image.Image:
    """Integer grey pixels as an 8-bit image: 16-bit ones scaled (65535 -> 255), others as they are in [0, 255]."""
    low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
    if bits == 16 and low >= 0 and high <= 65535:
        return Image.fromarray(np.rint(pixels.astype(np.float32) / 257.0).astype(np.uint8), "L")
    if low >= 0 and high <= 255:
        return Image.fromarray(pixels.astype(np.uint8), "L")
    raise UnreadableImage(
        f"{path}: {bits or 'integer'}-bit pixels in [{low}, {high}], whose range kdrun cannot know; save the images "
        "with 8- or 16-bit pixels"
    )


def decode_image(path: str, image_size: int, in_chans: int, crop_fraction: float | None = None) -> np.ndarray:
    """One image file -> its un-augmented view, uint8 ``[C, image_size, image_size]``
    (:func:`~kdrun.data.transforms.fit_image`: resized to the square, or resize + centre crop)."""
    return to_array(fit_image(open_image(path, in_chans), image_size, crop_fraction))


def _decode_chunk(args: tuple[list[str], int, int, float | None]) -> np.ndarray:
    files, image_size, in_chans, crop_fraction = args
    return np.stack([decode_image(f, image_size, in_chans, crop_fraction) for f in files])


def decode_files(
    files: list[str],
    image_size: int,
    in_chans: int,
    workers: int | None = None,
    desc: str = "decode",
    crop_fraction: float | None = None,
) -> torch.Tensor:
    """Decode ``files`` into uint8 ``[N, C, S, S]``, in ``workers`` processes (default: all CPUs)."""
    out = np.empty((len(files), in_chans, image_size, image_size), dtype=np.uint8)
    tasks = [(files[i : i + _CHUNK], image_size, in_chans, crop_fraction) for i in range(0, len(files), _CHUNK)]
    workers = min(workers if workers is not None else os.cpu_count() or 1, len(tasks))  # 0: in this process
    bar = progress(total=len(files), desc=desc, unit="img")  # a bar on a terminal, log lines in a file
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_decode_chunk, tasks)
                for i, chunk in enumerate(results):
                    out[i * _CHUNK : i * _CHUNK + len(chunk)] = chunk
                    bar.update(len(chunk))
        else:
            for i, task in enumerate(tasks):
                chunk = _decode_chunk(task)
                out[i * _CHUNK : i * _CHUNK + len(chunk)] = chunk
                bar.update(len(chunk))
    finally:
        bar.close()
    return torch.from_numpy(out)


def save_cached(path: str, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bool:
    """Write ``tensors`` (+ JSON-like ``meta``) to ``path`` atomically, as a checksummed artifact for ``key``;
    False, with a warning, when the folder cannot take it (the run goes on with the images it decoded)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        io.save({"meta": meta or {}, "tensors": tensors}, path, KIND, key)
    except OSError as e:
        log.warning(
            "data: could not keep the decoded images in %s (%s: %s); the next run decodes them again "
            "(set dataset.cache_dir or $KDRUN_CACHE_DIR to a writable folder)",
            path,
            type(e).__name__,
            e.strerror or e,
        )
        return False
    return True


def load_cached(path: str, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, meta)`` if ``path`` is a sound cache made for ``key``; None (with a warning) otherwise."""
    if not os.path.exists(path):
        return None
    try:
        blob = io.load(path, KIND, key)
    except io.DamagedArtifact as e:
        log.warning("decode cache %s is corrupt or unusable (%s); rebuilding it", e.path, e.reason)
        return None
    return blob["tensors"], blob["meta"]
