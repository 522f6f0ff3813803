"""The artifact store: one build per entry, reuse across runs, crash recovery, ls and gc."""

import json
import os
import stat
import subprocess

import pytest

from kdrun.store import ID_FILE, Store, key_of

FAST = ["trainer=smoke", "teacher=resnet8", "student=resnet8", "trainer.latency=false", "baseline=false"]


def test_publish_get_and_half_written_entry(tmp_path):
    store = Store(str(tmp_path / "store"))
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 100)
    key = key_of({"a": 1})
    assert store.get("teacher", key) is None
    entry = store.publish("teacher", key, {"a.bin": str(src)}, {"a": 1})
    assert store.get("teacher", key).size == 100 and open(entry.file("a.bin"), "rb").read() == b"x" * 100
    with open(entry.file("a.bin"), "ab") as f:  # damaged after the fact: detected, never returned
        f.write(b"junk")
    assert store.get("teacher", key) is None and os.path.exists(entry.path)  # get() does not delete
    assert "a.bin has 104 bytes" in store.inspect("teacher", key).problem
    entry = store.publish("teacher", key, {"a.bin": str(src)}, {"a": 1})  # the rebuild replaces it
    assert store.get("teacher", key) is not None
    import shutil

    shutil.rmtree(entry.path)
    os.makedirs(store._dir("teacher", key))  # half-written (no COMPLETE marker), e.g. a crashed job
    assert store.get("teacher", key) is None


def test_a_group_shares_a_store_its_lock_files_and_id_are_theirs_too(tmp_path):
    """Under a group's umask (002) a lock file was made 0644 (another member could not open it to lock an entry) and
    the store's id 0600 (their runs could not read it, so gc matched their runs by path only)."""
    store = Store(str(tmp_path / "store"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / ID_FILE).write_text("abc\n")
    os.chmod(tmp_path / "old" / ID_FILE, 0o600)  # as a kdrun before made it
    assert Store(str(tmp_path / "old")).ident() == "abc"
    assert stat.S_IMODE(os.stat(tmp_path / "old" / ID_FILE).st_mode) == 0o644
    old = os.umask(0o002)
    try:
        ident = store.ident()
        with store.lock("teacher", "k"):
            pass
    finally:
        os.umask(old)
    assert ident and stat.S_IMODE(os.stat(tmp_path / "store" / ID_FILE).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "store" / "teacher" / "k.lock").st_mode) == 0o664


def test_two_runs_share_teacher_and_logits(kdrun, tmp_path):
    store = tmp_path / "store"
    p1 = kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert p1.returncode == 0, p1.stderr[-2000:]
    p2 = kdrun("train", *FAST, "loss.temperature=8", f"store.dir={store}", f"hydra.run.dir={tmp_path / 'r2'}")
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert "teacher: stored as" in p1.stderr and "reused resnet8 from the store" in p2.stderr
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert m1["test"]["teacher"] == m2["test"]["teacher"]
    assert m2["stages"]["cache"]["source"] == "store"
    assert (tmp_path / "r2" / "metrics_teacher.csv").is_file()
    # the first run again, finished: its own teacher stage, not the store's entry, and its cost as recorded
    p3 = kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert p3.returncode == 0, p3.stderr[-2000:]
    assert "teacher: already finished" in p3.stderr and "from the store" not in p3.stderr.split("cache")[0]
    m3 = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    assert m3["test"] == m1["test"] and m3["stages"]["teacher"].keys() == m1["stages"]["teacher"].keys()
    assert "store_key" not in m3["stages"]["teacher"]  # a store reuse notes the key it took
    t1, t3 = m1["timings_s"], m3["timings_s"]  # stage times as their checkpoints recorded them (to the last save)
    assert t3["teacher"] == pytest.approx(t1["teacher"], abs=0.05) and t3["student"] == pytest.approx(
        t1["student"], abs=0.05
    )
    assert t3["this_process"] < t3["total"]
    assert t3["total"] == pytest.approx(t3["this_process"] + t3["teacher"] + t3["student"], abs=0.05)

    p = kdrun("store", "ls", f"dir={store}")
    assert p.returncode == 0 and "2 entries" in p.stdout and "teacher" in p.stdout and "logits" in p.stdout
    # what each entry holds, not its hash alone
    teacher_key = m1["stages"]["teacher"].get("store_key") or m2["stages"]["teacher"]["store_key"]
    assert "resnet8 on digits, 1 epochs, seed 0" in p.stdout, p.stdout
    assert f"of teacher {teacher_key}, plain images, 143/1438 rows" in p.stdout, p.stdout
    p = kdrun("store", "gc", f"dir={store}", f"runs={tmp_path}")
    assert p.returncode == 0 and "freed 0.00 MB" in p.stdout  # both entries referenced by the runs
    import shutil

    shutil.rmtree(tmp_path / "r1")
    shutil.rmtree(tmp_path / "r2")
    p = kdrun("store", "gc", f"dir={store}", f"runs={tmp_path}")  # no run of this store left there: refused
    assert p.returncode == 2 and "no run there uses this store" in p.stderr and len(Store(str(store)).entries()) == 2
    p = kdrun("store", "gc", f"dir={store}", "runs=none")
    assert p.returncode == 0 and p.stdout.count("removed") == 2
    assert Store(str(store)).entries() == []


def test_a_run_again_keeps_the_teacher_it_took_from_the_store_once_the_entry_is_gone(kdrun, tmp_path):
    """A run that took its teacher from the store, run again after gc removed the entry (or the store was deleted),
    trained a new teacher and wrote it over its checkpoints/teacher.pt: the teacher its student learnt from."""
    import shutil

    store = tmp_path / "store"
    assert kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={tmp_path / 'r1'}").returncode == 0
    p = kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={tmp_path / 'r2'}")
    assert p.returncode == 0 and "reused resnet8 from the store" in p.stderr, p.stderr[-2000:]
    teacher = tmp_path / "r2" / "checkpoints" / "teacher.pt"
    before, m2 = teacher.read_bytes(), json.loads((tmp_path / "r2" / "metrics.json").read_text())
    shutil.rmtree(store)
    p = kdrun("train", f"resume={tmp_path / 'r2'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "this run's own" in p.stderr and "teacher epoch=" not in p.stderr and "teacher: stored as" not in p.stderr
    assert teacher.read_bytes() == before
    m = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert m["test"]["teacher"] == m2["test"]["teacher"] and m["stages"]["teacher"]["source"] == "store"


def test_a_run_stopped_in_its_teacher_stage_that_then_takes_the_stored_teacher_drops_its_own_attempt(kdrun, tmp_path):
    """Another run trained the same teacher meanwhile: the stopped run takes that one, and its own half-trained
    checkpoint and per-step rows, which describe no model of the run, go."""
    import signal

    store, r1 = tmp_path / "store", tmp_path / "r1"
    args = [*FAST, f"store.dir={store}", "logger=[csv]", "trainer.checkpoint_every_steps=1"]
    p = kdrun("train", *args, f"hydra.run.dir={r1}", env={"KDRUN_KILL_AT": "teacher:2"})
    assert p.returncode == -signal.SIGKILL and (r1 / "checkpoints" / "teacher_last.pt").exists(), p.stderr[-2000:]
    assert kdrun("train", *args, f"hydra.run.dir={tmp_path / 'r2'}").returncode == 0
    p = kdrun("train", f"resume={r1}")
    assert p.returncode == 0 and "reused resnet8 from the store" in p.stderr, p.stderr[-2000:]
    assert not (r1 / "checkpoints" / "teacher_last.pt").exists()
    assert not (r1 / "metrics_teacher_steps.csv").exists()
    assert (r1 / "metrics_teacher.csv").read_bytes() == (tmp_path / "r2" / "metrics_teacher.csv").read_bytes()


def test_parallel_runs_build_the_teacher_once(tmp_path):
    """Two processes started together on one store: one trains the teacher, the other waits and reuses it."""
    from tests.conftest import KDRUN, WORKDIR

    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [*KDRUN, "train", *FAST, f"loss.alpha={a}", f"store.dir={store}", f"hydra.run.dir={tmp_path / f'p{a}'}"],
            cwd=WORKDIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in (0.5, 0.9)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("teacher: stored as" in e for e in errs) == 1
    assert sum("from the store" in e for e in errs) == 1
    assert len([e for e in Store(str(store)).entries() if e.kind == "teacher"]) == 1


def test_store_cli_bad_input(kdrun, tmp_path):
    p = kdrun("store", "ls", f"dir={tmp_path / 'none'}")
    assert p.returncode == 2
    want = f"kdrun: error: dir={tmp_path / 'none'}: no artifact store there (no teacher/ or logits/)"
    assert p.stderr.strip() == want
    p = kdrun("store", "rm")
    assert p.returncode == 2 and "valid: ls, gc" in p.stderr
    p = kdrun("store", "gc", "foo=1")
    assert p.returncode == 2 and "foo=1: unknown argument" in p.stderr


def test_untrained_teacher_is_stored_and_reused(kdrun, tmp_path):
    """trainer.teacher_epochs=0 (a teacher used as initialised, e.g. for speed benchmarks) has no epoch rows:
    it is stored without them and reused."""
    store = tmp_path / "store"
    args = [*FAST, "trainer.teacher_epochs=0", "trainer.epochs=1", f"store.dir={store}"]
    p1 = kdrun("train", *args, f"hydra.run.dir={tmp_path / 'r1'}")
    assert p1.returncode == 0, p1.stderr[-2000:]
    assert "teacher: stored as" in p1.stderr
    assert "the students learn from an untrained teacher (random weights)" in p1.stderr  # said, not refused
    p2 = kdrun("train", *args, f"hydra.run.dir={tmp_path / 'r2'}")
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert "reused resnet8 from the store" in p2.stderr


@pytest.mark.parametrize(
    "option", ["teacher.label_smoothing=0.2", "+teacher.augment.cutout=4"], ids=["label_smoothing", "cutout"]
)
def test_a_teacher_option_trains_its_own_teacher(kdrun, tmp_path, option):
    """teacher.label_smoothing (the teacher's CE) and teacher.augment (the images of its training) change the
    teacher, so they are part of its store key: such a teacher is trained and stored beside the plain one,
    never reused for it, and a second plain run reuses the plain one (whose key is the one runs had before the
    options existed)."""
    store = tmp_path / "store"
    runs = {"plain": [], "option": [option], "again": []}
    err = {}
    for name, extra in runs.items():
        p = kdrun("train", *FAST, *extra, f"store.dir={store}", f"hydra.run.dir={tmp_path / name}")
        assert p.returncode == 0, p.stderr[-2000:]
        err[name] = p.stderr
    assert "teacher: stored as" in err["plain"] and "teacher: stored as" in err["option"]
    assert "reused resnet8 from the store" in err["again"]
    ce = {n: (tmp_path / n / "metrics_teacher.csv").read_text() for n in ("plain", "option")}
    assert ce["plain"] != ce["option"]  # same seed and data: only the loss or the teacher's images differ


def test_logits_of_a_rebuilt_teacher_entry_are_not_those_of_the_teacher_before(kdrun, tmp_path):
    """A teacher entry rebuilt with other weights under the same recipe (a damaged one trained again, on another
    machine or thread count): its students took the old teacher's logits from the store, keyed by the recipe."""
    from kdrun import io as kio

    store = tmp_path / "store"
    p = kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert p.returncode == 0, p.stderr[-2000:]
    (entry,) = [e for e in Store(str(store)).entries() if e.kind == "teacher"]
    blob = kio.load(entry.file("teacher.pt"), "checkpoint")
    blob["model"] = {k: -v if k.startswith("fc.") else v for k, v in blob["model"].items()}
    other = tmp_path / "other.pt"
    kio.atomic_save(blob, str(other))
    with Store(str(store)).lock("teacher", entry.key):
        Store(str(store)).publish("teacher", entry.key, {"teacher.pt": str(other)}, entry.recipe)
    source = {}
    for name in ("r2", "r3"):
        p = kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={tmp_path / name}")
        assert p.returncode == 0 and "reused resnet8 from the store" in p.stderr, p.stderr[-2000:]
        source[name] = json.loads((tmp_path / name / "metrics.json").read_text())["stages"]["cache"]["source"]
    assert source == {"r2": "run", "r3": "store"}, source


def test_a_run_again_whose_students_are_done_stores_no_empty_logit_cache(kdrun, tmp_path):
    """A finished run run again without its cache file (removed, or made for another teacher) fills no row, and
    published its empty cache as the store's entry."""
    import shutil

    store, run = tmp_path / "store", tmp_path / "r1"
    assert kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={run}").returncode == 0
    (run / "teacher_logits.kdlc").unlink()
    shutil.rmtree(store / "logits")
    p = kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={run}")
    assert p.returncode == 0 and "student: already finished" in p.stderr, p.stderr[-2000:]
    assert "cache: stored as" not in p.stderr and [e.kind for e in Store(str(store)).entries()] == ["teacher"]


def test_logits_of_another_teacher_precision_are_not_reused(kdrun, tmp_path):
    """A teacher.checkpoint's store key is its file; the logit cache's key adds the precision of the forward pass
    that filled it, so fp32 logits are never taken from a bf16 fill (or the reverse)."""
    store = tmp_path / "store"
    p = kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={tmp_path / 'r0'}")
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = tmp_path / "r0" / "checkpoints" / "teacher.pt"
    source = {}
    for name, precision in (("bf16", "bf16"), ("fp32", "fp32"), ("bf16_again", "bf16")):
        run = tmp_path / name
        p = kdrun(
            "train",
            *FAST,
            f"teacher.checkpoint={ckpt}",
            f"teacher.precision={precision}",
            f"store.dir={store}",
            f"hydra.run.dir={run}",
        )
        assert p.returncode == 0, p.stderr[-2000:]
        source[name] = json.loads((run / "metrics.json").read_text())["stages"]["cache"]["source"]
    assert source["fp32"] != "store" and source["bf16_again"] == "store", source


def test_a_teacher_checkpoint_is_keyed_by_its_content(kdrun, tmp_path):
    """Another teacher copied over teacher.checkpoint with the old file time (cp -p, rsync -a): its logits are not
    taken from the old teacher's cache; the same teacher under a new time still reuses them."""
    import shutil

    from kdrun import io as kio

    store = tmp_path / "store"
    p = kdrun("train", *FAST, f"store.dir={store}", f"hydra.run.dir={tmp_path / 'r0'}")
    assert p.returncode == 0, p.stderr[-2000:]
    first, other, ckpt = tmp_path / "first.pt", tmp_path / "other.pt", tmp_path / "teacher.pt"
    shutil.copyfile(tmp_path / "r0" / "checkpoints" / "teacher.pt", first)
    blob = kio.load(str(first), "checkpoint")
    blob["model"] = {k: -v if k.startswith("fc.") else v for k, v in blob["model"].items()}
    kio.atomic_save(blob, str(other))
    source = {}
    for name, weights in (("first", first), ("other", other), ("first_again", first)):
        shutil.copyfile(weights, ckpt)
        os.utime(ckpt, ns=(1_700_000_000 * 10**9,) * 2)  # one file time for all three
        p = kdrun(
            "train", *FAST, f"teacher.checkpoint={ckpt}", f"store.dir={store}", f"hydra.run.dir={tmp_path / name}"
        )
        assert p.returncode == 0, p.stderr[-2000:]
        source[name] = json.loads((tmp_path / name / "metrics.json").read_text())["stages"]["cache"]["source"]
    assert source == {"first": "run", "other": "run", "first_again": "store"}, source


def test_a_changed_pretrained_file_is_another_teacher(kdrun, tmp_path):
    """teacher.pretrained is keyed by the file's contents: new weights at the same path train a new teacher."""
    import torch

    from kdrun.models import build_model

    weights, store = tmp_path / "start.pt", tmp_path / "store"
    err = []
    for seed in (0, 1, 1):
        torch.manual_seed(seed)
        torch.save(build_model("resnet8", 10, 1, 8).state_dict(), weights)
        p = kdrun(
            "train",
            *FAST,
            f"teacher.pretrained={weights}",
            f"store.dir={store}",
            f"hydra.run.dir={tmp_path / str(len(err))}",
        )
        assert p.returncode == 0, p.stderr[-2000:]
        err.append(p.stderr)
    assert "teacher: stored as" in err[0] and "teacher: stored as" in err[1]  # seed 1's weights: not seed 0's teacher
    assert "reused resnet8 from the store" in err[2]  # the same file again


def test_teacher_key_holds_sync_bn_only_with_several_workers(tmp_path, monkeypatch):
    """SyncBatchNorm changes what a data-parallel teacher learns, so it is part of that teacher's key; with one
    worker it does nothing and the key is the one it always was."""
    from kdrun import distributed, train
    from kdrun.cli import compose
    from kdrun.store import key_of

    def key(workers, *overrides):
        monkeypatch.setattr(distributed, "size", lambda: workers)
        cfg = compose(["store.enabled=false", *overrides])
        return key_of(train.Run(cfg, str(tmp_path)).teachers.recipe())

    assert key(1, "trainer.sync_bn=true") == key(1, "trainer.sync_bn=false")
    assert key(2, "trainer.sync_bn=true") != key(2, "trainer.sync_bn=false")


def test_a_random_resized_crop_streamed_from_files_is_keyed_apart_from_one_of_the_decoded_copy(tmp_path):
    """Streamed, a random-resized crop is cut from the full-resolution file; in memory, from the copy decoded at
    dataset.image_size: the same box gives other pixels, so neither the teacher nor the logit cache of one is
    reused for the other. Pad-crops are the same pixels either way and keep one key."""
    from PIL import Image

    from kdrun import train
    from kdrun.cache import CacheShape
    from kdrun.cli import compose
    from kdrun.teachers import Teacher

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (24, 24), (40 * i, 200 if c == "b" else 0, 30)).save(
                    tmp_path / "data" / split / c / f"{i}.png"
                )

    def keys(mode, *augment):
        cfg = compose(
            [
                "dataset=imagefolder",
                f"dataset.root={tmp_path / 'data'}",
                "dataset.image_size=16",
                f"dataset.mode={mode}",
                f"dataset.cache_dir={tmp_path / 'cache'}",
                "store.enabled=false",
                *augment,
            ]
        )
        run = train.Run(cfg, str(tmp_path / "run"))
        teacher = Teacher(None, "teacher", "k", "fp32")
        return key_of(run.teachers.recipe()), key_of(run.caches.recipe(teacher, CacheShape(8, 8, 2, None)))

    rrc = ["dataset.augment.kind=random_resized_crop", "dataset.augment.flip=true"]
    streamed, decoded = keys("stream", *rrc), keys("memory", *rrc)
    assert streamed[0] != decoded[0] and streamed[1] != decoded[1]
    assert keys("stream", "dataset.augment.crop_pad=2") == keys("memory", "dataset.augment.crop_pad=2")


def test_a_reused_teacher_says_why_it_has_no_ema_row(kdrun, tmp_path):
    """trainer.ema averages the weights of a stage trained in the run: a teacher from the store has none, and the
    run says so rather than leaving the teacher_ema row out unexplained."""
    store = tmp_path / "store"
    args = [*FAST, "trainer.epochs=1", "trainer.ema=0.9", f"store.dir={store}"]
    tests = {}
    for name in ("first", "again"):
        p = kdrun("train", *args, f"hydra.run.dir={tmp_path / name}")
        assert p.returncode == 0, p.stderr[-2000:]
        tests[name] = json.loads((tmp_path / name / "metrics.json").read_text())["test"]
    assert "teacher_ema" in tests["first"] and "teacher_ema" not in tests["again"]
    assert "teacher: reused from the store, so no teacher_ema row (trainer.ema averages a stage trained" in p.stderr


def test_a_copy_of_an_image_folder_reuses_the_stored_teacher_and_logits_and_compares(kdrun, tmp_path):
    """The same files copied elsewhere with new file times (a cluster job's local scratch, a download from object
    storage): the store's teacher and logit cache are reused and `kdrun compare` pairs the runs. An image changed
    is other data: the teacher is trained again."""
    import shutil

    from PIL import Image

    from tests.test_data import make_folder

    data, copy, store = tmp_path / "data", tmp_path / "copy", tmp_path / "store"
    make_folder(data, per_split={"train": 8, "test": 4}, size=16)
    args = [*FAST, "dataset=imagefolder", "dataset.image_size=16", f"store.dir={store}"]
    args += [f"dataset.cache_dir={tmp_path / 'decoded'}"]
    p = kdrun("train", *args, f"dataset.root={data}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert p.returncode == 0 and "teacher: stored as" in p.stderr, p.stderr[-2000:]
    shutil.copytree(data, copy, copy_function=shutil.copyfile)
    for f in copy.rglob("*.png"):
        os.utime(f, (1_000_000_000, 1_000_000_000))  # other times than the originals', whatever the clock
    p = kdrun("train", *args, f"dataset.root={copy}", f"hydra.run.dir={tmp_path / 'r2'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "reused resnet8 from the store" in p.stderr and "data: decoded" in p.stderr  # its own decoded copy
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert m2["stages"]["cache"]["source"] == "store" and m2["test"]["teacher"] == m1["test"]["teacher"]
    assert m1["dataset"]["identity"] != m2["dataset"]["identity"]
    assert m1["dataset"]["content"] == m2["dataset"]["content"]
    p = kdrun("compare", str(tmp_path / "r1"), str(tmp_path / "r2"))
    assert p.returncode == 0, p.stderr[-2000:]
    Image.new("RGB", (16, 16), (1, 2, 3)).save(copy / "train" / "ant" / "000.png")  # another picture
    p = kdrun("train", *args, f"dataset.root={copy}", f"hydra.run.dir={tmp_path / 'r3'}")
    assert p.returncode == 0 and "teacher: stored as" in p.stderr, p.stderr[-2000:]


def test_a_run_waiting_for_an_entry_another_run_builds_stops_on_sigterm(tmp_path, monkeypatch):
    """It waited in a blocking flock, deaf to SIGTERM until the other run's teacher was trained (hours, past a
    scheduler's grace period); now it polls and stops at once."""
    import fcntl
    import threading

    from kdrun import preempt, store

    path = str(tmp_path / "entry.lock")
    other = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # the run that builds the entry
    monkeypatch.setattr(preempt.STOP, "requested", "SIGTERM")
    outcome = []

    def wait():
        try:
            store._acquire(path, blocking=True)
        except preempt.Preempted as e:
            outcome.append(str(e))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    os.close(other)  # lets a waiter still blocked go
    assert outcome == [f"stopped by SIGTERM before another process released {path}"]
