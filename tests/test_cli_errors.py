"""Bad input: exit code 2, one line naming the key or file and what is valid, nothing half-written."""

import os

import pytest


@pytest.mark.parametrize(
    "args, expected",
    [
        (["teacher=nosuchnet"], "teacher=nosuchnet: unknown option; valid:"),
        (["loss.alpha=1.5"], "loss.alpha=1.5: must be a number in [0, 1]"),
        (["loss.temperature=0"], "loss.temperature=0: must be a number > 0"),
        (["trainer.epochs=-1"], "trainer.epochs=-1: must be an integer >= 0"),
        (["trainer.pre_stage_epochs=0"], "trainer.pre_stage_epochs=0: must be an integer >= 1 (or null"),
        (
            ["teacher=resnet18", "teacher.weights=IMAGENET1K_V1", f"teacher.pretrained={__file__}"],
            f"teacher.pretrained={__file__} and teacher.weights=IMAGENET1K_V1: both give the starting weights",
        ),
        (["loss=kd,dkd"], "loss=kd,dkd: several values are a sweep: add -m (kdrun train -m loss=kd,dkd ...), or "),
        (["loss.temperature=range(1,3)"], "loss.temperature=range(1,3): several values are a sweep: add -m (kdrun"),
        (["loss.temperature=${oops}"], "loss.temperature: Interpolation key 'oops' not found; give a value, or an "),
        (["trainer.epohcs=3"], "trainer.epohcs: unknown key; did you mean trainer.epochs? valid keys of trainer:"),
        (["loss.temprature=8"], "loss.temprature: unknown key; did you mean loss.temperature? valid keys of loss:"),
        (["epochs=3"], "epochs: unknown key; did you mean trainer.epochs? valid keys: "),
        (["teacher=resnt20"], "teacher=resnt20: unknown option; did you mean teacher=resnet20? valid: airbench, "),
        (["teacher.checkpoint=/nonexistent/teacher.pt"], "teacher.checkpoint=/nonexistent/teacher.pt: file not found"),
        (["teacher.name=nosuchnet"], "teacher.name=nosuchnet: unknown model; valid:"),
        (["loss=nosuchloss"], "loss=nosuchloss: unknown option; valid:"),
        (["-m", "loss.alpha=0.5,2"], "loss.alpha=2: must be a number in [0, 1]"),
        (["trainer.batch_size=abc"], "trainer.batch_size=abc: must be an integer > 0"),
        (["trainer.batch_size=-8"], "trainer.batch_size=-8: must be an integer > 0"),
        (
            ["trainer.devices=3", "trainer.batch_size=128"],
            "trainer.batch_size=128: must be a multiple of the 3 data-parallel workers",
        ),
        (["cache.views=-1"], "cache.views=-1: must be an integer >= 0"),
        (
            ["dataset=imagefolder", "dataset.augment.kind=mixup"],
            "dataset.augment.kind=mixup: valid: pad_crop, random_resized_crop",
        ),
        (["cache.fill=sometimes"], "cache.fill=sometimes: must be first_use or pass"),
        (["cache.topk=10"], "cache.topk=10: must be below dataset.num_classes=10 (null keeps every logit)"),
        (["teacher.precision=fp8"], "teacher.precision=fp8: must be fp32, bf16 or fp16 (or null)"),
        (["teacher.label_smoothing=1"], "teacher.label_smoothing=1: must be a number in [0, 1), e.g. 0.1"),
        (["+teacher.augment.cutout=-8"], "teacher.augment.cutout=-8: must be an integer >= 0"),
        (["+dataset.augment.cutout=1.5"], "dataset.augment.cutout=1.5: must be an integer >= 0"),
        (["optim=nosuch"], "optim=nosuch: unknown option; valid: "),
        (["optim.name=foo"], "optim.name=foo: must be sgd, adamw or adam"),
        (["optim.momentum=-1"], "optim.momentum=-1: must be a number in [0, 1)"),
        (["optim.warmup_epochs=abc"], "optim.warmup_epochs=abc: must be an integer >= 0"),
        (["optim.milestones=[a]"], "optim.milestones=['a']: must be a list of epochs (integers >= 0), e.g. [150, "),
        (["optim.nesterov=1"], "optim.nesterov=1: must be true or false"),
        (["+teacher.optim.lr=-1"], "teacher.optim.lr=-1: must be a number > 0"),
        (["dataset=imagefolder"], "dataset.root is not set: give the folder holding <train_split>/<class>/<image>"),
        (
            ["trainer.device=cuda"] if not __import__("torch").cuda.is_available() else ["trainer.device=tpu"],
            "trainer.device=",
        ),
        (
            ["+loss.ce_weight={schedule: linear, start: 1, end: 0}"],
            "loss.ce_weight: KD weighs its CE term by 1 - loss.alpha; set loss.alpha instead",
        ),
        (
            ["loss=dkd", "loss.ce_weight={schedule: linear, start: 1, end: 0}"],
            "loss.ce_weight: cannot follow a schedule in loss 'dkd' (fixed when the method is built); give a number",
        ),
        (  # CRD draws its negatives by the nce_k it was built with: the log showed the schedule's value
            ["loss=crd", "loss.nce_k={schedule: linear, start: 10, end: 5}"],
            "loss.nce_k: cannot follow a schedule in loss 'crd' (fixed when the method is built); give a number",
        ),
        (  # read by AB's init stage alone, before the student stage that follows schedules
            ["loss=ab", "loss.margin={schedule: linear, start: 5, end: 1}"],
            "loss.margin: cannot follow a schedule in loss 'ab' (fixed when the method is built); give a number",
        ),
        (  # KDSVD's k counts singular vectors: a schedule's 2.5 failed mid-run
            ["loss=kdsvd", "loss.k={schedule: linear, start: 3, end: 1}"],
            "loss.k: a whole number in loss 'kdsvd', which a schedule would make fractional; give a number",
        ),
        (["loss=combo", "loss.terms.kd.alpha=1.5"], "loss.terms.kd.alpha=1.5: must be a number in [0, 1]"),
        (["sweep.metric=student.test_top1"], "sweep.metric=student.test_top1: a test-set metric cannot be optimised"),
        (["sweep.metric=student.top1"], "sweep.metric=student.top1: unknown metric; valid: MODEL.val_top1 or "),
        (
            ["-m", "sweep=optuna", "trainer.val_fraction=0"],
            "trainer.val_fraction=0: this sweeper maximises "
            "sweep.metric=student.val_top1, measured on a validation split",
        ),
        (["-m", "resume=outputs/some_run", "loss.temperature=2,3"], "resume=outputs/some_run: continues one run; to "),
        (["resume=outputs/no_such_run"], "resume=outputs/no_such_run: no such directory"),
        (["resume=outputs/a", "resume=outputs/b"], "resume=outputs/a resume=outputs/b: give one run directory"),
        (["resume=outputs/a", "resume=outputs/a/"], "resume=outputs/a/: no such directory"),  # one directory
        (["scheme=online", "scheme.temperature=0"], "scheme.temperature=0: must be a number > 0"),
        (["scheme=self", "scheme.generations=1"], "scheme.generations=1: must be an integer >= 2"),
        (["scheme=online", "scheme.peers=[resnet8]"], "scheme.peers=['resnet8']: give two or more peer models"),
        (["loss.layers.foo=1"], "loss.layers: unknown key; valid keys of loss: "),
        (
            ["loss=crd", "loss.feat_dim=64"],
            "loss.feat_dim: unknown key; valid keys of loss: ce_weight, embed_dim, layers, name, nce_k, nce_m, ",
        ),
        (["loss=dist", "loss.tau=abc"], "loss.tau=abc: must be a number"),
        (["loss=dkd", "loss.warmup=[1]"], "loss.warmup=[1]: must be a number"),
        (["loss=dkd", "loss.warmup=2.5"], "loss.warmup=2.5: must be an integer >= 0 (0: no warm-up)"),
        (["loss=combo", "loss.terms.kd.temperature=0"], "loss.terms.kd.temperature=0: must be a number > 0"),
        (["loss=combo", "loss.terms.kd.temperature=abc"], "loss.terms.kd.temperature=abc: must be a number"),
        (
            ["loss=combo", "loss.terms.kd.alpha={schedule: linear, start: 0.1, end: 0.9}"],
            "loss.terms.kd.alpha: a term of a combo takes numbers, not schedules",
        ),
        (["+loss.ce_weight=0.5"], "loss.ce_weight: KD weighs its CE term by 1 - loss.alpha; set loss.alpha instead"),
        (
            ["teacher.optim={lr: 0.1}"],
            "teacher.optim.lr: teacher.optim holds only the optim.* keys it overrides, and not this one yet: add it "
            "with +teacher.optim.lr=...",
        ),
        (
            ["experiment=hinton_mnist", "teacher.optim.momentum=0", "teacher.optim.nesterov=true"],
            "teacher.optim.momentum: teacher.optim holds only the optim.* keys it overrides, and not this one yet: "
            "add it with +teacher.optim.momentum=0",
        ),
        (
            ["teacher.optim.lrr=0.1"],
            "teacher.optim.lrr: unknown key; teacher.optim takes the keys of optim: gamma, grad_clip, lr, milestones, ",
        ),
        (
            ["teacher.augment.cutout=8"],
            "teacher.augment.cutout: teacher.augment holds only the dataset.augment.* keys it overrides, and not this "
            "one yet: add it with +teacher.augment.cutout=8",
        ),
        (
            ["loss=at", "loss.layers.teacher=[stage9]", "loss.layers.student=[stage3]"],
            "loss.layers.teacher[0]=stage9: unknown feature layer 'stage9' for CifarResNet; valid: logits, pre_logits, "
            "stage1, ",
        ),
        # a model option the model refuses, before the teacher trains (it used to cost the teacher stage)
        (["student=resnet9", "student.kwargs.width=0"], "student.kwargs.width=0: must be a positive channel count"),
        (["teacher=resnet9", "teacher.kwargs.width=-1"], "teacher.kwargs.width=-1: must be a positive channel count"),
        (
            ["loss=fitnet", "loss.layers.teacher=[stage1,stage2]", "loss.layers.student=[stage3]"],
            "loss.layers: 2 teacher and 1 student layers; give loss.layers.teacher=[...] and loss.layers.student=",
        ),
        (["loss=kd", "+loss.layers.teacher=[stage3]"], "loss.layers.teacher: loss 'kd' reads no teacher features"),
        (["scheme=online", "loss=dkd"], "loss=dkd: scheme=online trains its peers with deep mutual learning's own KL"),
        # a method left with nothing to train: its term trains an init stage, the student stage is CE alone
        (["loss=ab", "loss.ce_weight=0"], "loss.ce_weight=0: loss 'ab' trains the student with CE alone after its "),
        (
            ["loss=combo", "~loss.terms", "+loss.terms={fsp: {init_epochs: 1}}", "loss.ce_weight=0", "student=resnet8"],
            "loss.ce_weight=0: loss 'combo' trains the student with CE alone after its own stage",
        ),
        (
            ["loss=fsp", "student=resnet8", "loss.init_epochs=0"],
            "loss.init_epochs=0: must be an integer >= 1 (0 leaves",
        ),
        (["loss=ft", "loss.paraphraser_epochs=0"], "loss.paraphraser_epochs=0: must be an integer >= 1 (0 leaves the "),
        # a method that cannot join the scheme's models, before the teacher (or generation 1, or an assistant) trains
        (["loss=kdsvd"], "loss.layers: teacher stage1 [16,8,8] and student stage1 [8,8,8]: kdsvd needs equal teacher"),
        (["teacher=resnet9", "loss=ofd"], "loss.layers: ofd needs the teacher's pre-activation features but the "),
        (
            ["scheme=self", "loss=ab", "student=resnet9"],
            "student=resnet9 -> student=resnet9: loss.layers: ab needs the teacher's ",
        ),
        (
            ["scheme=assistant", "scheme.assistants=[resnet9]", "loss=ofd"],
            "scheme.assistants[0]=resnet9 -> student=mbv2_tiny: loss.layers: ofd needs the teacher's pre-activation",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(kdrun_here, tmp_path, args, expected):
    """In this process (the exit code and the stream are the same in a subprocess: test_a_user_sees_one_line)."""
    run_dir = tmp_path / "run"
    p = kdrun_here("train", *args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("kdrun: error: " + expected), lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    assert not run_dir.exists()  # nothing written


def test_a_user_sees_one_line(kdrun, tmp_path):
    """What the in-process cases above check, once through a real process: its exit code and its whole stderr."""
    run_dir = tmp_path / "run"
    p = kdrun("train", "loss.alpha=1.5", f"hydra.run.dir={run_dir}")
    assert (p.returncode, p.stderr, p.stdout) == (2, "kdrun: error: loss.alpha=1.5: must be a number in [0, 1]\n", "")
    assert not run_dir.exists()


def test_unknown_option_lists_valid_ones(kdrun, tmp_path):
    p = kdrun("train", "student=nosuchnet", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2
    assert "mbv2_tiny" in p.stderr and "resnet20" in p.stderr


def test_full_error_shows_traceback(kdrun, tmp_path):
    p = kdrun("train", "loss.alpha=1.5", f"hydra.run.dir={tmp_path / 'r'}", env={"HYDRA_FULL_ERROR": "1"})
    assert p.returncode != 0
    assert "Traceback" in p.stderr


def test_unknown_command(kdrun):
    p = kdrun("trian")
    assert p.returncode == 2
    assert p.stderr.strip() == "kdrun: error: unknown command 'trian'; valid: " + ", ".join(
        __import__("kdrun.cli", fromlist=["COMMANDS"]).COMMANDS
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["dataset=mnist", "dataset.root=/nonexistent/mnist"],
            "dataset.root=/nonexistent/mnist: mnist files not found: expected train-images-idx3-ubyte",
        ),
        (["dataset.num_classes=5"], "dataset.num_classes=5: the digits data has num_classes=10"),
    ],
)
def test_bad_data_exits_2_and_leaves_failed_marker(kdrun, tmp_path, args, expected):
    run_dir = tmp_path / "run"
    p = kdrun("train", "trainer=smoke", "store.enabled=false", *args, f"hydra.run.dir={run_dir}")
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("kdrun: error: " + expected), last
    assert "Traceback" not in p.stderr
    assert not (run_dir / "metrics.json").exists() and (run_dir / "FAILED").exists()


def test_a_run_that_fails_before_saving_a_checkpoint_leaves_no_empty_checkpoints_folder(kdrun, tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"PK\x03\x04 truncated")
    run_dir = tmp_path / "run"
    p = kdrun(
        "train",
        "trainer=smoke",
        "store.enabled=false",
        f"teacher.checkpoint={tmp_path / 'teacher.pt'}",
        f"hydra.run.dir={run_dir}",
    )
    assert p.returncode == 2 and "teacher.pt: unreadable or damaged" in p.stderr, p.stderr[-2000:]
    assert (run_dir / "FAILED").exists() and not (run_dir / "checkpoints").exists()


def test_imagefolder_with_missing_test_class(kdrun, tmp_path):
    from PIL import Image

    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat"])):
        for c in classes:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "data" / split / c / "0.png")
    p = kdrun(
        "train",
        "trainer=smoke",
        "store.enabled=false",
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'data'}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.image_size=8",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert p.returncode == 2
    assert "dog" in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


def test_labels_outside_class_range(monkeypatch):
    import torch
    from omegaconf import OmegaConf

    from kdrun.data import DATASETS, DataBundle, ImageSet
    from kdrun.errors import ConfigError
    from kdrun.run_data import load_dataset

    def broken(**_):
        images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
        return DataBundle(
            "broken",
            ImageSet(images, torch.tensor([0, 1, 2, 7])),
            ImageSet(images, torch.zeros(4).long()),
            ["a", "b", "c"],
            "broken",
        )

    monkeypatch.setitem(DATASETS._items, "broken", broken)
    with pytest.raises(ConfigError) as e:
        load_dataset(OmegaConf.create({"name": "broken"}))
    assert str(e.value) == "dataset=broken: train labels span [0, 7], outside [0, 3) for its 3 classes"


def test_disk_full_while_checkpointing_keeps_previous(tmp_path, monkeypatch):
    import errno

    import torch

    from kdrun.engine import atomic_save
    from kdrun.errors import KdrunError

    path = str(tmp_path / "student_last.pt")
    atomic_save({"epoch": 1}, path)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(KdrunError) as e:
        atomic_save({"epoch": 2}, path)
    assert str(e.value) == f"{path}: could not write (No space left on device); the previous version is kept"
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["student_last.pt"]  # no temporary file left


def test_unwritable_output_directory(kdrun, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = "/proc/kdrun-run" if os.geteuid() == 0 else str(locked / "run")  # root may write anywhere else
    p = kdrun("train", "trainer=smoke", f"hydra.run.dir={target}")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"kdrun: error: hydra.run.dir={target}: cannot create the output directory "
        f"({os.path.dirname(target)} is not writable); choose another with hydra.run.dir=PATH"
    )


def test_a_reader_that_has_gone_ends_the_command_quietly():
    """`kdrun models | head -0`: stdout is closed before kdrun writes; no traceback, exit 141 (128 + SIGPIPE)."""
    import subprocess

    from tests.conftest import KDRUN, WORKDIR

    p = subprocess.Popen([*KDRUN, "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=WORKDIR)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_damaged_run_files_are_one_line(kdrun, tmp_path):
    """A run's .hydra files edited into invalid YAML: export and resume name the file; report names a file given
    for a directory."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "student.pt").write_bytes(b"x")
    (run / ".hydra" / "config.yaml").write_text("a: [b\n")
    (run / ".hydra" / "overrides.yaml").write_text("- [a\n")
    for args, file in ((["export", str(run)], "config.yaml"), (["train", f"resume={run}"], "overrides.yaml")):
        p = kdrun(*args)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().startswith(f"kdrun: error: {run}/.hydra/{file}: cannot be read as YAML ("), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (run / "export").exists()
    p = kdrun("report", str(run / ".hydra" / "config.yaml"))
    assert p.returncode == 2 and ": not a directory; give a run directory" in p.stderr


def test_resume_of_overrides_that_are_no_list_is_one_line(kdrun_here, tmp_path):
    """A run's .hydra/overrides.yaml that parses but is not Hydra's list of overrides (edited by hand into a
    mapping, or emptied): resume names the file instead of reading the mapping's keys as overrides."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    for text in ("trainer.epochs: 3\n", ""):  # "": emptied (it used to advise the resume command just given)
        (run / ".hydra" / "overrides.yaml").write_text(text)
        p = kdrun_here("train", f"resume={run}")
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip() == (
            f"kdrun: error: resume={run}: {run}/.hydra/overrides.yaml is not a list of overrides; "
            "valid: a kdrun run directory"
        ), p.stderr


def test_unwritable_store_is_one_line_before_anything_runs(kdrun_here, tmp_path):
    """The store takes a lock file even to read an entry: an unwritable store.dir is refused up front, also when
    resuming a finished run (whose metrics.json a failure in the run would have replaced by a FAILED note)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    store = "/proc/kdrun-store" if os.geteuid() == 0 else str(locked / "store")  # root may write anywhere else
    want = (
        f"kdrun: error: store.dir={store}: cannot write the artifact store there ({os.path.dirname(store)} is not "
        "writable, and the store takes a lock file even to read an entry); give a writable store.dir=PATH, or "
        "store.enabled=false"
    )
    p = kdrun_here("train", "trainer=smoke", f"store.dir={store}", f"hydra.run.dir={tmp_path / 'run'}")
    assert (p.returncode, p.stderr.strip()) == (2, want)
    done = tmp_path / "done"
    (done / ".hydra").mkdir(parents=True)
    (done / ".hydra" / "overrides.yaml").write_text("- trainer=smoke\n")
    (done / "metrics.json").write_text('{"status": "complete"}')
    p = kdrun_here("train", f"resume={done}", f"store.dir={store}")
    assert (p.returncode, p.stderr.strip()) == (2, want)
    assert (done / "metrics.json").read_text() == '{"status": "complete"}' and not (done / "FAILED").exists()


def test_store_gc_on_a_store_it_cannot_write_is_one_line(kdrun_here, tmp_path, monkeypatch):
    """gc locks every entry it looks at, dry_run included: a read-only store is named, not a traceback."""
    store = tmp_path / "store"
    (store / "teacher").mkdir(parents=True)
    import kdrun.store_cli

    real = kdrun.store_cli.can_create_in
    monkeypatch.setattr(kdrun.store_cli, "can_create_in", lambda d: str(d) != str(store) and real(d))
    p = kdrun_here("store", "gc", f"dir={store}", f"runs={tmp_path}", "dry_run=true")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"kdrun: error: dir={store}: {store} is not writable, and gc takes each entry's lock file, also with "
        "dry_run=true; run it as a user (or on a mount) that can write to the store"
    )


def test_a_method_that_cannot_join_models_sized_by_the_data_is_refused_before_the_teacher_trains(kdrun, tmp_path):
    """An image folder whose class count the config leaves to the data (dataset.num_classes=null): the pair is
    checked once the data is read, still before any stage (no checkpoint, no teacher trained), with one line."""
    from tests.test_data_init import image_folder

    root = image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    p = kdrun(
        "train",
        "trainer=smoke",
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.image_size=16",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "loss=kdsvd",
        f"hydra.run.dir={run_dir}",
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert (
        p.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "kdrun: error: loss.layers: teacher stage1 [16,16,16] and student stage1 [8,16,16]: kdsvd needs equal"
        )
    ), p.stderr[-2000:]
    assert "teacher epoch" not in p.stderr and not list((run_dir / "checkpoints").glob("*.pt"))


def test_resume_into_another_directory_is_refused(kdrun_here, tmp_path):
    """resume=A hydra.run.dir=B ran A in place and never made B (the command recorded both)."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    p = kdrun_here("train", f"resume={run}", f"hydra.run.dir={tmp_path / 'b'}")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"kdrun: error: hydra.run.dir={tmp_path / 'b'}: resume={run} continues the run in its ")
    assert not (tmp_path / "b").exists()


def test_workers_a_launcher_started_say_a_refusal_once_and_need_their_run_folder(kdrun_here, tmp_path, monkeypatch):
    """Under torchrun every worker printed the same refusal (N lines for N workers), and workers given no
    hydra.run.dir each named their own time-stamped folder: two folders, a traceback."""
    for name, value in {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    p = kdrun_here("train", "trainer.epohcs=3", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2 and p.stderr == ""  # the machine's first worker says it
    monkeypatch.setenv("RANK", "2")  # the first worker of another machine: what it meets may be its machine's own
    monkeypatch.setenv("LOCAL_RANK", "0")
    p = kdrun_here("train", "trainer.epohcs=3", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2 and p.stderr.count("kdrun: error:") == 1
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a LOCAL_RANK of the user's own, no launcher's: the error is said
    p = kdrun_here("train", "trainer.epohcs=3", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2 and "trainer.epohcs" in p.stderr
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    p = kdrun_here("train", "trainer.epohcs=3", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2 and p.stderr.count("kdrun: error:") == 1 and "trainer.epohcs" in p.stderr
    p = kdrun_here("train", "trainer=smoke")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "kdrun: error: hydra.run.dir: 2 workers started by a launcher need it given (hydra.run.dir=DIR, or "
        "resume=DIR): each would name its own time-stamped folder"
    )
    p = kdrun_here("train", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'r'}")  # it was ignored
    assert p.returncode == 2 and "trainer.devices=2: a launcher (torchrun, SLURM) started 2 workers" in p.stderr


def test_kdrun_without_a_command_is_a_usage_error(kdrun_here):
    p = kdrun_here()
    assert p.returncode == 2 and p.stdout == "" and "kdrun train" in p.stderr
    p = kdrun_here("--help")
    assert p.returncode == 0 and "kdrun train" in p.stdout


def test_an_option_of_a_logger_not_selected_says_to_select_it(kdrun_here, tmp_path):
    p = kdrun_here("train", "logger.tensorboard.subdir=x", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "kdrun: error: logger.tensorboard.subdir: the tensorboard logger is not selected; add it to the list "
        "(e.g. logger=[csv,tensorboard])"
    )
    p = kdrun_here("train", "logger=[csv,mlflow]", "logger.mlflow.bogus=1", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2  # a selected tracker's unknown key: its valid keys
    assert p.stderr.startswith("kdrun: error: logger.mlflow.bogus: unknown key; valid keys of logger.mlflow: ")


@pytest.mark.parametrize("loss, key", [("fitnet", "loss.layers"), ("combo", "loss.terms.at.layers")])
def test_models_that_share_no_stage_name_are_told_their_layers(kdrun_here, tmp_path, loss, key):
    """The line named no layer either model has, and in a combo told to set loss.layers, which a combo refuses."""
    p = kdrun_here("train", "teacher=mlp", "student=mlp", f"loss={loss}", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2
    line = p.stderr.strip()
    assert line.startswith(f"kdrun: error: {key}: the models share no stage name; name the layers, {key}.teacher=[")
    assert f"{key}.student=[...] of " in line and "hidden1" in line and line.count("\n") == 0


@pytest.mark.parametrize("key", ["+trainer.epohcs=3", "+student.foo=1", "+teacher._target_=mymodels.net"])
def test_a_key_added_that_nothing_reads_is_refused(kdrun_here, tmp_path, key):
    """'+student._target_=...' ran to the end with the default student, the key ignored."""
    p = kdrun_here("train", key, f"hydra.run.dir={tmp_path / 'r'}")
    name = key[1:].split("=")[0]
    assert p.returncode == 2 and p.stderr.startswith(f"kdrun: error: {name}: unknown key, read by nothing; valid keys")
    assert not (tmp_path / "r").exists()
