"""``kdrun store ls|gc``: inspect and clean the artifact store of teachers and logit caches.

    kdrun store ls [dir=outputs/.store] [verify=true]
    kdrun store gc [dir=outputs/.store] [runs=outputs] [older_than=DAYS] [dry_run=true]

``ls`` lists every entry with its size, age and state (``ok``, or why it cannot
be used); it never modifies the store (``verify=true`` also checks every file's
SHA-256, else sizes only). ``gc`` removes every entry that no run under
``runs`` references (each run lists the entries it used in
``store_refs.json``), damaged and half-written entries, and temporary
directories of killed builders; with ``older_than`` it also keeps referenced
entries only when they are younger than that many days. It removes an entry
only while holding its lock: an entry being built or read is skipped, and a
lock a live process holds is never removed.
"""

from __future__ import annotations

import json
import os
import time

from kdrun.errors import ConfigError
from kdrun.store import Entry, Store

DEFAULTS = {"dir": "outputs/.store", "runs": "outputs", "older_than": None, "dry_run": "false", "verify": "false"}


def parse(args: list[str], allowed: set[str]) -> dict:
    opts = {k: v for k, v in DEFAULTS.items() if k in allowed}
    for a in args:
        key, eq, value = a.partition("=")
        if not eq or key not in allowed:
            raise ConfigError(f"{a}: unknown argument; valid: {', '.join(f'{k}=...' for k in sorted(allowed))}")
        opts[key] = value
    return opts


def referenced(runs_root: str, store_root: str) -> set[tuple[str, str]]:
    """(kind, key) of every entry a run under ``runs_root`` used from the store at ``store_root``."""
    refs = set()
    for dirpath, dirnames, filenames in os.walk(runs_root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if "store_refs.json" in filenames:
            try:
                with open(os.path.join(dirpath, "store_refs.json")) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                continue
            if info.get("store") and os.path.abspath(info["store"]) == store_root:
                refs.update(info.get("refs", {}).items())
    return refs


def describe(e: Entry, now: float) -> str:
    state = "ok" if e.problem is None else e.problem
    return f"{e.kind:<8} {e.key}  {e.size / 2**20:9.2f} MB  {(now - e.created) / 86400:7.2f} days  {state}"


def _true(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def store_main(args: list[str]) -> int:
    if not args or args[0] not in ("ls", "gc"):
        raise ConfigError("kdrun store: give a subcommand; valid: ls, gc")
    cmd, rest = args[0], args[1:]
    opts = parse(rest, {"dir", "verify"} if cmd == "ls" else {"dir", "runs", "older_than", "dry_run"})
    store = Store(opts["dir"])
    if not os.path.isdir(store.root):
        raise ConfigError(f"dir={opts['dir']}: no artifact store there")
    now = time.time()
    if cmd == "ls":
        entries = store.entries(verify=_true(opts["verify"]))
        print(f"{'kind':<8} {'key':<16}  {'size':>12}  {'age':>12}  state")
        for e in entries:
            print(describe(e, now))
        print(f"{len(entries)} entries, {sum(e.size for e in entries) / 2**20:.2f} MB in {store.root}")
        return 0
    try:
        max_age = float(opts["older_than"]) * 86400 if opts["older_than"] is not None else None
    except ValueError:
        raise ConfigError(f"older_than={opts['older_than']}: must be a number of days") from None
    refs = referenced(opts["runs"], store.root)
    dry = _true(opts["dry_run"])
    freed = 0
    for kind, key in store.entry_keys():
        with store.try_lock(kind, key) as locked:
            if not locked:  # being built, or read by a running job: never touched
                print(f"skipped  {kind:<8} {key}  (in use by another process)")
                continue
            entry = store.inspect(kind, key, verify=False)
            if entry is None:  # only temporary directories of a killed builder
                print(("would remove " if dry else "removed ") + f"{kind:<8} {key}  (partial build)")
                if not dry:
                    store.remove(kind, key)
                continue
            unused = (entry.kind, entry.key) not in refs
            too_old = max_age is not None and now - entry.created > max_age
            if entry.problem or unused or too_old:
                why = entry.problem or ("unreferenced" if unused else "older than limit")
                print(("would remove " if dry else "removed ") + describe(entry, now) + f" ({why})")
                freed += entry.size
                if not dry:
                    store.remove(kind, key)
    print(f"{'would free' if dry else 'freed'} {freed / 2**20:.2f} MB")
    return 0
