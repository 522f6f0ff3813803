"""``kdrun store ls|gc``: inspect and clean the artifact store of teachers and logit caches.

    kdrun store ls [dir=outputs/.store] [verify=true|false]
    kdrun store gc [dir=outputs/.store] [runs=DIR|none] [older_than=DAYS] [dry_run=true|false] [verify=true|false]

``ls`` lists every entry with its size, age and state (``ok``, or why it cannot
be used); it never modifies the store (``verify=true`` also checks every file's
SHA-256, else sizes only). ``gc`` removes every entry that no run under
``runs`` references (each run lists the entries it used in
``store_refs.json``), damaged and half-written entries, and temporary
directories of killed builders; with ``older_than`` it also keeps referenced
entries only when they are younger than that many days, except those a run
that has not finished (no ``metrics.json`` yet: running, interrupted or failed)
uses. ``runs`` defaults to the output root the store lives in (``store.dir`` is
``${paths.output}/.store``, so ``dir=/x/.store`` reads the runs under ``/x``);
a ``runs`` directory that does not exist is an error, and so is one that holds no
run of this store (a typo, or runs kept elsewhere) when gc would remove sound
entries for it: ``runs=none`` says no run uses the store, and removes them.

Every argument is checked before the store is touched: an unknown key, a
boolean other than true/false (any case, as Hydra reads them), a number of days
that is not finite and >= 0, or a store or runs directory that does not exist
is one line and exit code 2, and nothing is removed. ``gc`` removes an entry
only while holding its lock: an entry being built or read is skipped, and a
lock a live process holds is never removed. Before removing unreferenced or old
entries it reads the runs' references again with those entries locked, so a run
that started using one meanwhile keeps it.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cache

from kdrun.errors import ConfigError
from kdrun.io import can_create_in
from kdrun.store import ID_FILE, KINDS, Entry, Store

USAGE = """usage: kdrun store ls [dir=outputs/.store] [verify=true|false]
       kdrun store gc [dir=outputs/.store] [runs=DIR|none] [older_than=DAYS] [dry_run=true|false]
                      [verify=true|false]

ls   every entry (trained teachers, logit caches) with its size, age and state; never modifies the store
gc   removes entries no run under runs= uses (default: the output root the store is in; none: no run
     uses the store), damaged or half-written ones, and with older_than= those older than DAYS that no
     unfinished run uses; dry_run=true lists what it would remove; verify=true also finds damaged
     files by their SHA-256 (else by their sizes)"""
KEYS = {"ls": ("dir", "verify"), "gc": ("dir", "runs", "older_than", "dry_run", "verify")}
BOOLEANS = ("verify", "dry_run")
REFS_FILE = "store_refs.json"
DONE_FILE = "metrics.json"  # written last by a run: it has finished
BATCH = 128  # removal candidates held locked together while the runs' references are read again


@cache
def configured() -> tuple[str, str]:
    """(``paths.output``, ``store.dir``) as ``kdrun train``'s packaged config sets them:
    ``outputs`` and ``outputs/.store``."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    conf = files("kdrun.configs")
    paths = OmegaConf.create(conf.joinpath("paths", "default.yaml").read_text())
    train = OmegaConf.create(conf.joinpath("train.yaml").read_text())
    store = OmegaConf.to_container(train.store)  # unresolved: store.dir is ${paths.output}/.store
    cfg = OmegaConf.create({"paths": {"output": paths.output}, "store": store})
    return str(cfg.paths.output), str(cfg.store.dir)


def default_runs(store_dir: str) -> str | None:
    """The output root whose store ``store_dir`` is (``X`` for ``X/.store``), or None when ``store_dir`` is
    not laid out as ``store.dir`` is by default (``${paths.output}/.store``)."""
    output, default_store = configured()
    inner = os.path.relpath(default_store, output)  # .store
    if inner.startswith(".." + os.sep) or inner == "..":
        return None
    path, suffix = os.path.abspath(store_dir), os.sep + inner
    return (path[: -len(suffix)] or os.sep) if path.endswith(suffix) else None


def _boolean(key: str, value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ConfigError(f"{key}={value}: must be true or false")
    return value.lower() == "true"


def _days(key: str, value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and days >= 0):
        raise ConfigError(f"{key}={value}: must be a number of days >= 0 (e.g. {key}=30)")
    return days


def parse(cmd: str, args: list[str]) -> dict:
    """The options of ``kdrun store CMD``, every one checked (ConfigError, one line, on the first bad one):
    ``dir`` (str), ``runs`` (str or None: not given), ``older_than`` (days or None), ``dry_run``/``verify``."""
    allowed = KEYS[cmd]
    opts: dict = {"dir": configured()[1], "runs": None, "older_than": None, "dry_run": False, "verify": False}
    valid = ", ".join(f"{k}=..." for k in sorted(allowed))
    for a in args:
        key, eq, value = a.partition("=")
        if not eq and key in allowed:
            raise ConfigError(f"{a}: needs a value ({a}=...); valid: {valid}")
        if not eq or key not in allowed:
            raise ConfigError(f"{a}: unknown argument; valid: {valid}")
        if key in BOOLEANS:
            opts[key] = _boolean(key, value)
        elif key == "older_than":
            opts[key] = _days(key, value)
        elif not value.strip():
            raise ConfigError(f"{key}=: empty; give a directory ({key}=DIR)")
        else:
            opts[key] = value
    return {k: v for k, v in opts.items() if k in allowed}


NO_RUNS = "none"  # runs=none: no run uses the store


def runs_root(opts: dict) -> str:
    """The directory holding the runs that use the store: ``runs=``, else the output root the store is in (or
    :data:`NO_RUNS`)."""
    runs = opts["runs"]
    if runs == NO_RUNS:
        return runs
    if runs is None:
        runs = default_runs(opts["dir"])
        if runs is None:
            raise ConfigError(
                f"runs: not given, and dir={opts['dir']} is not an output root's .store; give the directory "
                "holding the runs that use this store (their paths.output), runs=DIR"
            )
    if not os.path.isdir(runs):
        raise ConfigError(
            f"runs={runs}: no such directory; valid: the directory holding the runs that use the store "
            f"(their paths.output; by default the one dir= is in, here {default_runs(opts['dir']) or 'none'})"
        )
    return runs


@dataclass
class Refs:
    """The store entries the runs under a root use."""

    used: set[tuple[str, str]] = field(default_factory=set)  # (kind, key) used by any run
    runs: int = 0  # runs of this store found
    unfinished: dict[tuple[str, str], str] = field(default_factory=dict)  # ... by a run without metrics.json: its dir
    unreadable: list[str] = field(default_factory=list)  # run directories or reference files that could not be read


def _read_id(root: str) -> str | None:
    """The store's name (:meth:`kdrun.store.Store.ident`), None when it has none yet; gc never makes one."""
    try:
        with open(os.path.join(root, ID_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b)  # samefile: a bind mount
    except OSError:
        return False


def referenced(runs: str, store_root: str) -> Refs:
    """The entries of the store at ``store_root`` that runs under ``runs`` use (their ``store_refs.json``): a run
    that recorded the store's name (:data:`kdrun.store.ID_FILE`) is matched by it, wherever it mounted the store;
    one of an older kdrun by the store's path."""
    refs = Refs()
    if runs == NO_RUNS:
        return refs
    ours = _read_id(store_root)
    for dirpath, dirnames, filenames in os.walk(runs, onerror=lambda e: refs.unreadable.append(str(e.filename))):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if REFS_FILE not in filenames:
            continue
        path = os.path.join(dirpath, REFS_FILE)
        try:
            with open(path) as f:
                info = json.load(f)
            store, used = info.get("store"), {(str(k), str(v)) for k, v in info.get("refs", {}).items()}
            theirs = info.get("store_id")
        except (OSError, ValueError, AttributeError, TypeError):
            refs.unreadable.append(path)
            continue
        if theirs and ours:
            if theirs != ours:
                continue
        elif not isinstance(store, str) or not _same_dir(store, store_root):
            continue
        refs.used |= used
        refs.runs += 1
        if not os.path.exists(os.path.join(dirpath, DONE_FILE)):
            refs.unfinished.update(dict.fromkeys(used, dirpath))
    return refs


def describe(e: Entry, now: float, about: str | None = None) -> str:
    state = "ok" if e.problem is None else e.problem
    shown = f"{about:<44}  " if about is not None else ""
    return f"{e.kind:<8} {e.key}  {e.size / 1e6:9.2f} MB  {(now - e.created) / 86400:7.2f} days  {shown}{state}"


def contents(e: Entry) -> str:
    """What an entry holds, from its recipe: a teacher's model, data, epochs and seed; a logit cache's teacher,
    views and rows ("-" for an entry whose recipe says nothing readable)."""
    r = e.recipe
    try:
        if e.kind == "teacher":
            data = str(r["data"])  # a named data set's identity begins with its name; an image folder's is a hash
            data = data.split("-")[0] if "-" in data else f"data {data[:8]}"
            start = f", from {r['weights']}" if r.get("weights") else ", from a file" if r.get("pretrained") else ""
            return f"{r['model']['arch']} on {data}{start}, {r['epochs']} epochs, seed {r['seed']}"
        if e.kind == "logits":
            views = f"{r['views']} views" if r["views"] else "plain images"
            return f"of teacher {r['teacher']}, {views}, {r['filled']}/{r['train']} rows"
    except (KeyError, TypeError):
        pass
    return "-"


def _why(entry: Entry | None, refs: Refs, max_age: float | None, now: float) -> str | None:
    """Why ``entry`` goes (None: it stays). Call under the entry's lock."""
    if entry is None:  # only temporary directories, and no builder holds the lock: a killed one's
        return "partial build"
    if entry.problem:
        return entry.problem
    ident = (entry.kind, entry.key)
    if ident not in refs.used:
        return "unreferenced"
    if ident in refs.unfinished:  # its run is still going (or will be resumed): never too old
        return None
    if max_age is not None and now - entry.created > max_age:
        return "older than limit"
    return None


def _line(kind: str, key: str, entry: Entry | None, now: float, why: str) -> str:
    if entry is None:
        return f"{kind:<8} {key}  ({why})"
    return describe(entry, now) + (f" ({why})" if why != entry.problem else "")


def gc(store: Store, runs: str, max_age: float | None, dry: bool, now: float, verify: bool = False) -> int:
    """Remove (or, ``dry``, list) what :func:`_why` says goes; print one line each; return the bytes freed."""
    refs = referenced(runs, store.root)
    if refs.unreadable:
        raise ConfigError(
            f"runs={runs}: cannot read {refs.unreadable[0]}, so which entries its run uses is unknown; make it "
            "readable or remove that run, then run gc again (nothing was removed)"
        )
    if runs != NO_RUNS and not refs.runs:
        sound = [e for e in store.entries() if e.problem is None]
        if sound and dry:
            note = f"note: no run under runs={runs} uses this store: without dry_run=true gc refuses"
            print(f"{note} (runs={NO_RUNS}: it removes them)")
        elif sound:
            raise ConfigError(
                f"runs={runs}: no run there uses this store (no store_refs.json under it names it), so gc would "
                f"remove all {len(sound)} sound entries; give the directory holding the runs that use it, or "
                f"runs={NO_RUNS} to remove them (dry_run=true lists them; nothing was removed)"
            )
    freed = 0
    pending: list[tuple[str, str, Entry | None, str, ExitStack]] = []  # removal candidates, each locked

    def remove_pending() -> int:
        """Remove the candidates that the runs' references, read again now that they are locked, leave unused:
        a run notes an entry in its store_refs.json before it takes the entry's lock."""
        fresh, gone = referenced(runs, store.root), 0
        while pending:
            kind, key, entry, why, held = pending.pop(0)
            with held:
                if entry is not None and entry.problem is None:  # unreferenced or old: still so?
                    if fresh.unreadable:
                        print(f"kept     {_line(kind, key, entry, now, f'cannot read {fresh.unreadable[0]}')}")
                        continue
                    if _why(entry, fresh, max_age, now) is None:
                        print(f"kept     {_line(kind, key, entry, now, 'a run started using it during gc')}")
                        continue
                store.remove(kind, key)
                print(f"removed {_line(kind, key, entry, now, why)}")
                gone += entry.size if entry is not None else 0
        return gone

    try:
        for kind, key in store.entry_keys():
            held = ExitStack()
            if not held.enter_context(store.try_lock(kind, key)):  # being built, or read by a running job
                held.close()
                print(f"skipped  {kind:<8} {key}  (in use by another process)")
                continue
            entry = store.inspect(kind, key, verify=verify)
            why = _why(entry, refs, max_age, now)
            if why is not None and not dry:
                pending.append((kind, key, entry, why, held))
                if len(pending) >= BATCH:
                    freed += remove_pending()
                continue
            held.close()
            if why is not None:
                print(f"would remove {_line(kind, key, entry, now, why)}")
                freed += entry.size if entry is not None else 0
            elif entry is not None and max_age is not None and now - entry.created > max_age:
                run = refs.unfinished[(entry.kind, entry.key)]
                print(f"kept     {_line(kind, key, entry, now, f'older than limit; used by unfinished run {run}')}")
        freed += remove_pending()
    finally:
        for *_, held in pending:  # only after an error: release the locks still held
            held.close()
    return freed


def store_main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    if not args or args[0] not in KEYS:
        what = f"{args[0]}: unknown subcommand" if args else "give a subcommand"
        raise ConfigError(f"kdrun store: {what}; valid: ls, gc")
    cmd = args[0]
    opts = parse(cmd, args[1:])
    store = Store(opts["dir"])
    if not any(os.path.isdir(os.path.join(store.root, kind)) for kind in KINDS):  # e.g. dir=$HOME
        raise ConfigError(f"dir={opts['dir']}: no artifact store there (no {' or '.join(f'{k}/' for k in KINDS)})")
    now = time.time()
    if cmd == "ls":
        entries = store.entries(verify=opts["verify"])
        print(f"{'kind':<8} {'key':<16}  {'size':>12}  {'age':>12}  {'what':<44}  state")
        for e in entries:
            print(describe(e, now, contents(e)))
        print(f"{len(entries)} entries, {sum(e.size for e in entries) / 1e6:.2f} MB in {store.root}")
        return 0
    runs = runs_root(opts)
    for d in [store.root, *(os.path.join(store.root, k) for k in KINDS)]:
        if os.path.isdir(d) and not can_create_in(d):
            raise ConfigError(
                f"dir={opts['dir']}: {d} is not writable, and gc takes each entry's lock file, also with "
                "dry_run=true; run it as a user (or on a mount) that can write to the store"
            )
    max_age = opts["older_than"] * 86400 if opts["older_than"] is not None else None
    freed = gc(store, runs, max_age, opts["dry_run"], now, opts["verify"])
    print(f"{'would free' if opts['dry_run'] else 'freed'} {freed / 1e6:.2f} MB")
    return 0
