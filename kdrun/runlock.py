"""Who is at work in a run directory: one process at a time, and a run killed outright told from one still running.

A run holds an exclusive ``flock`` on ``RUN_DIR/.running`` (which names its host and process) from start to end
and removes the file when it ends, complete or failed. So:

* a second ``kdrun train`` in the same directory (``resume=DIR`` while the run is still going) is refused with
  one line (:class:`RunInProgress`, exit code 2) before it changes anything: two writers would interleave their
  checkpoints;
* a ``.running`` file that no process holds is a run that died without a word (SIGKILL, out of memory, the
  machine went down): the operating system released its lock. ``kdrun report`` lists it as ``killed`` instead
  of ``running`` (:func:`state`), and ``kdrun train resume=DIR`` continues it from its last checkpoint.

On a file system without locks the run goes on unguarded (a warning says so). A network mount may keep each
host's locks to itself: there two hosts could both take the lock, and a report on another host than the one the
file names says it cannot tell (``incomplete``) rather than ``killed``.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import shlex
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from kdrun.errors import ConfigError

log = logging.getLogger("kdrun")

FILE = ".running"
RETRIES = 5  # a report probing the lock holds it for microseconds: a starting run tries again before refusing


class RunInProgress(ConfigError):
    """Another process is at work in the run directory; nothing was changed there."""


def _try_lock(fd: int) -> bool:
    """True with the lock taken; False when another process holds it. OSError when locks are not supported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


# the run directories (absolute) whose lock this process holds, with the descriptor holding it; any still held
# at exit (taken by a command whose job never came to hold it) are released then
_TAKEN: dict[str, int] = {}


def take(run_dir: str) -> None:
    """Take ``run_dir``'s lock now and keep it (:class:`RunInProgress` when another process has it): ``kdrun train``
    takes it before Hydra writes the run's ``.hydra/``, so a second command in the same directory is refused before
    it rewrites the first one's configuration; :func:`held` then keeps it for the job."""
    key = os.path.abspath(run_dir)
    if key not in _TAKEN:
        os.makedirs(key, exist_ok=True)
        fd = _lock(os.path.join(key, FILE))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}, since {time.ctime()}".encode(), 0)
        _TAKEN[key] = fd


@contextmanager
def held(run_dir: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (the one :func:`take` took, or now); :class:`RunInProgress` naming the
    holder when another process has it."""
    take(run_dir)
    try:
        yield
    finally:
        _release(os.path.abspath(run_dir))


def _release(key: str) -> None:
    fd = _TAKEN.pop(key, None)
    if fd is None:
        return
    try:
        os.remove(
            os.path.join(key, FILE)
        )  # still locked: a process waiting on this file finds it gone, locks a new one
    except OSError:
        pass
    os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_TAKEN):
        _release(key)


def hold_for_group(stack: ExitStack, run_dir: str) -> None:
    """Rank 0 takes ``run_dir``'s lock into ``stack`` (held until the stack closes); every data-parallel worker
    raises :class:`RunInProgress` when it could not, so none goes on alone into another run's directory."""
    from kdrun import distributed

    distributed.shared(lambda: stack.enter_context(held(run_dir)))


def _lock(path: str) -> int:
    """A descriptor of the file now at ``path`` holding its lock (not one its last holder removed meanwhile)."""
    holder = "another process"
    for attempt in range(RETRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_lock(fd)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
                os.close(fd)
                raise
            log.warning("%s: this file system has no locks; nothing stops a second process writing there", path)
            return fd  # unguarded, as without this module
        if locked:
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
        else:
            holder = _holder_text(fd) or holder
        os.close(fd)
        time.sleep(0.05 * (attempt + 1))
    raise _in_progress(os.path.dirname(path), holder)


def _in_progress(run_dir: str, holder: str) -> RunInProgress:
    return RunInProgress(
        f"{run_dir}: a run is at work in this directory ({holder}); wait for it to end, or stop it "
        f"(kdrun train resume={shlex.quote(run_dir)} then continues it from its checkpoints)"
    )


def _holder_text(fd: int) -> str:
    """What a lock file says of the process that took it: ``process 12 on host, since ...`` (``""`` if nothing)."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip()


def holder(run_dir: str) -> str:
    """:func:`_holder_text` of ``run_dir``'s lock file, or ``""`` without one."""
    try:
        fd = os.open(os.path.join(run_dir, FILE), os.O_RDONLY)
    except OSError:
        return ""
    try:
        return _holder_text(fd)
    finally:
        os.close(fd)


def check_free(run_dir: str) -> None:
    """:class:`RunInProgress` when a process is at work in ``run_dir`` (before anything is written there)."""
    if state(run_dir) == "running":
        raise _in_progress(run_dir, holder(run_dir) or "another process")


def state(run_dir: str) -> str | None:
    """``"running"`` while a process holds ``run_dir``'s lock, ``"killed"`` when its file is left and nobody holds it
    (the run died without removing it), ``"elsewhere"`` when nobody here holds it but it names another host (a
    network mount may keep locks to each host: that host alone can tell), None without the file (no run there, or
    one of a kdrun before this file)."""
    path = os.path.join(run_dir, FILE)
    fd = None
    for flags in (os.O_RDWR, os.O_RDONLY):  # an exclusive lock over NFS needs a descriptor open for writing
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            return None
        except OSError:
            continue
    if fd is None:  # there, but not for this user to open: cannot tell
        return "running"
    try:
        if not _try_lock(fd):
            return "running"
        fcntl.flock(fd, fcntl.LOCK_UN)
        host = _holder_text(fd).partition(" on ")[2].partition(",")[0]
        return "killed" if host in ("", socket.gethostname()) else "elsewhere"
    except OSError:  # no locks here: cannot tell
        return "running"
    finally:
        os.close(fd)
