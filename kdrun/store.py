"""Artifact store: trained teachers and logit caches shared by every run and sweep job.

An entry is a directory ``ROOT/KIND/KEY/`` where KEY hashes everything that
determines the artifact (model config and the version of the model's
definition, data identity and split, optimiser, budget, seed, augmentation,
numerics-relevant versions) together with kdrun's artifact format
(:data:`kdrun.io.FORMAT`): a changed architecture or file layout never reuses
an old entry. Building an entry:

1. take an exclusive ``flock`` on ``ROOT/KIND/KEY.lock`` (released by the OS if
   the process dies), so parallel jobs build each entry once and the others wait;
2. if ``KEY/COMPLETE`` exists and every file has its recorded size and SHA-256,
   use the entry; a damaged entry is reported (warning naming it) and rebuilt;
3. otherwise build into ``KEY.tmp-HOST-PID-RANDOM/`` (leftovers of killed builders are
   removed first), fsync the files, write ``COMPLETE`` (sizes and SHA-256s)
   last, and rename the directory into place. A failed publish (disk full)
   leaves the previous state and no temporary directory.

Reading (:meth:`Store.entries`, ``kdrun store ls``) never modifies the store;
removing (:meth:`Store.remove`, ``kdrun store gc``) happens only under the
entry's lock, and a lock that a live process holds is never removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass

from kdrun import io
from kdrun.errors import KdrunError
from kdrun.preempt import check_stop, maybe_kill

KINDS = ("teacher", "logits")  # what kdrun stores: trained teachers and logit caches

log = logging.getLogger("kdrun")
MARKER = "COMPLETE"
ID_FILE = "store_id"  # a random name the store keeps for life: runs record it, so gc knows its runs at any mount path
TMP = ".tmp-"
KEY = re.compile(r"[0-9a-f]{16}")  # an entry's folder name (key_of)
LOCK_POLL_SECONDS = 0.5  # how often a run waiting for an entry another run builds looks again (and for a stop)


def key_of(recipe: dict) -> str:
    """Stable 16-hex-digit hash of a JSON-able recipe and kdrun's artifact format version."""
    blob = json.dumps({"artifact_format": io.FORMAT, "recipe": recipe}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def model_definition(name: str, source: str = "kdrun") -> str:
    """A version of a model's definition: the hash of the source file of its factory (plus the
    factory's ``VERSION`` attribute, if any, and the library version for torchvision/timm models).
    Any edit of that file gives new store keys, so stale weights are never reused."""
    if source == "timm":
        try:
            import timm

            return f"timm-{timm.__version__}"
        except ImportError:
            return "timm-missing"
    from kdrun.models import MODELS

    try:
        fn = MODELS.get(name)
    except KdrunError:
        return "unknown"
    parts = [str(getattr(fn, "VERSION", ""))]
    try:
        with open(inspect.getsourcefile(fn) or "", "rb") as f:  # "": no source file (OSError)
            parts.append(hashlib.sha1(f.read()).hexdigest()[:12])
    except (OSError, TypeError):
        parts.append(fn.__module__)
    if "torchvision" in fn.__module__:
        import torchvision

        parts.append(torchvision.__version__)
    return "-".join(p for p in parts if p)


@dataclass
class Entry:
    kind: str
    key: str
    path: str
    size: int
    created: float
    recipe: dict
    problem: str | None = None  # None: complete and (when checked) intact; else why it cannot be used

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def _open_lock_file(path: str) -> int:
    """An fd of the lock file ``path``, created readable and writable by all the umask lets (a store a group
    shares: another member's runs and gc lock the same entries); one another user made without write permission
    for us is opened read-only (flock does not need write access)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _wait_for_lock(fd: int, path: str) -> None:
    """Take ``fd``'s lock once its holder lets go, polling, so a SIGTERM/SIGINT meanwhile stops the run at once
    (:class:`kdrun.preempt.Preempted`, ``fd`` closed): a blocking flock would go on waiting, perhaps for the hours
    another run takes to train the teacher, past a scheduler's grace period."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        try:
            check_stop(f"another process released {path}")
        except BaseException:
            os.close(fd)
            raise
        time.sleep(LOCK_POLL_SECONDS)


def _acquire(path: str, blocking: bool) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if needed), or None when busy and not ``blocking``.

    After locking, the fd must still be the file at ``path``: ``gc`` may have removed an unused lock
    file (under its lock) between our open and our flock; then we retry on the new file."""
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                os.close(fd)
                return None
            log.info("store: %s is held by another process; waiting", path)
            _wait_for_lock(fd, path)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class Store:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def ident(self) -> str | None:
        """The store's :data:`ID_FILE` name, made on first use (None where it can be neither read nor made)."""
        import tempfile
        import uuid

        path = os.path.join(self.root, ID_FILE)
        for _ in range(2):
            try:
                with open(path) as f:
                    name = f.read().strip() or None
                if os.stat(path).st_mode & 0o044 == 0:  # made 0600 by a kdrun before: for the group sharing it
                    try:
                        os.chmod(path, 0o644)
                    except OSError:  # another user's file
                        pass
                return name
            except FileNotFoundError:
                pass
            except OSError:
                return None
            tmp = None
            try:
                os.makedirs(self.root, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{ID_FILE}.", dir=self.root)  # unique on a shared store too
                os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the store's id from the other users sharing it
                with os.fdopen(fd, "w") as f:
                    f.write(uuid.uuid4().hex + "\n")
                os.link(tmp, path)  # atomic, and never over another process's name: then that one is read
            except FileExistsError:
                pass
            except OSError:
                return None
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.remove(tmp)
        return None

    def _dir(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, key)

    def _lock_path(self, kind: str, key: str) -> str:
        return self._dir(kind, key) + ".lock"

    @contextmanager
    def lock(self, kind: str, key: str):
        """Exclusive lock on one entry (waits while another process builds or removes it)."""
        os.makedirs(os.path.join(self.root, kind), exist_ok=True)
        fd = _acquire(self._lock_path(kind, key), blocking=True)
        assert fd is not None  # blocking: it waits for the lock
        try:
            yield
        finally:
            os.close(fd)  # releases the flock

    @contextmanager
    def try_lock(self, kind: str, key: str):
        """Yields True holding the entry's lock, or False at once when another process holds it."""
        os.makedirs(os.path.join(self.root, kind), exist_ok=True)
        fd = _acquire(self._lock_path(kind, key), blocking=False)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def inspect(self, kind: str, key: str, verify: bool = True) -> Entry | None:
        """The entry at ``kind/key`` with ``problem`` set when it is incomplete or damaged (None if absent).

        ``verify``: also compare every file's SHA-256 with ``COMPLETE`` (else sizes only). Never modifies."""
        path = self._dir(kind, key)
        if not os.path.isdir(path):
            return None
        try:
            with open(os.path.join(path, MARKER)) as f:
                marker = json.load(f)
            files = marker["files"]
            created, recipe = float(marker["created"]), marker.get("recipe", {})
            # a marker edited by hand (or by another tool) must still describe files: {name: {size, sha256}}
            if not isinstance(files, dict) or not files or not isinstance(recipe, dict):
                raise TypeError("files")
            sizes = {str(n): int(i["size"]) for n, i in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return Entry(
                kind,
                key,
                path,
                _du(path),
                os.path.getmtime(path),
                {},
                f"incomplete (no valid {MARKER}: {type(e).__name__})",
            )
        size, problem = sum(sizes.values()), None
        for name, info in files.items():
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                problem = f"{name} is missing"
            elif os.path.getsize(fpath) != sizes[name]:
                problem = f"{name} has {os.path.getsize(fpath)} bytes, {sizes[name]} recorded"
            elif "sha256" not in info:
                problem = f"{name} has no recorded SHA-256 (older store format)"
            elif verify and io.sha256_file(fpath) != info["sha256"]:
                problem = f"{name} is damaged (SHA-256 mismatch)"
            if problem:
                break
        return Entry(kind, key, path, size, created, recipe, problem)

    def get(self, kind: str, key: str) -> Entry | None:
        """The complete, verified entry, or None; a damaged one is reported (warning naming it), left
        for :meth:`publish` to replace, and never returned. Call under :meth:`lock`."""
        entry = self.inspect(kind, key, verify=True)
        if entry is not None and entry.problem:
            log.warning(
                "store: %s entry %s is %s; rebuilding it",
                kind,
                entry.path,
                entry.problem if entry.problem.startswith("incomplete") else f"not usable: {entry.problem}",
            )
            return None
        return entry

    def publish(self, kind: str, key: str, files: dict[str, str], recipe: dict, link: bool = False) -> Entry:
        """Copy (or hard-link) ``files`` {name: source path} into a new complete entry. Call under :meth:`lock`.

        On failure (disk full...) the temporary directory is removed, any previous entry is left as it was,
        and a one-line KdrunError says so."""
        final = self._dir(kind, key)
        self._remove_partial(kind, key)
        tmp = io.temp_name(final)  # KEY.tmp-...: see TMP
        os.makedirs(tmp)
        try:
            info = {}
            for i, (name, src) in enumerate(files.items(), start=1):
                dst = os.path.join(tmp, name)
                _link_or_copy(src, dst) if link else shutil.copyfile(src, dst)
                _fsync_file(dst)
                info[name] = {"size": os.path.getsize(dst), "sha256": io.sha256_file(dst)}
                maybe_kill("publish", i)
            marker = {
                "kind": kind,
                "key": key,
                "format": io.FORMAT,
                "created": time.time(),
                "files": info,
                "recipe": recipe,
            }
            io.write_json(marker, os.path.join(tmp, MARKER))
            old = None
            if os.path.exists(final):  # a damaged entry being replaced: moved aside, removed once replaced
                old = io.temp_name(final, "tmp-old")
                os.replace(final, old)
            os.replace(tmp, final)
            io.fsync_dir(os.path.dirname(final))
        except (OSError, KdrunError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise KdrunError(
                f"store: could not publish {kind} {key} in {self.root} ({why}); nothing was "
                "stored and the run's own files are kept"
            ) from e
        if old:
            shutil.rmtree(old, ignore_errors=True)
        entry = self.inspect(kind, key, verify=False)
        assert entry is not None and entry.problem is None, entry
        return entry

    def _remove_partial(self, kind: str, key: str) -> list[str]:
        """Remove temporary directories of ``kind/key`` left by killed builders (caller holds the lock)."""
        gone = self._partials(kind, key)
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
        return gone

    def _partials(self, kind: str, key: str) -> list[str]:
        kdir = os.path.join(self.root, kind)
        names = os.listdir(kdir) if os.path.isdir(kdir) else []
        return [os.path.join(kdir, n) for n in sorted(names) if n.startswith(key + TMP)]

    def entry_keys(self) -> list[tuple[str, str]]:
        """(kind, key) of every entry directory, complete or not, and of leftover temporary directories; only under
        the kinds kdrun stores (:data:`KINDS`), so a ``dir=`` that is not a store exposes none of its folders."""
        out = set()
        if not os.path.isdir(self.root):
            return []
        for kind in KINDS:
            kdir = os.path.join(self.root, kind)
            if not os.path.isdir(kdir):
                continue
            names = os.listdir(kdir)
            for name in names:
                key = name.split(TMP)[0]
                if not os.path.isdir(os.path.join(kdir, name)):
                    continue
                # the store's: a key's name, its lock file or its marker; other folders there (a user's notes) are not
                ours = KEY.fullmatch(key) or TMP in name or f"{key}.lock" in names
                if ours or os.path.isfile(os.path.join(kdir, name, MARKER)):
                    out.add((kind, key))
        return sorted(out)

    def entries(self, verify: bool = False) -> list[Entry]:
        """Every entry directory (``problem`` set on incomplete or damaged ones); never modifies the store."""
        out = []
        for kind, key in self.entry_keys():
            e = self.inspect(kind, key, verify=verify)
            if e is None:  # only temporary directories: a builder at work, or killed
                partials = self._partials(kind, key)
                if not partials:  # renamed into place or removed since the listing
                    continue
                tmp = partials[0]
                e = Entry(
                    kind,
                    key,
                    tmp,
                    _du(tmp),
                    os.path.getmtime(tmp),
                    {},
                    "partial build (a builder is at work or was killed)",
                )
            out.append(e)
        return out

    def remove(self, kind: str, key: str) -> None:
        """Remove entry ``kind/key``, its leftover temporary directories and its lock file. The caller
        holds the entry's lock (:meth:`try_lock`): the lock file goes while still locked, and lockers
        that opened the old file notice and retry on a new one."""
        self._remove_partial(kind, key)
        shutil.rmtree(self._dir(kind, key), ignore_errors=True)
        try:
            os.remove(self._lock_path(kind, key))
        except FileNotFoundError:
            pass


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class StoreRefs:
    """The store entries one run uses, written to ``RUN_DIR/store_refs.json`` as soon as each is noted, so
    ``kdrun store gc`` keeps them while the run lives (only the main worker writes). A run resumed or rerun in its
    directory starts from the entries the file lists for the same store: those it has not reached yet stay kept."""

    def __init__(self, store: Store | None, run_dir: str, main: bool = True):
        self.store, self.path, self.main = store, os.path.join(run_dir, "store_refs.json"), main
        self.refs: dict[str, str] = {}
        self.store_id: str | None = None  # the store's name (Store.ident), read when the first entry is noted
        try:
            with open(self.path) as f:
                earlier = json.load(f)
            if store is not None and earlier.get("store") == store.root:
                self.refs = {str(k): str(v) for k, v in earlier.get("refs", {}).items()}
                # store_id stays None: read afresh at the first note, as a store made again at this path (a
                # deleted one) has another, and gc would take the run for none of its runs
        except (OSError, ValueError, AttributeError):
            pass

    def note(self, kind: str, key: str) -> None:
        if self.refs.get(kind) == key and self.store_id and os.path.exists(self.path):
            return  # listed already
        self.refs[kind] = key
        if self.main and self.store is not None:
            self.store_id = self.store_id or self.store.ident()
            io.write_json({"store": self.store.root, "store_id": self.store_id, "refs": self.refs}, self.path)
