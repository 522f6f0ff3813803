"""``kdrun store gc``: which runs it reads, how it checks its arguments, and what it keeps while runs are going.

The runs here are directories with the files a run leaves (``store_refs.json`` written by :class:`StoreRefs`,
``metrics.json`` once finished); no training, so every test takes well under a second."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdrun import store_cli
from kdrun.cli import main
from kdrun.store import MARKER, Store, StoreRefs, key_of

TEACHER, LOGITS = key_of({"t": 1}), key_of({"l": 1})


def make_store(root, *entries):
    """A store at ``root`` holding ``entries`` ((kind, key) pairs, each a 100-byte file)."""
    store = Store(str(root))
    root.parent.mkdir(parents=True, exist_ok=True)
    src = root.parent / "src.bin"
    src.write_bytes(b"z" * 100)
    for kind, key in entries:
        store.publish(kind, key, {"a.bin": str(src)}, {})
    return store


def make_run(run_dir, store, *entries, finished=True):
    """A run directory that used ``entries`` of ``store`` (and finished unless ``finished=False``)."""
    run_dir.mkdir(parents=True)
    refs = StoreRefs(store, str(run_dir))
    for kind, key in entries:
        refs.note(kind, key)
    if finished:
        (run_dir / "metrics.json").write_text("{}")


def snapshot(root):
    """Every path under ``root`` (entries, lock files, temporary directories)."""
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)


def entries(store):
    return sorted((e.kind, e.key) for e in store.entries())


def age(store, kind, key, seconds):
    """Make the entry ``kind/key`` of ``store`` ``seconds`` old (its COMPLETE marker's creation time)."""
    marker = os.path.join(store.inspect(kind, key).path, MARKER)
    with open(marker) as f:
        info = json.load(f)
    with open(marker, "w") as f:
        json.dump(info | {"created": time.time() - seconds}, f)


def kdrun_main(capsys, monkeypatch, *args):
    """``kdrun ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- which runs: the output root the store is in


def test_runs_default_to_the_output_root_holding_the_store(tmp_path, monkeypatch, capsys):
    """gc from another directory, dir= given, runs= not: the runs under the store's output root keep their
    entries (it used to read ./outputs of the current directory, find none, and remove them all)."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER), ("logits", LOGITS))
    make_run(out / "train" / "r1", store, ("teacher", TEACHER))
    make_run(out / "multirun" / "s" / "0", store, ("logits", LOGITS))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}")
    assert code == 0 and "freed 0.00 MB" in stdout, stdout
    assert entries(store) == sorted([("teacher", TEACHER), ("logits", LOGITS)])
    assert not (elsewhere / "outputs").exists()


def test_default_store_and_runs_are_the_configured_output_root(tmp_path, monkeypatch, capsys):
    """No dir=, no runs=: the store is store.dir and the runs are paths.output of kdrun train's config."""
    from kdrun.cli import compose

    cfg = compose([])
    assert store_cli.configured() == (cfg.paths.output, cfg.store.dir)
    assert store_cli.default_runs(cfg.store.dir) == os.path.abspath(cfg.paths.output)
    out = tmp_path / cfg.paths.output
    store = make_store(tmp_path / cfg.store.dir, ("teacher", TEACHER), ("logits", LOGITS))
    make_run(out / "train" / "r1", store, ("teacher", TEACHER))
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc")
    assert code == 0 and stdout.count("removed") == 1 and f"logits   {LOGITS}" in stdout, stdout
    assert entries(store) == [("teacher", TEACHER)]


def test_missing_runs_directory_is_an_error_and_removes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER))
    make_run(out / "train" / "r1", store, ("teacher", TEACHER))
    before = snapshot(out / ".store")
    missing = tmp_path / "outputs"
    code, stdout, stderr = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"runs={missing}")
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"kdrun: error: runs={missing}: no such directory; valid: ") and stderr.count("\n") == 1
    assert f"here {out}" in stderr  # names the default
    assert snapshot(out / ".store") == before


def test_a_store_outside_an_output_root_needs_runs(tmp_path, monkeypatch, capsys):
    """store.dir set to a directory not named .store: there is no output root to default to."""
    store = make_store(tmp_path / "shared_store", ("teacher", TEACHER))
    before = snapshot(tmp_path / "shared_store")
    code, _, stderr = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={tmp_path / 'shared_store'}")
    assert code == 2 and stderr.startswith("kdrun: error: runs: not given") and stderr.count("\n") == 1
    assert snapshot(tmp_path / "shared_store") == before and entries(store) == [("teacher", TEACHER)]


def test_the_cli_from_another_directory(kdrun, tmp_path):
    """The reviewer's reproduction, as a user runs it: `kdrun store gc dir=OUT/.store` in a directory without
    ./outputs keeps what a finished run uses, and a typo in dry_run= is refused."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER), ("logits", LOGITS))
    make_run(out / "train" / "r1", store, ("teacher", TEACHER), ("logits", LOGITS))
    p = kdrun("store", "gc", f"dir={out / '.store'}", "dry_run=ture", "older_than=-1", cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == "kdrun: error: dry_run=ture: must be true or false\n"
    p = kdrun("store", "gc", f"dir={out / '.store'}", cwd=tmp_path)
    assert p.returncode == 0 and "freed 0.00 MB" in p.stdout, p.stdout + p.stderr
    assert entries(store) == sorted([("teacher", TEACHER), ("logits", LOGITS)])


def test_a_store_named_through_a_symlink_is_the_same_store(tmp_path, monkeypatch, capsys):
    """Runs record the store's path as they saw it; gc given another path to the same directory still finds
    their references."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER))
    make_run(out / "train" / "r1", store, ("teacher", TEACHER))
    (tmp_path / "link").symlink_to(out)
    code, stdout, _ = kdrun_main(
        capsys, monkeypatch, "store", "gc", f"dir={tmp_path / 'link' / '.store'}", f"runs={out}"
    )
    assert code == 0 and "freed 0.00 MB" in stdout, stdout
    assert entries(store) == [("teacher", TEACHER)]


def test_an_unreadable_store_refs_is_an_error_and_removes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    make_store(out / ".store", ("teacher", TEACHER))
    (out / "train" / "r1").mkdir(parents=True)
    (out / "train" / "r1" / "store_refs.json").write_text('{"store": ')
    before = snapshot(out / ".store")
    code, _, stderr = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"runs={out}")
    assert code == 2 and stderr.startswith(f"kdrun: error: runs={out}: cannot read ") and stderr.count("\n") == 1
    assert snapshot(out / ".store") == before


# ---------------------------------------------------------------- every argument checked before anything is touched


BAD = [
    ("gc", "dry_run=ture", "dry_run=ture: must be true or false"),
    ("gc", "dry_run=1", "dry_run=1: must be true or false"),
    ("gc", "dry_run=yes", "dry_run=yes: must be true or false"),
    ("gc", "dry_run=", "dry_run=: must be true or false"),
    ("gc", "dry_run", "dry_run: needs a value"),
    ("gc", "older_than=-1", "older_than=-1: must be a number of days >= 0"),
    ("gc", "older_than=nan", "older_than=nan: must be a number of days >= 0"),
    ("gc", "older_than=inf", "older_than=inf: must be a number of days >= 0"),
    ("gc", "older_than=week", "older_than=week: must be a number of days >= 0"),
    ("gc", "runs=", "runs=: empty"),
    ("gc", "dir=", "dir=: empty"),
    ("gc", "verify=ja", "verify=ja: must be true or false"),
    ("gc", "--dry-run", "--dry-run: unknown argument; valid: dir=..., dry_run=..., older_than=..., runs=..., verify="),
    ("ls", "verify=yes", "verify=yes: must be true or false"),
    ("ls", "dry_run=true", "dry_run=true: unknown argument; valid: dir=..., verify=..."),
]


@pytest.mark.parametrize("cmd,arg,message", BAD, ids=[f"{c}-{a}" for c, a, _ in BAD])
def test_bad_arguments_are_one_line_exit_2_and_touch_nothing(tmp_path, monkeypatch, capsys, cmd, arg, message):
    out = tmp_path / "out"
    make_store(out / ".store", ("teacher", TEACHER))  # unreferenced: a real gc would remove it
    (out / "train").mkdir()
    before = snapshot(out)
    # the bad argument last: nothing before it may have been acted on
    code, stdout, stderr = kdrun_main(capsys, monkeypatch, "store", cmd, f"dir={out / '.store'}", arg)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"kdrun: error: {message}") and stderr.count("\n") == 1, stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("value,dry", [("true", True), ("TRUE", True), ("True", True), ("false", False)])
def test_booleans_read_as_hydra_reads_them(tmp_path, monkeypatch, capsys, value, dry):
    """true/false in any case, as a Hydra override such as trainer.sync_bn=True."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER))
    make_run(out / "train" / "r1", store, ("teacher", key_of({"t": 9})))  # a run of this store, using another teacher
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"dry_run={value}")
    assert code == 0 and ("would remove" in stdout) == dry and ("removed" in stdout) == (not dry), stdout
    assert entries(store) == ([("teacher", TEACHER)] if dry else [])
    code, _, _ = kdrun_main(capsys, monkeypatch, "store", "ls", f"dir={out / '.store'}", f"verify={value}")
    assert code == 0


# ---------------------------------------------------------------- runs in progress


def test_older_than_keeps_what_an_unfinished_run_uses(tmp_path, monkeypatch, capsys):
    """older_than=0 makes every entry too old; one used by a run without metrics.json (running, or interrupted
    and to be resumed) is kept, one used only by finished runs goes."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER), ("logits", LOGITS))
    make_run(out / "train" / "running", store, ("teacher", TEACHER), finished=False)
    make_run(out / "train" / "done", store, ("teacher", TEACHER), ("logits", LOGITS))
    code, stdout, _ = kdrun_main(
        capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"runs={out}", "older_than=0"
    )
    assert code == 0, stdout
    assert f"kept     teacher  {TEACHER}" in stdout and "used by unfinished run" in stdout
    assert f"removed logits   {LOGITS}" in stdout and "(older than limit)" in stdout
    assert entries(store) == [("teacher", TEACHER)]
    (out / "train" / "running" / "metrics.json").write_text("{}")  # it finished: now old like the others
    code, stdout, _ = kdrun_main(
        capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"runs={out}", "older_than=0"
    )
    assert code == 0 and entries(store) == [], stdout


def test_older_than_is_in_days(tmp_path, monkeypatch, capsys):
    """older_than=1 is one day: of two entries a finished run uses, the one 2 hours old stays and the one 2 days
    old goes."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER), ("logits", LOGITS))
    make_run(out / "train" / "done", store, ("teacher", TEACHER), ("logits", LOGITS))
    age(store, "teacher", TEACHER, 2 * 3600)
    age(store, "logits", LOGITS, 2 * 86400)
    code, stdout, _ = kdrun_main(
        capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"runs={out}", "older_than=1"
    )
    assert code == 0 and stdout.count("removed") == 1, stdout
    assert f"removed logits   {LOGITS}" in stdout and "(older than limit)" in stdout
    assert entries(store) == [("teacher", TEACHER)]


def test_runs_of_another_store_keep_nothing_here(tmp_path, monkeypatch, capsys):
    """A run under runs= whose store_refs.json names another store (holding the same key: the same teacher
    recipe built there) says nothing about this store's entries: here that teacher is unreferenced and goes,
    while the entry a run of this store uses stays; the other store is not touched."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER), ("logits", LOGITS))
    other = make_store(tmp_path / "other" / ".store", ("teacher", TEACHER))
    make_run(out / "train" / "elsewhere", other, ("teacher", TEACHER))
    make_run(out / "train" / "here", store, ("logits", LOGITS))
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"runs={out}")
    assert code == 0 and stdout.count("removed") == 1, stdout
    assert f"removed teacher  {TEACHER}" in stdout and "(unreferenced)" in stdout
    assert entries(store) == [("logits", LOGITS)] and entries(other) == [("teacher", TEACHER)]


def test_a_run_that_starts_using_an_entry_during_gc_keeps_it(tmp_path, monkeypatch, capsys):
    """A run notes an entry in store_refs.json (then takes its lock) after gc has read the runs: gc reads them
    again with its candidates locked, and keeps that entry."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER), ("logits", LOGITS))
    make_run(out / "train" / "old", store, ("teacher", key_of({"t": 9})))  # a run of this store, another teacher
    real, calls = store_cli.referenced, []

    def referenced_then_a_run_starts(*args):
        refs = real(*args)
        if not calls:
            make_run(out / "train" / "new", store, ("teacher", TEACHER), finished=False)
        calls.append(1)
        return refs

    monkeypatch.setattr(store_cli, "referenced", referenced_then_a_run_starts)
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"runs={out}")
    assert code == 0, stdout
    assert f"kept     teacher  {TEACHER}" in stdout and "a run started using it during gc" in stdout
    assert f"removed logits   {LOGITS}" in stdout
    assert entries(store) == [("teacher", TEACHER)]


def test_an_entry_locked_by_a_running_job_is_skipped(tmp_path, monkeypatch, capsys):
    """Unreferenced (its run has not noted it yet) but locked: a builder or reader at work; never touched."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER))
    make_run(out / "train" / "old", store, ("teacher", key_of({"t": 9})))  # a run of this store, another teacher
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from kdrun.store import Store; s = Store(sys.argv[1])\n"
            "with s.lock('teacher', sys.argv[2]):\n    print('LOCKED', flush=True); sys.stdin.read()",
            str(out / ".store"),
            TEACHER,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        code, stdout, _ = kdrun_main(
            capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", f"runs={out}", "older_than=0"
        )
    finally:
        holder.communicate(timeout=60)
    assert code == 0 and f"skipped  teacher  {TEACHER}  (in use by another process)" in stdout, stdout
    assert entries(store) == [("teacher", TEACHER)] and (out / ".store" / "teacher" / f"{TEACHER}.lock").exists()


def test_a_folder_that_is_not_a_store_is_refused_and_loses_nothing(tmp_path):
    """``dir=$HOME`` by mistake: gc looks only under the kinds kdrun stores, and a folder with none is no store."""
    from kdrun.errors import ConfigError
    from kdrun.store_cli import store_main

    home = tmp_path / "home"
    (home / "projects" / "thesis").mkdir(parents=True)
    (home / "runs").mkdir()
    with pytest.raises(ConfigError, match=r"dir=.*home: no artifact store there \(no teacher/ or logits/\)"):
        store_main(["gc", f"dir={home}", f"runs={home / 'runs'}"])
    assert (home / "projects" / "thesis").is_dir()


def test_help_prints_the_usage(kdrun):
    for args in (["--help"], ["gc", "-h"]):
        p = kdrun("store", *args)
        assert p.returncode == 0 and p.stdout.startswith("usage: kdrun store ls") and "dry_run=true" in p.stdout


def test_runs_are_matched_to_their_store_by_its_name_at_any_path(tmp_path, monkeypatch, capsys):
    """Runs record the store's name (store_id) beside its path: gc of the same store reached by another path (a
    share mounted elsewhere on another machine, a moved folder) keeps the entries they use; a run of another store
    at the path this one had is not counted."""
    first = tmp_path / "nodeA" / ".store"
    store = make_store(first, ("teacher", TEACHER), ("logits", LOGITS))
    runs = tmp_path / "runs"
    make_run(runs / "r1", store, ("teacher", TEACHER))
    assert (
        json.loads((runs / "r1" / "store_refs.json").read_text())["store_id"]
        == (first / "store_id").read_text().strip()
    )
    moved = tmp_path / "nodeB" / "store"
    moved.parent.mkdir()
    os.rename(first, moved)
    other = make_store(first, ("logits", LOGITS))  # a new store where the first one was
    make_run(runs / "r2", other, ("logits", LOGITS))
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={moved}", f"runs={runs}")
    assert code == 0 and stdout.count("removed") == 1 and f"logits   {LOGITS}" in stdout, stdout
    assert entries(Store(str(moved))) == [("teacher", TEACHER)]


def test_a_rerun_keeps_the_entries_its_run_listed_until_it_reaches_them(tmp_path):
    """A run resumed (or rerun) in its directory starts from the store entries its store_refs.json lists: gc keeps
    the logit cache of a finished run whose rerun has only reached its teacher."""
    store = make_store(tmp_path / "store", ("teacher", TEACHER), ("logits", LOGITS))
    run = tmp_path / "run"
    make_run(run, store, ("teacher", TEACHER), ("logits", LOGITS))
    listed = (run / "store_refs.json").read_bytes()
    again = StoreRefs(store, str(run))  # the rerun
    again.note("teacher", TEACHER)
    assert (run / "store_refs.json").read_bytes() == listed
    again.note("teacher", key_of({"t": 2}))  # a teacher of other data: it replaces the first, the cache stays
    assert json.loads((run / "store_refs.json").read_text())["refs"] == {"teacher": key_of({"t": 2}), "logits": LOGITS}
    assert StoreRefs(Store(str(tmp_path / "other")), str(run)).refs == {}  # another store's list is not this one's


@pytest.mark.parametrize(
    "marker",
    [
        '{"files": ["a.bin"], "created": 1}',
        '{"files": {"a.bin": {"size": "big"}}, "created": 1}',
        '{"files": {}, "created": 1}',
        '{"files": {"a.bin": 7}, "created": 1}',
    ],
)
def test_a_marker_edited_by_hand_is_an_incomplete_entry_not_a_traceback(tmp_path, monkeypatch, capsys, marker):
    store = make_store(tmp_path / "store", ("teacher", TEACHER), ("logits", LOGITS))
    (Path(store.inspect("teacher", TEACHER).path) / MARKER).write_text(marker)
    assert store.get("teacher", TEACHER) is None  # a run rebuilds it
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "ls", f"dir={tmp_path / 'store'}")
    assert code == 0 and f"incomplete (no valid {MARKER}" in stdout, stdout
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={tmp_path / 'store'}", "runs=none")
    assert code == 0 and entries(store) == [], stdout


def test_a_run_again_names_the_store_as_it_is_now(tmp_path, monkeypatch, capsys):
    """A store deleted and made again at the same path has another id; a run resumed there kept the old one in its
    store_refs.json, so gc took the entries it was using for no run's and removed them."""
    import shutil

    store = make_store(tmp_path / "out" / ".store", ("teacher", TEACHER))
    make_run(tmp_path / "out" / "train" / "r1", store, ("teacher", TEACHER), finished=False)
    shutil.rmtree(tmp_path / "out" / ".store")
    store = make_store(tmp_path / "out" / ".store", ("teacher", TEACHER))
    assert store.ident()  # the new store's name, made by the first run that used it
    StoreRefs(store, str(tmp_path / "out" / "train" / "r1")).note("teacher", TEACHER)  # the run, resumed
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={tmp_path / 'out' / '.store'}")
    assert code == 0 and entries(store) == [("teacher", TEACHER)], stdout


def test_gc_of_runs_none_of_which_uses_the_store_is_refused_unless_runs_none(tmp_path, monkeypatch, capsys):
    """runs= a folder holding no run of this store (a typo, the runs kept elsewhere) removed every entry, those of
    unfinished runs too; now it is refused, and runs=none says no run uses the store."""
    store = make_store(tmp_path / "store", ("teacher", TEACHER), ("logits", LOGITS))
    (tmp_path / "elsewhere").mkdir()
    before = snapshot(tmp_path / "store")
    code, _, stderr = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={tmp_path / 'store'}", f"runs={tmp_path}")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"kdrun: error: runs={tmp_path}: no run there uses this store (no store_refs.json ")
    assert "remove all 2 sound entries" in stderr and "runs=none" in stderr
    assert snapshot(tmp_path / "store") == before
    code, stdout, _ = kdrun_main(
        capsys, monkeypatch, "store", "gc", f"dir={tmp_path / 'store'}", f"runs={tmp_path}", "dry_run=true"
    )
    assert code == 0 and stdout.count("would remove") == 2 and len(entries(store)) == 2
    assert f"note: no run under runs={tmp_path} uses this store: without dry_run=true gc refuses" in stdout
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={tmp_path / 'store'}", "runs=none")
    assert code == 0 and stdout.count("removed") == 2 and entries(store) == [], stdout


def test_gc_verify_removes_a_damaged_entry_and_leaves_the_store_s_other_folders(tmp_path, monkeypatch, capsys):
    """gc checked sizes only, so a file damaged in place stayed (its docs said damaged entries go); a folder a user
    put under teacher/ was removed as an incomplete entry; the reason was printed twice."""
    out = tmp_path / "out"
    store = make_store(out / ".store", ("teacher", TEACHER), ("logits", LOGITS))
    make_run(out / "train" / "r1", store, ("teacher", TEACHER), ("logits", LOGITS))
    path = Path(store.inspect("teacher", TEACHER).path) / "a.bin"
    path.write_bytes(b"y" + path.read_bytes()[1:])  # same size, other bytes
    (out / ".store" / "teacher" / "my_notes").mkdir()
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}")
    assert code == 0 and "removed" not in stdout and entries(store) == [("logits", LOGITS), ("teacher", TEACHER)]
    code, stdout, _ = kdrun_main(capsys, monkeypatch, "store", "gc", f"dir={out / '.store'}", "verify=true")
    assert code == 0 and entries(store) == [("logits", LOGITS)], stdout
    assert stdout.count("a.bin is damaged (SHA-256 mismatch)") == 1, stdout
    assert (out / ".store" / "teacher" / "my_notes").is_dir()
