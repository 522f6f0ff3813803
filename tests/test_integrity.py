"""Faults injected into every kind of artifact, the store and sweeps: nothing damaged is used, nothing good is lost.

Each test names the fault it injects; the README's "Integrity" table maps them to what kdrun does.
"""

import errno
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

from kdrun import io
from kdrun.errors import ConfigError, KdrunError
from kdrun.store import Store, key_of, model_definition

FAST = [
    "trainer=smoke",
    "teacher=resnet8",
    "student=resnet8",
    "trainer.latency=false",
    "baseline=false",
]


# ---------------------------------------------------------------- fault injection helpers


def flip_tensor_bytes(path, n: int = 2) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor's data: the file stays a readable torch zip."""
    with zipfile.ZipFile(path) as z:
        info = max(
            (i for i in z.infolist() if "/data/" in i.filename),
            key=lambda i: i.file_size,
        )
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        data = bytearray(f.read(n))
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def flip_middle_bytes(path, n: int = 2) -> None:
    """Flip ``n`` bytes in the middle of any file."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(n)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate(path, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


class RunsCode:
    """A pickle that runs code when unpickled: creates the directory ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def evil_file(tmp_path) -> tuple[str, str]:
    marker = str(tmp_path / "PWNED")
    path = str(tmp_path / "evil.pt")
    torch.save(
        {"model": RunsCode(marker), "identity": {"arch": "resnet8", "num_classes": 10}},
        path,
    )
    return path, marker


# ---------------------------------------------------------------- kdrun.io: the one format


def test_artifact_round_trip_and_header(tmp_path):
    path = str(tmp_path / "a.pt")
    obj = {
        "model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "epoch": 3,
        "history": [{"loss": np.float64(0.5), "epoch": np.int64(1)}],
        "best": (None, 1.5),
        "rng": io.rng_state(),
    }
    io.save(obj, path, "checkpoint", key="k1")
    back = io.load(path, "checkpoint", key="k1")
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["best"] == (
        None,
        1.5,
    )
    assert back["history"] == [{"loss": 0.5, "epoch": 1}]  # NumPy scalars stored as Python values
    assert torch.load(path, weights_only=True)["header"]["kind"] == "checkpoint"  # plain torch.load still works
    with pytest.raises(io.DamagedArtifact, match="holds a checkpoint, not a logits"):
        io.load(path, "logits")
    with pytest.raises(io.DamagedArtifact, match="made for another checkpoint"):
        io.load(path, "checkpoint", key="k2")


def test_two_writers_with_one_process_id_on_a_shared_folder_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Two hosts (or containers) whose writers have the same process id write one file in a shared cache folder:
    each writes its own temporary file, so the file ends whole, as one of them wrote it."""
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    path = str(tmp_path / "shared.bin")

    def first(f):
        f.write(b"A" * 1000)
        io.atomic_write(path, lambda g: g.write(b"B" * 10))  # the other host, midway through the first write
        f.write(b"A" * 1000)

    io.atomic_write(path, first)
    assert open(path, "rb").read() == b"A" * 2000
    assert os.listdir(tmp_path) == ["shared.bin"]
    assert io.temp_name(path) != io.temp_name(path)


def test_rng_state_round_trips_through_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    path = str(tmp_path / "rng.pt")
    io.save({"rng": io.rng_state()}, path, "checkpoint")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    io.set_rng_state(io.load(path, "checkpoint")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------- bytes flipped / truncated, per artifact kind


def test_flipped_bytes_in_stage_checkpoint_end_resume_with_one_line(tmp_path):
    path = str(tmp_path / "student_last.pt")
    io.save({"model": {"w": torch.randn(64, 64)}, "epoch": 1}, path, "checkpoint")
    flip_tensor_bytes(path)
    with pytest.raises(KdrunError) as e:
        io.load_checkpoint(path)
    assert str(e.value) == (
        f"{path}: corrupt checkpoint (damaged (checksum mismatch)); delete it to restart this stage"
    )
    assert os.path.exists(path)  # never deleted: the user decides


def test_truncated_stage_checkpoint_end_resume_with_one_line(tmp_path):
    path = str(tmp_path / "teacher_last.pt")
    io.save({"model": {"w": torch.randn(64, 64)}, "epoch": 1}, path, "checkpoint")
    truncate(path)
    with pytest.raises(KdrunError, match=r"teacher_last.pt: corrupt checkpoint \(unreadable or damaged"):
        io.load_checkpoint(path)


@pytest.mark.parametrize("damage", [flip_tensor_bytes, truncate])
def test_damaged_decode_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    from kdrun.data.decode import load_cached, save_cached

    path = str(tmp_path / "imagefolder-abc.pt")
    tensors = {"train": torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8)}
    save_cached(path, "abc", tensors, {"classes": ["a"]})
    damage(path)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        assert load_cached(path, "abc") is None
    assert f"decode cache {path} is corrupt" in caplog.text


@pytest.mark.parametrize("damage", [flip_tensor_bytes, truncate])
def test_damaged_store_entry_is_never_returned_and_is_replaced(tmp_path, caplog, damage):
    store = Store(str(tmp_path / "store"))
    src = str(tmp_path / "teacher.pt")
    io.save({"model": {"w": torch.randn(64, 64)}}, src, "checkpoint")
    key = key_of({"t": 1})
    with store.lock("teacher", key):
        entry = store.publish("teacher", key, {"teacher.pt": src}, {"t": 1})
    damage(entry.file("teacher.pt"))
    with caplog.at_level(logging.WARNING, logger="kdrun"), store.lock("teacher", key):
        assert store.get("teacher", key) is None
        assert f"store: teacher entry {entry.path} is not usable: teacher.pt" in caplog.text
        store.publish("teacher", key, {"teacher.pt": src}, {"t": 1})  # the rebuild
        assert store.get("teacher", key) is not None
    io.load(store.get("teacher", key).file("teacher.pt"), "checkpoint")
    assert sorted(os.listdir(tmp_path / "store" / "teacher")) == [
        key,
        f"{key}.lock",
    ]  # no leftovers


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """One small run that stores its teacher and logit cache."""
    from tests.conftest import run_kdrun

    root = tmp_path_factory.mktemp("integrity")
    p = run_kdrun(
        "train",
        *FAST,
        "trainer.val_fraction=0.1",
        f"store.dir={root / 'store'}",
        f"hydra.run.dir={root / 'r1'}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return root


def test_flipped_bytes_in_stored_teacher_and_logits_are_rebuilt_not_used(kdrun, stored_run):
    """The issue's case: two bytes flipped in a published teacher. The next run says so, retrains it (the
    same teacher, bit for bit, as the first run) and rebuilds the logit cache; it never uses the damaged files."""
    root = stored_run
    store = Store(str(root / "store"))
    teacher, logits = (next(e for e in store.entries() if e.kind == k) for k in ("teacher", "logits"))
    flip_tensor_bytes(teacher.file("teacher.pt"))
    flip_middle_bytes(logits.file("logits.kdlc"))
    p = kdrun(
        "train",
        *FAST,
        "trainer.val_fraction=0.1",
        f"store.dir={root / 'store'}",
        f"hydra.run.dir={root / 'r2'}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"store: teacher entry {teacher.path} is not usable: teacher.pt is damaged (SHA-256 mismatch)" in p.stderr
    assert f"store: logits entry {logits.path} is not usable: logits.kdlc is damaged (SHA-256 mismatch)" in p.stderr
    assert "teacher: stored as" in p.stderr
    m1, m2 = (json.loads((root / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert m2["test"]["teacher"] == m1["test"]["teacher"]
    assert [e.problem for e in store.entries(verify=True)] == [
        None,
        None,
    ]  # both replaced by sound entries


def test_flipped_bytes_in_teacher_checkpoint_exit_2_one_line(kdrun, stored_run, tmp_path):
    bad = tmp_path / "teacher.pt"
    shutil.copy(stored_run / "r1" / "checkpoints" / "teacher.pt", bad)
    flip_tensor_bytes(bad)
    p = kdrun("train", *FAST, f"teacher.checkpoint={bad}", f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == f"kdrun: error: teacher.checkpoint={bad}: damaged (checksum mismatch)"
    assert "Traceback" not in p.stderr
    assert (tmp_path / "run" / "FAILED").is_file() and not (tmp_path / "run" / "metrics.json").exists()


def test_flipped_bytes_in_resumed_stage_checkpoint_exit_2_one_line(kdrun, stored_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stored_run / "r1", run_dir)
    last = run_dir / "checkpoints" / "student_last.pt"
    flip_tensor_bytes(last)
    p = kdrun(
        "train",
        *FAST,
        "trainer.val_fraction=0.1",
        f"store.dir={stored_run / 'store'}",
        f"hydra.run.dir={run_dir}",
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"kdrun: error: {last}: corrupt checkpoint (damaged (checksum mismatch)); delete it to restart this stage"
    )
    assert last.exists()  # kept for the user to inspect


# ---------------------------------------------------------------- the store under crashes, full disks, races and gc

_PUBLISH = textwrap.dedent("""
    import sys
    from kdrun.store import Store
    store = Store(sys.argv[1])
    with store.lock("teacher", "k1"):
        store.publish("teacher", "k1", {"a.bin": sys.argv[2], "b.bin": sys.argv[2]}, {})
""")


def test_sigkill_during_store_publish_leaves_no_entry_and_is_rebuilt(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(1 << 16))
    root = tmp_path / "store"
    p = subprocess.run(
        [sys.executable, "-c", _PUBLISH, str(root), str(src)],
        capture_output=True,
        text=True,
        env=dict(os.environ, KDRUN_KILL_AT="publish:1"),
        timeout=120,
        check=False,
    )
    assert p.returncode == -9, p.stderr
    store = Store(str(root))
    tmp_dirs = [n for n in os.listdir(root / "teacher") if ".tmp-" in n]
    assert len(tmp_dirs) == 1 and not (root / "teacher" / "k1").exists()
    assert store.entries()[0].problem.startswith("partial build")  # listed as such; ls does not modify
    with store.lock("teacher", "k1"):
        assert store.get("teacher", "k1") is None
        store.publish("teacher", "k1", {"a.bin": str(src)}, {})  # the next builder cleans up and publishes
    assert sorted(os.listdir(root / "teacher")) == ["k1", "k1.lock"]
    assert store.get("teacher", "k1").problem is None


def test_disk_full_during_store_publish_keeps_previous_state(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 1000)
    old = store.publish("teacher", "k1", {"a.bin": str(src)}, {"v": 1})
    with open(old.file("a.bin"), "r+b") as f:  # the entry being replaced is damaged
        f.write(b"y")
    before = sorted(os.listdir(tmp_path / "store" / "teacher"))

    def full(s, d, *a, **k):
        with open(d, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(KdrunError) as e:
        store.publish("teacher", "k1", {"a.bin": str(src)}, {"v": 2})
    assert str(e.value) == (
        f"store: could not publish teacher k1 in {store.root} (No space left on device); "
        "nothing was stored and the run's own files are kept"
    )
    assert sorted(os.listdir(tmp_path / "store" / "teacher")) == before  # no temporary directory left
    assert src.read_bytes() == b"x" * 1000
    assert store.get("teacher", "k1") is None  # the damaged entry is still not used


_BUILDER = textwrap.dedent("""
    import sys, time
    from kdrun.store import Store
    root, out, tag = sys.argv[1:4]
    store = Store(root)
    with store.lock("teacher", "k1"):
        if store.get("teacher", "k1") is None:
            time.sleep(1.0)
            open(out, "w").write(tag)
            store.publish("teacher", "k1", {"a.txt": out}, {})
            print("BUILT")
        else:
            print("REUSED")
""")


def test_two_builders_of_one_entry_build_it_once(tmp_path):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _BUILDER,
                str(tmp_path / "store"),
                str(tmp_path / f"{t}.txt"),
                t,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for t in ("a", "b")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(o.strip() for o, _ in outs) == ["BUILT", "REUSED"]
    assert Store(str(tmp_path / "store")).get("teacher", "k1").problem is None


_SLOW_BUILDER = textwrap.dedent("""
    import os, sys, time
    from kdrun.store import Store
    root, src, go = sys.argv[1:4]
    store = Store(root)
    with store.lock("teacher", "building"):
        os.makedirs(os.path.join(root, "teacher", f"building.tmp-{os.getpid()}"))  # mid-build
        print("LOCKED", flush=True)
        while not os.path.exists(go):
            time.sleep(0.05)
        store.publish("teacher", "building", {"a.bin": src}, {})
    print("PUBLISHED", flush=True)
""")


def test_gc_while_a_sweep_builds_skips_locked_entries_and_keeps_their_locks(tmp_path, capsys):
    from kdrun.store_cli import store_main

    root = tmp_path / "store"
    src = tmp_path / "a.bin"
    src.write_bytes(b"z" * 100)
    (tmp_path / "no_runs").mkdir()
    store = Store(str(root))
    store.publish("teacher", "unused", {"a.bin": str(src)}, {})
    store.publish("logits", "reading", {"a.bin": str(src)}, {})
    go = tmp_path / "go"
    builder = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BUILDER, str(root), str(src), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert builder.stdout.readline().strip() == "LOCKED"
    try:
        with store.lock("logits", "reading"):  # a job reading this entry right now
            assert store_main(["gc", f"dir={root}", "runs=none"]) == 0
        out = capsys.readouterr().out
    finally:
        go.touch()
    assert builder.wait(timeout=60) == 0 and builder.stdout.read().strip() == "PUBLISHED", builder.stderr.read()
    assert "skipped  teacher  building  (in use by another process)" in out
    assert "skipped  logits   reading  (in use by another process)" in out
    assert "removed teacher  unused" in out
    assert not (root / "teacher" / "unused").exists() and not (root / "teacher" / "unused.lock").exists()
    assert (root / "logits" / "reading").is_dir() and (root / "logits" / "reading.lock").exists()
    assert store.get("teacher", "building").problem is None  # the build finished into a sound entry


def test_ls_never_modifies_the_store(tmp_path, capsys):
    from kdrun.store_cli import store_main

    root = tmp_path / "store"
    src = tmp_path / "a.bin"
    src.write_bytes(b"z" * 100)
    store = Store(str(root))
    entry = store.publish("teacher", "damaged", {"a.bin": str(src)}, {})
    with open(entry.file("a.bin"), "r+b") as f:  # one byte changed, same size
        f.write(b"y")
    os.makedirs(root / "teacher" / "half.tmp-99999")

    def snapshot():
        return sorted(
            (d, f, os.path.getsize(os.path.join(d, f))) for d, _, fs in os.walk(root) for f in fs + [""] if f
        ) + sorted(d for d, _, _ in os.walk(root))

    before = snapshot()
    assert store_main(["ls", f"dir={root}", "verify=true"]) == 0
    out = capsys.readouterr().out
    assert "a.bin is damaged (SHA-256 mismatch)" in out and "partial build" in out
    assert snapshot() == before


def test_gc_removes_a_lock_only_while_holding_it_and_lockers_retry(tmp_path):
    """A process that opened the lock file before gc removed it must not think it holds the lock."""
    store = Store(str(tmp_path / "store"))
    with store.lock("teacher", "k"):
        pass
    lock = store._lock_path("teacher", "k")
    with store.try_lock("teacher", "k") as held:
        assert held
        store.remove("teacher", "k")  # gc: removes the lock file while holding it
        assert not os.path.exists(lock)
        with store.try_lock("teacher", "k") as again:  # a new locker gets a new lock file
            assert again and os.path.exists(lock)


def test_a_locker_whose_lock_file_gc_removed_retries_on_the_new_one(tmp_path, monkeypatch):
    """gc removes the lock file between a locker's open and its flock: the flock then holds a file no one else
    sees, so the locker must notice (another inode at the path) and lock the file that is there."""
    import fcntl

    from kdrun import store as store_module

    path = str(tmp_path / "entry.lock")
    open(path, "w").close()
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            os.remove(path)  # gc, between this locker's open and its flock
        calls.append(op)
        return real(fd, op)

    monkeypatch.setattr(store_module.fcntl, "flock", flock)
    fd = store_module._acquire(path, blocking=False)
    assert fd is not None and len(calls) == 2  # locked the removed file, saw it, locked the new one
    assert os.fstat(fd).st_ino == os.stat(path).st_ino
    os.close(fd)


# ---------------------------------------------------------------- stale reuse


def test_store_keys_change_with_model_definition_and_artifact_format(tmp_path, monkeypatch):
    from kdrun.models import MODELS

    module = tmp_path / "netdef.py"
    module.write_text("def factory(num_classes, in_chans, img_size):\n    return None\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("netdef", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(MODELS._items, "tmpnet", mod.factory)
    v1 = model_definition("tmpnet")
    module.write_text("def factory(num_classes, in_chans, img_size):\n    return 1  # changed\n")
    assert model_definition("tmpnet") != v1
    k1 = key_of({"definition": v1})
    monkeypatch.setattr(io, "FORMAT", io.FORMAT + 1)
    assert key_of({"definition": v1}) != k1


# ---------------------------------------------------------------- untrusted files


def test_pickle_that_runs_code_is_never_executed(tmp_path, caplog):
    from torch import nn

    from kdrun.cache import CacheShape, LogitCache
    from kdrun.data.decode import load_cached
    from kdrun.weights import load_pretrained, load_teacher

    path, marker = evil_file(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"teacher.checkpoint=.*evil.pt: unreadable or damaged \(UnpicklingError",
    ):
        load_teacher(path, nn.Linear(2, 2), {"arch": "resnet8", "num_classes": 10})
    with pytest.raises(
        ConfigError,
        match=r"student.pretrained=x: not a loadable state_dict \(UnpicklingError; ",
    ):
        load_pretrained(path, nn.Linear(2, 2), "student.pretrained=x")
    with pytest.raises(KdrunError, match="corrupt checkpoint"):
        io.load_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        assert load_cached(path, "k") is None
        assert LogitCache.open(path, CacheShape(2, 0, 2), "k").filled == 0  # raw rows: never unpickled
    assert not os.path.exists(marker)


def test_pretrained_that_is_not_a_state_dict_exit_2_one_line(kdrun, tmp_path):
    path, marker = evil_file(tmp_path)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    plain = tmp_path / "plain.pkl"  # a pickle of plain values, not torch.save's: torch warns before refusing it
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    for bad, why in (
        (path, "not a loadable state_dict (UnpicklingError"),
        (str(text), "not a loadable state_dict (not the zip archive torch.save writes; "),
        (str(plain), "not a loadable state_dict (not the zip archive torch.save writes; "),
    ):
        p = kdrun(
            "train",
            *FAST,
            f"teacher.pretrained={bad}",
            f"hydra.run.dir={tmp_path / 'run'}",
        )
        assert p.returncode == 2, p.stderr[-2000:]
        assert p.stderr.strip().splitlines() == [p.stderr.strip().splitlines()[-1]], p.stderr  # one line, no warning
        assert p.stderr.strip().splitlines()[-1].startswith(f"kdrun: error: teacher.pretrained={bad}: {why}")
        assert not (tmp_path / "run").exists()  # refused before the run directory is made
    assert not os.path.exists(marker)


def test_pretrained_of_another_architecture_is_one_line(tmp_path):
    from torch import nn

    from kdrun.weights import load_pretrained

    path = tmp_path / "w.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(ConfigError, match=r"^teacher.pretrained=w: does not fit the model \("):
        load_pretrained(str(path), nn.Linear(2, 2), "teacher.pretrained=w")
    load_pretrained(str(path), nn.Linear(3, 3), "teacher.pretrained=w")  # a fitting one loads


# ---------------------------------------------------------------- sweeps


def test_diverging_job_inside_a_3_job_sweep_costs_only_itself(kdrun, tmp_path):
    sweep = tmp_path / "sweep"
    p = kdrun(
        "train",
        "-m",
        *FAST,
        "trainer.val_fraction=0.1",
        f"store.dir={tmp_path / 'store'}",
        "+teacher.optim.lr=0.1",
        "trainer.epochs=2",  # at 1e30 the first step is finite; the next one's loss is not
        "optim.lr=0.05,1e30,0.1",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert p.returncode == 1, p.stderr[-3000:]
    assert re.fullmatch(
        r"kdrun: error: 1 of 3 sweep jobs failed; job 1: student: non-finite loss \(nan\) at epoch \d+, step \d+; "
        r"the last good checkpoint is kept \(lower optim.lr, set optim.grad_clip, or check the data\); the other jobs "
        r"completed; "
        f"see {re.escape(str(sweep / 'report.md'))}",
        p.stderr.strip().splitlines()[-1],
    ), p.stderr[-2000:]
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "2" / "metrics.json").is_file()
    assert "non-finite loss" in (sweep / "1" / "FAILED").read_text() and not (sweep / "1" / "metrics.json").exists()
    report = (sweep / "report.md").read_text()
    assert "3 runs: 2 complete, 1 failed" in report and "`1`: failed: student: non-finite loss" in report


@pytest.mark.parametrize(
    ("overrides", "stage", "key"),
    [
        (
            ["loss=ft", "loss.paraphraser_epochs=2", "loss.paraphraser_lr=1e30"],
            "student_paraphraser",
            "loss.paraphraser_lr",
        ),
        (["+teacher.optim.lr=1e30", "trainer.teacher_epochs=2"], "teacher", "teacher.optim.lr"),
        (["loss=ab", "loss.init_epochs=2", "optim.lr=1e30", "+teacher.optim.lr=0.05"], "student_init", "optim.lr"),
    ],
)
def test_a_diverging_stage_names_the_key_of_its_own_learning_rate(kdrun, tmp_path, overrides, stage, key):
    """FT's paraphraser stage runs at loss.paraphraser_lr and a teacher with its own teacher.optim at that LR:
    'lower optim.lr' (the message of every stage) changed neither."""
    p = kdrun("train", *FAST, f"store.dir={tmp_path / 'store'}", *overrides, f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2, p.stderr[-3000:]
    assert re.fullmatch(
        rf"kdrun: error: {stage}: non-finite loss \(nan\) at epoch \d+, step \d+; the last good checkpoint is kept "
        rf"\(lower {re.escape(key)}, set optim.grad_clip, or check the data\).*",
        p.stderr.strip().splitlines()[-1],
    ), p.stderr[-2000:]


def test_every_job_starts_from_the_same_torch_globals():
    from kdrun.callbacks import CleanGlobalState, TorchGlobals

    cb = CleanGlobalState()
    before = TorchGlobals.now()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(1 if before.threads != 1 else 2)
        torch.backends.cudnn.benchmark = not before.cudnn_benchmark
        cb.on_job_start(config=None)
        assert TorchGlobals.now() == before
    finally:
        before.restore()


def test_sweep_objective_reads_validation_never_test():
    from kdrun import objective

    m = {
        "roles": {"student": "peer2", "teacher": "teacher"},
        "stages": {
            "online": {"val_top1_by_model": {"peer1": 50.0, "peer2": 60.0}},
            "teacher": {"final_val_top1": 90.0, "best_val_top1": 91.0},
        },
        "test": {"peer2": {"top1": 99.0}},
    }
    assert objective.value(m, objective.parse(None)) == 60.0  # scheme=online: the chosen peer's validation top-1
    assert objective.value(m, objective.parse("teacher.best_val_top1")) == 91.0
    no_val = {"roles": {"student": "student"}, "stages": {"student": {}}, "test": {"student": {"top1": 99.0}}}
    assert math.isnan(objective.value(no_val, objective.parse(None)))  # no validation figure: NaN, never test's
    assert math.isnan(objective.value(no_val, objective.parse("student.best_val_top1")))
    with pytest.raises(ConfigError, match="a test-set metric cannot be optimised"):
        objective.parse("student.test_top1")


def test_a_sweep_metric_naming_no_model_of_the_run_says_so(caplog):
    """sweep.metric=studnet.val_top1: every trial failed (NaN) without a word; the run now says which models it has.
    A model without the figure (no validation split) is the sweeper's own check, not this warning."""
    from omegaconf import OmegaConf

    from kdrun.task import objective

    m = {"roles": {"student": "student"}, "stages": {"student": {}}, "test": {"student": {"top1": 99.0}}}
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        assert math.isnan(objective(m, OmegaConf.create({"sweep": {"metric": "student.val_top1"}})))
        assert caplog.text == ""
        assert math.isnan(objective(m, OmegaConf.create({"sweep": {"metric": "studnet.val_top1"}})))
    assert (
        "sweep.metric=studnet.val_top1: this run has no model 'studnet'; valid: student; a sweeper counts"
        in caplog.text
    )


def test_logit_rows_damaged_on_disk_are_computed_again_not_learned(kdrun, tmp_path):
    """A run took its complete logit cache from the store (a hard link: one file), was killed, and the shared file
    then lost rows on disk. The resumed run checks every row's CRC, warns, has the teacher compute the damaged rows
    again in its own copy, and replaces the store's entry: it ends exactly like the run that filled the cache."""
    from kdrun.cache import CacheShape, read_header

    store = tmp_path / "store"
    args = [*FAST, f"store.dir={store}"]
    p = kdrun("train", *args, f"hydra.run.dir={tmp_path / 'a'}")
    assert p.returncode == 0, p.stderr[-2000:]
    run = tmp_path / "b"
    p = kdrun("train", *args, f"hydra.run.dir={run}", env={"KDRUN_KILL_AT": "student:1"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    cache = run / "teacher_logits.kdlc"
    assert cache.stat().st_nlink == 3  # one file: the store entry, run a and run b
    h = read_header(str(cache))
    shape = CacheShape(h["samples"], h["views"], h["classes"], h["topk"])
    with open(cache, "r+b") as f:
        f.seek(shape.data_offset)
        f.write(b"\x00\x5b" * (40 * shape.row_bytes // 2))  # 40 rows of fp16 224.0: a confident, wrong teacher
    p = kdrun("train", f"resume={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (
        f"logit cache {cache}: 40 of {shape.rows} filled rows fail their checksum (damaged on disk, with the store "
        "entry that shares the file); marked empty, the teacher computes them again where a stage reads them"
    ) in p.stderr
    assert "cache: stored as" in p.stderr and cache.stat().st_nlink == 2  # the new sound entry, linked again
    assert [e.problem for e in Store(str(store)).entries(verify=True)] == [None, None]
    first, resumed = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("a", "b"))
    assert resumed["test"]["student"] == first["test"]["student"]
