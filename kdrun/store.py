"""Artifact store: trained teachers and logit caches shared by every run and sweep job.

An entry is a directory ``ROOT/KIND/KEY/`` where KEY hashes everything that
determines the artifact (model config, data identity and split, optimiser,
budget, seed, augmentation, numerics-relevant versions). Building an entry:

1. take an exclusive ``flock`` on ``ROOT/KIND/KEY.lock`` (released by the OS if
   the process dies), so parallel jobs build each entry once and the others wait;
2. if ``KEY/COMPLETE`` exists and the files match its sizes, use the entry;
3. otherwise build into ``KEY.tmp-PID/``, write ``COMPLETE`` (file sizes and
   SHA-1s) last, and rename the directory into place. A half-written entry
   (no COMPLETE, or sizes that differ) is removed and rebuilt.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("kdrun")
MARKER = "COMPLETE"


def key_of(recipe: dict) -> str:
    """Stable 16-hex-digit hash of a JSON-able recipe."""
    return hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Entry:
    kind: str
    key: str
    path: str
    size: int
    created: float
    recipe: dict

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


class Store:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def _dir(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, key)

    @contextmanager
    def lock(self, kind: str, key: str):
        """Exclusive lock on one entry; logs when another process holds it."""
        os.makedirs(os.path.join(self.root, kind), exist_ok=True)
        with open(self._dir(kind, key) + ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("store: %s %s is being built by another process; waiting", kind, key)
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get(self, kind: str, key: str) -> Entry | None:
        """The complete entry, or None; a half-written or damaged entry is removed."""
        path = self._dir(kind, key)
        if not os.path.isdir(path):
            return None
        try:
            with open(os.path.join(path, MARKER)) as f:
                marker = json.load(f)
            for name, info in marker["files"].items():
                if os.path.getsize(os.path.join(path, name)) != info["size"]:
                    raise ValueError(f"{name} has the wrong size")
        except (OSError, ValueError, KeyError) as e:
            log.warning("store: %s %s is incomplete or damaged (%s); rebuilding", kind, key, e)
            shutil.rmtree(path, ignore_errors=True)
            return None
        return Entry(kind, key, path, sum(i["size"] for i in marker["files"].values()), marker["created"],
                     marker.get("recipe", {}))

    def publish(self, kind: str, key: str, files: dict[str, str], recipe: dict, link: bool = False) -> Entry:
        """Copy (or hard-link) ``files`` {name: source path} into a new complete entry."""
        final = self._dir(kind, key)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        info = {}
        for name, src in files.items():
            dst = os.path.join(tmp, name)
            _link_or_copy(src, dst) if link else shutil.copyfile(src, dst)
            info[name] = {"size": os.path.getsize(dst), "sha1": _sha1(dst)}
        marker = {"kind": kind, "key": key, "created": time.time(), "files": info, "recipe": recipe}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return self.get(kind, key)

    def entries(self) -> list[Entry]:
        out = []
        if not os.path.isdir(self.root):
            return out
        for kind in sorted(os.listdir(self.root)):
            kdir = os.path.join(self.root, kind)
            if not os.path.isdir(kdir):
                continue
            for key in sorted(os.listdir(kdir)):
                if os.path.isdir(os.path.join(kdir, key)) and ".tmp-" not in key:
                    e = self.get(kind, key)
                    if e is not None:
                        out.append(e)
        return out

    def remove(self, entry: Entry) -> None:
        shutil.rmtree(entry.path, ignore_errors=True)
        lock = entry.path + ".lock"
        if os.path.exists(lock):
            os.remove(lock)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def link_into(src: str, dst: str) -> None:
    """Make ``dst`` the same file as ``src`` (hard link, else copy), replacing ``dst``."""
    if os.path.exists(dst):
        os.remove(dst)
    _link_or_copy(src, dst)
