"""Every file kdrun writes or trusts goes through here: atomic writes and checksummed artifacts.

**Atomic write** (:func:`atomic_write`): the bytes go to a temporary file in
the target's directory, which is fsynced, renamed over the target, and the
directory is fsynced; a crash or a full disk leaves the previous file intact
and no temporary file behind.

**Artifacts** (:func:`save` / :func:`load`): checkpoints, exported models,
logit caches and decoded-data caches are ``torch.save`` dicts with one extra
top-level key, ``header``::

    {"header": {"format": FORMAT, "kind": "checkpoint", "key": "...", "sha256": "..."}, **payload}

``sha256`` covers the whole payload: the bytes of every tensor (with dtype and
shape) and every other value, walked in a fixed order (:func:`digest`). The
file stays a plain ``torch.load``-able dict (``torch.load(p)["model"]`` works),
is read back with ``weights_only=True`` only (nothing in it can run code), and
:func:`load` refuses it, with :class:`DamagedArtifact` naming the file, when it
is truncated, unreadable, of another kind or key, or its checksum differs. A
caller that can rebuild the artifact warns and rebuilds; one that cannot ends
the run with exit code 2.

``FORMAT`` is part of every artifact-store key: a change of this layout never
reuses old entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import secrets
import socket
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import torch

from kdrun.errors import KdrunError

FORMAT = 2  # version of the artifact layout (1: the per-module headers before kdrun.io)
HEADER = "header"


class DamagedArtifact(KdrunError):
    """An artifact that is missing its header, unreadable, truncated, foreign or fails its checksum."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# ---------------------------------------------------------------- atomic writes


def can_create_in(folder: str) -> bool:
    """Whether this process can create a file in ``folder``, found by trying (``os.access`` answers from the mode
    bits and the caller's ids, which ACLs, a root-squashed network mount or root's privileges can make wrong)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kdrun-check-", dir=folder))
        return True
    except OSError:
        return False


def fsync_dir(path: str) -> None:
    """Make a rename or creation inside directory ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str, tag: str = "tmp") -> str:
    """A name next to ``path`` for a file or folder on its way there (``PATH.TAG-HOST-PID-RANDOM``): unique across
    processes and hosts writing into one shared folder, where process ids alone repeat (containers, other nodes)."""
    return f"{path}.{tag}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_temps(folder: str) -> list[str]:
    """Remove the files :func:`temp_name` named in ``folder`` whose writer, a process of this host, has gone (killed
    mid-write: SIGKILL, out of memory); returns their names. A checkpoint's may be as large as the checkpoint."""
    host = re.escape(socket.gethostname())
    pattern = re.compile(rf"\.[\w-]+-{host}-(\d+)-[0-9a-f]{{8}}$")
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = pattern.search(e.name)
        if m and e.is_file(follow_symlinks=False) and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.remove(e.path)
                removed.append(e.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync, rename onto ``path``, fsync the directory.

    An OSError (disk full, permissions) becomes a one-line KdrunError; any failure removes the
    temporary file and leaves the previous ``path`` as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise KdrunError(f"{path}: could not write ({e.strerror or e}); the previous version is kept") from e
        raise


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(obj, path: str) -> None:
    """``obj`` as indented JSON, written atomically."""
    write_text(path, json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------- checksummed artifacts


def _feed(h, obj) -> None:
    """Hash ``obj`` (tensors, numbers, strings, None, lists, tuples, dicts) in a fixed, type-tagged order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(f"{type(obj).__name__}:{obj};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__} in an artifact")


def digest(payload: dict) -> str:
    """sha256 of an artifact's payload (everything but its header)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != HEADER})
    return h.hexdigest()


def plain(obj):
    """``obj`` with NumPy scalars and arrays turned into Python values and tensors, so that
    ``torch.load(weights_only=True)`` reads it back (it refuses NumPy types)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):  # rebuilt only when something inside changed (keeps a state_dict's _metadata)
        new = {k: plain(v) for k, v in obj.items()}
        if all(new[k] is v for k, v in obj.items()):
            return obj
        return OrderedDict(new) if isinstance(obj, OrderedDict) else new
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        items = [plain(x) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return items if isinstance(obj, list) else tuple(items)
    return obj


def save(obj: dict, path: str, kind: str, key: str | None = None) -> None:
    """Write artifact ``obj`` (a dict of tensors and plain values) atomically, with its checksummed header."""
    obj = plain({k: v for k, v in obj.items() if k != HEADER})
    header = {"format": FORMAT, "kind": kind, "key": key, "sha256": digest(obj)}
    blob = {HEADER: header, **obj}
    atomic_write(path, lambda f: torch.save(blob, f))


def load(path: str, kind: str, key: str | None = None) -> dict:
    """The verified payload of artifact ``path`` (header removed); :class:`DamagedArtifact` if it is not sound.

    ``key``: when given, the artifact must have been made for this key (e.g. this teacher and data).
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DamagedArtifact(path, "file not found") from None
    except pickle.UnpicklingError:  # weights_only refused it: the pickle asks for more than tensors and values
        raise DamagedArtifact(
            path,
            "unreadable or damaged (UnpicklingError: it holds more than tensors and plain "
            "values, e.g. code to run, and is refused)",
        ) from None
    except Exception as e:  # noqa: BLE001 (truncated, not a torch file at all)
        raise DamagedArtifact(path, f"unreadable or damaged ({type(e).__name__}: {first_line(e)})") from None
    header = blob.get(HEADER) if isinstance(blob, dict) else None
    if not isinstance(header, dict) or "sha256" not in header:
        raise DamagedArtifact(path, "not a kdrun artifact (no checksummed header)")
    if header.get("kind") != kind:
        raise DamagedArtifact(path, f"holds a {header.get('kind')}, not a {kind}")
    if header.get("format") != FORMAT:
        raise DamagedArtifact(
            path,
            f"artifact format {header.get('format')}, this kdrun reads format {FORMAT}",
        )
    if key is not None and header.get("key") != key:
        raise DamagedArtifact(path, f"made for another {kind} (key {header.get('key')}, wanted {key})")
    try:
        ok = digest(blob) == header["sha256"]
    except TypeError:
        ok = False
    if not ok:
        raise DamagedArtifact(path, "damaged (checksum mismatch)")
    del blob[HEADER]
    return blob


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (colour codes removed, at most 160 characters) for one-line errors."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0][:160] if text else "no detail"


def load_yaml(path: str):
    """A YAML file kdrun wrote and reads back (a run's ``.hydra/config.yaml``, ``overrides.yaml``) as OmegaConf;
    KdrunError naming the file when it cannot be parsed (e.g. edited by hand)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.load(path)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise KdrunError(f"{path}: cannot be read as YAML ({first_line(e)})") from None


def header_of(path: str) -> dict | None:
    """The header of artifact ``path`` without verifying it (None when unreadable)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob.get(HEADER) if isinstance(blob, dict) else None
    except Exception:  # noqa: BLE001 (any unreadable file)
        return None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- stage checkpoints


def atomic_save(obj: dict, path: str, kind: str = "checkpoint", key: str | None = None) -> None:
    """Save artifact ``obj`` at ``path`` (rank 0 only under data parallelism); see :func:`save`."""
    from kdrun import distributed

    if distributed.is_main():
        save(obj, path, kind, key)


def load_checkpoint(path: str) -> dict | None:
    """A stage checkpoint, or None when absent; a damaged one is an error naming the file (it cannot be
    rebuilt: deleting it restarts the stage)."""
    if not os.path.exists(path):
        return None
    try:
        return load(path, "checkpoint")
    except DamagedArtifact as e:
        raise KdrunError(f"{path}: corrupt checkpoint ({e.reason}); delete it to restart this stage") from None


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [
            name,
            torch.from_numpy(np.asarray(keys).astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
