"""The teacher's logit cache: one file of teacher logits per (training sample, augmentation view).

The student stage reads the cache per batch by (sample index, view); it is **filled on first use**: when a
batch holds pairs whose logits are not in the file yet, the frozen teacher runs on exactly those images of
the batch (the pixels the student is about to train on) and their logits are written. So the teacher
never runs more often than with ``cache.enabled=false``, there is no separate pass before training, and a
finished cache is published to the artifact store for later runs (``cache.fill=pass`` fills it in one
pass before the stage instead, e.g. to share a complete cache with a sweep).

File layout (``*.kdlc``)::

    [0, 4096)               b"KDLC", a little-endian u32 n, then n bytes of JSON: format, key, samples,
                            views, classes, topk
    [4096, 4096 + V*N)      one flag byte per (view, sample): 1 once its row holds the teacher's logits
    [crcs, crcs + 4*V*N)    the CRC-32 of each row (little-endian u32), written with it
    [data, data + V*N*R)    the rows, in (view, sample) order, R bytes each

A row is the C logits in fp16, or with ``cache.topk=K`` the K largest logits (fp16), their class indices
(int16, or int32 beyond 32,767 classes) and one fp16: the mean of the other C - K logits. Reading a top-k
row gives every other class that mean, which keeps each row's logit sum and the order of its top K; the
soft targets differ from the full row's only in how the tail's mass is spread (see ``topk`` below).

The flags are memory-mapped (shared: data-parallel ranks see each other's rows, and each rank writes the
rows of its own batches). Rows are read and written per batch with positioned reads and writes (runs of
consecutive rows in one call), not through a memory map: the kernel maps up to 64 KiB around every page
fault of a mapped file ("fault-around"), so random 2 KiB rows read through a map would fill the process's
resident memory with the file. The cache's resident share is therefore its flags (one byte per row) plus one
batch of rows, whatever the size of the file.

A file whose header, key or size does not match is replaced by an empty one with a warning naming it;
rows (and their CRCs) are written before their flag, so a run killed mid-write recomputes those rows. Every
filled row is checked against its CRC when a run opens the file (:meth:`LogitCache.damaged`, each data-parallel
worker its share of the rows): a row damaged on disk since, in the run's file or in the store entry it shares,
is computed again by the teacher, with a warning, rather than read as the teacher's logits. Published files are
checksummed whole by the store (:mod:`kdrun.store`); a file hard-linked into the store is copied before this
process writes into it (copy on write), so a store entry never changes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdrun import distributed, io
from kdrun.data.loader import TensorLoader
from kdrun.data.stream import StreamLoader
from kdrun.engine import autocast
from kdrun.errors import KdrunError
from kdrun.preempt import EXIT_PREEMPTED, STOP, Preempted, maybe_kill
from kdrun.progress import progress

log = logging.getLogger("kdrun")
FORMAT = 2  # version of the file layout (part of every logit-cache store key); 2: per-row CRCs
MAGIC = b"KDLC"
HEADER_BYTES = 4096
PAGE = 4096
SUFFIX = ".kdlc"


@dataclass(frozen=True)
class CacheShape:
    """``samples`` x max(``views``, 1) rows of ``classes`` logits, full (``topk`` None) or the top ``topk`` of
    each; ``views`` is ``cache.views``: K augmented views, or 0 for the one un-augmented image."""

    samples: int
    views: int
    classes: int
    topk: int | None = None

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.int16 if self.classes <= 32767 else np.int32)

    @property
    def row_bytes(self) -> int:
        if self.topk is None:
            return 2 * self.classes
        return 2 * self.topk + self.index_dtype.itemsize * self.topk + 2

    @property
    def rows(self) -> int:
        return self.samples * max(self.views, 1)

    @property
    def crc_offset(self) -> int:
        return HEADER_BYTES + _pages(self.rows)  # after the flags

    @property
    def data_offset(self) -> int:
        return self.crc_offset + _pages(4 * self.rows)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.rows * self.row_bytes

    def header(self, key: str) -> dict:
        return {"format": FORMAT, "key": key} | {k: getattr(self, k) for k in ("samples", "views", "classes", "topk")}


def _pages(n: int) -> int:
    """``n`` bytes rounded up to whole pages."""
    return -(-n // PAGE) * PAGE


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (a read may return fewer; the file's holes read as zeros)."""
    parts, got = [], 0
    while got < n:
        part = os.pread(fd, n - got, offset + got)
        if not part:
            raise OSError(f"logit cache: {n - got} bytes missing at offset {offset + got} (file truncated)")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def row_crcs(rows: np.ndarray) -> np.ndarray:
    """The CRC-32 of each row of ``rows`` [B, row_bytes] (uint8, C-contiguous)."""
    return np.fromiter((zlib.crc32(row) for row in rows), dtype=np.uint32, count=len(rows))


FP16_MAX = 65504.0


def encode(logits: torch.Tensor, shape: CacheShape) -> np.ndarray:
    """Rows [B, row_bytes] (uint8) of logits [B, C]; KdrunError for logits fp16 cannot hold (they would read
    back as inf, and the KD targets as NaN)."""
    x = logits.detach().float().cpu()
    if not bool(x.abs().le(FP16_MAX).all()):
        worst = float(x.abs().nan_to_num(nan=float("inf")).max())
        raise KdrunError(
            f"cache: a teacher logit of magnitude {worst:.4g} does not fit the cache's fp16 (at most {FP16_MAX:g}); "
            "the teacher has diverged or is unnormalised: check it, or run with cache.enabled=false"
        )
    if shape.topk is None:
        return x.half().numpy().view(np.uint8).reshape(len(x), -1)
    k = shape.topk
    vals, idx = x.topk(k, dim=1)
    rest = (x.sum(1) - vals.sum(1)) / max(shape.classes - k, 1)
    parts = [vals.half().numpy(), idx.numpy().astype(shape.index_dtype), rest.half().numpy()[:, None]]
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8) for p in parts], axis=1)


def decode(rows: np.ndarray, shape: CacheShape) -> torch.Tensor:
    """Logits [B, C] (float32) of rows [B, row_bytes]."""
    b = len(rows)
    if shape.topk is None:
        return torch.from_numpy(np.ascontiguousarray(rows).view(np.float16).reshape(b, -1).astype(np.float32))
    k, isz = shape.topk, shape.index_dtype.itemsize
    vals = np.ascontiguousarray(rows[:, : 2 * k]).view(np.float16).astype(np.float32)
    idx = np.ascontiguousarray(rows[:, 2 * k : 2 * k + isz * k]).view(shape.index_dtype).astype(np.int64)
    rest = np.ascontiguousarray(rows[:, -2:]).view(np.float16).astype(np.float32)
    out = torch.from_numpy(np.repeat(rest, shape.classes, axis=1))
    out.scatter_(1, torch.from_numpy(idx), torch.from_numpy(vals))
    return out


class LogitCache:
    """An open logit-cache file (see the module's docstring); make one with :meth:`open`."""

    def __init__(self, path: str, shape: CacheShape, key: str):
        self.path, self.shape, self.key = path, shape, key
        self.teacher_rows = 0  # rows this process computed (teacher forward passes on single images)
        self._map()

    # ---------------------------------------------------------------- files

    @classmethod
    def open(cls, path: str, shape: CacheShape, key: str) -> LogitCache:
        """The cache at ``path`` if it is one for ``key`` and ``shape``; else a new empty one (with a warning
        naming the old file when there was one). Call on one rank, then :meth:`attach` on the others."""
        problem = _problem(path, shape, key)
        if problem is not None:
            if os.path.exists(path):
                log.warning("logit cache %s: %s; starting an empty one", path, problem)
            _create(path, shape, key)
        return cls(path, shape, key)

    @classmethod
    def attach(cls, path: str, shape: CacheShape, key: str) -> LogitCache:
        """The cache another rank opened (no checks, no creation)."""
        return cls(path, shape, key)

    def _map(self) -> None:
        self._flags = np.memmap(self.path, np.uint8, "r+", HEADER_BYTES, (self.shape.rows,))
        self._crcs = np.memmap(self.path, np.dtype("<u4"), "r+", self.shape.crc_offset, (self.shape.rows,))
        self._fd = os.open(self.path, os.O_RDWR)

    def _read(self, pos: np.ndarray) -> np.ndarray:
        r, base, fd = self.shape.row_bytes, self.shape.data_offset, self._fd
        buf = b"".join([os.pread(fd, r, base + p * r) for p in pos.tolist()])
        return np.frombuffer(buf, np.uint8).reshape(len(pos), r)

    def _write(self, pos: np.ndarray, rows: np.ndarray) -> None:
        """Rows ``rows[j]`` to positions ``pos[j]``; a run of consecutive positions in one call."""
        r, base = self.shape.row_bytes, self.shape.data_offset
        order = np.argsort(pos, kind="stable")
        sorted_pos, rows = pos[order], rows[order]
        cuts = [0, *(np.flatnonzero(np.diff(sorted_pos) != 1) + 1).tolist(), len(pos)]
        for i, j in zip(cuts[:-1], cuts[1:]):
            if j > i:
                os.pwrite(self._fd, rows[i:j].tobytes(), base + int(sorted_pos[i]) * r)

    def flush(self) -> None:
        self._crcs.flush()
        self._flags.flush()

    def close(self) -> None:
        self.flush()
        os.close(self._fd)
        del self._flags, self._crcs

    def copy_on_write(self) -> None:
        """Give this run its own copy of the file if it is hard-linked elsewhere (into the store)."""
        if os.stat(self.path).st_nlink > 1:
            self.close()
            tmp = io.temp_name(self.path, "cow")
            shutil.copyfile(self.path, tmp)
            os.replace(tmp, self.path)
            self._map()

    # ---------------------------------------------------------------- rows

    def positions(self, index: torch.Tensor, view: torch.Tensor) -> np.ndarray:
        """Row numbers of (sample, view) pairs: view * samples + sample."""
        return (view.cpu().long() * self.shape.samples + index.cpu().long()).numpy()

    def lookup(self, index: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C] float32, filled [B] bool) of samples ``index`` under views ``view`` (CPU tensors);
        the rows not filled yet hold zeros."""
        pos = self.positions(index, view)
        flags = self._flags[pos] == 1
        if flags.all():  # the common case once the cache is warm
            return decode(self._read(pos), self.shape), torch.ones(len(pos), dtype=torch.bool)
        have = torch.from_numpy(flags)
        logits = torch.zeros(len(pos), self.shape.classes)
        if flags.any():
            logits[have] = decode(self._read(pos[flags]), self.shape)
        return logits, have

    def write(self, index: torch.Tensor, view: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Store the teacher's ``logits`` [B, C] of (``index``, ``view``); returns them as a later read
        returns them (rounded to fp16; with top-k, the tail filled in)."""
        pos = self.positions(index, view)
        rows = encode(logits, self.shape)
        if distributed.deferring():  # this worker's run is ending: its logits may come from a stand-in image
            return decode(rows, self.shape)
        self._write(pos, rows)  # rows (and their CRCs) before flags: a row is marked filled only once written
        self._crcs[pos] = row_crcs(rows)
        self._flags[pos] = 1
        self.teacher_rows += len(pos)
        return decode(rows, self.shape)

    @property
    def filled(self) -> int:
        return int(np.count_nonzero(self._flags))

    @property
    def complete(self) -> bool:
        return self.filled == self.shape.rows

    def damaged(self, chunk: int = 1 << 16, part: int = 0, parts: int = 1) -> np.ndarray:
        """Positions of the filled rows whose bytes no longer match their CRC, among the ``part``-th of ``parts``
        equal runs of rows (data-parallel workers each check their own); read at most ``chunk`` rows, and 64 MiB,
        at a time, with a progress bar for the first part when the whole file is over 1 GiB."""
        r, base, bad = self.shape.row_bytes, self.shape.data_offset, []
        first, last = self.shape.rows * part // parts, self.shape.rows * (part + 1) // parts
        chunk = max(1, min(chunk, (64 << 20) // r))
        big = self.shape.rows * r >= 1 << 30
        bar = progress(total=last - first, desc="cache check", unit="rows", disable=part != 0 or not big)
        for start in range(first, last, chunk):
            stop = min(start + chunk, last)
            bar.update(stop - start)
            filled = np.flatnonzero(self._flags[start:stop] == 1)
            if not len(filled):
                continue
            end = start + int(filled[-1]) + 1
            block = np.frombuffer(_pread_all(self._fd, (end - start) * r, base + start * r), np.uint8)
            got = row_crcs(block.reshape(end - start, r)[filled])
            bad.append(start + filled[got != self._crcs[start + filled]])
        bar.close()
        return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)

    def forget(self, pos: np.ndarray) -> None:
        """Mark rows ``pos`` not filled (the teacher computes them again on first use)."""
        self._flags[pos] = 0
        self.flush()

    def missing(self) -> np.ndarray:
        """Positions (view * samples + index) of the rows not filled yet."""
        return np.flatnonzero(self._flags == 0)

    def info(self) -> dict:
        return {
            "file": os.path.basename(self.path),
            "size_mb": os.path.getsize(self.path) / 1e6,  # MB of 10^6 bytes, as the models' sizes
            "filled": self.filled,
            "rows": self.shape.rows,
            "topk": self.shape.topk,
        }


def read_header(path: str) -> dict:
    """The JSON header of the cache file at ``path``; ValueError when it is not one."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:4] != MAGIC:
        raise ValueError("not a kdrun logit cache")
    (n,) = struct.unpack("<I", head[4:8])
    return json.loads(head[8 : 8 + n])


def _problem(path: str, shape: CacheShape, key: str) -> str | None:
    """Why the file at ``path`` is not a usable cache for ``key`` and ``shape`` (None: it is)."""
    if not os.path.exists(path):
        return "absent"
    try:
        header = read_header(path)
    except (OSError, ValueError, struct.error) as e:
        return f"unreadable header ({e})"
    if header.get("format") != FORMAT:
        return f"layout version {header.get('format')}, this kdrun writes {FORMAT}"
    if header.get("key") != key:
        return "made for another teacher, data or views (key differs)"
    if header != shape.header(key):
        return f"shape {header}, expected {shape.header(key)}"
    size = os.path.getsize(path)
    if size != shape.file_bytes:
        return f"{size} bytes, expected {shape.file_bytes} (truncated or damaged)"
    return None


def _create(path: str, shape: CacheShape, key: str) -> None:
    """An empty cache file (all flags 0), written under a temporary name and renamed into place."""
    blob = json.dumps(shape.header(key)).encode()
    assert 8 + len(blob) <= HEADER_BYTES
    tmp = io.temp_name(path)
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(blob)) + blob)
        f.truncate(shape.file_bytes)  # sparse: zero flags and rows cost no disk until written
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    io.fsync_dir(os.path.dirname(os.path.abspath(path)))


@torch.inference_mode()
def fill_pass(
    cache: LogitCache,
    teacher: nn.Module,
    loader: TensorLoader | StreamLoader,
    batch_size: int,
    precision: str = "fp32",
) -> float:
    """Fill every missing row in one pass before training (``cache.fill=pass``); returns the seconds.

    ``loader``: the student stage's loader (its ``batches(index, view)`` rebuilds any view, from memory or
    decoded from files in its workers). Data parallel: rank r computes batches r, r + W, ... of the missing
    rows and writes them itself."""
    t0 = time.perf_counter()
    teacher.eval()
    rank, world = distributed.world()
    # rank 0's list, read before any rank writes: a rank reading its own after another began would split the
    # rows differently and leave some to no one
    todo = torch.from_numpy(distributed.shared(cache.missing))
    jobs = list(todo.split(batch_size))[rank::world]
    mine = torch.cat(jobs) if jobs else todo[:0]
    index, view = mine % cache.shape.samples, mine // cache.shape.samples
    bar = progress(total=len(todo), desc="cache", unit="img", disable=rank != 0)
    for batches, batch in enumerate(loader.batches(index, view, batch_size), start=1):
        if distributed.deferring():  # e.g. an image this worker could not decode: raised by all below
            break
        with autocast(batch.x.device, precision):
            logits = teacher(batch.x).float()
        try:
            cache.write(*batch.on_host(), logits)
        except KdrunError as e:  # a logit fp16 cannot hold: alone, raised here; with several workers, by all below
            distributed.defer(e)
            break
        bar.update(len(batch.index) * world)
        maybe_kill("cache", batches)
        if STOP.requested is not None:  # SIGTERM/SIGINT: what is written stays; a resumed run fills the rest
            bar.close()
            raise Preempted(
                f"cache: stopped by {STOP.requested} after {batches} of {len(jobs)} batches; "
                f"the filled rows are kept (exit code {EXIT_PREEMPTED})"
            )
    bar.close()
    cache.flush()
    distributed.agree(False, loader.device)
    distributed.barrier()
    return time.perf_counter() - t0
