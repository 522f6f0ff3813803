"""Data parallel on torch's DDP, on the CPU (gloo): N processes follow one process on the same global batch.

Covered: DDP gradients equal the full batch's; sharding gives every rank equal, non-empty batches; CRD's
memory banks stay equal across ranks; each rank binds its own device; end to end, 2 spawned workers and
2 torchrun "nodes" (c10d rendezvous on localhost) end with the weights of 1 process (deterministic).
"""

import csv
import gc
import os
import re
import socket
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from kdrun import distributed, runlock
from kdrun.errors import ConfigError, KdrunError


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _leave():
    """Tear down together: rank 0 hosts the TCP store, and a rank that destroys its group while another is
    still in a collective can abort gloo ("terminate called without an active exception"; seen once, in a
    full `make test`)."""
    dist.barrier()
    dist.destroy_process_group()


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batch(n=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _grad_worker(rank, world, port, out_dir):
    _join(rank, world, port)
    model = distributed.wrap(_mlp(), torch.device("cpu"))
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    x, y = _batch()
    idx = distributed.shard(torch.arange(len(y)), rank, world)
    torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
    torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, f"grads{rank}.pt"))
    _leave()


def test_ddp_gradients_equal_the_full_batch_gradient(tmp_path):
    mp.spawn(_grad_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    model = _mlp()
    x, y = _batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for rank in (0, 1):  # every rank holds the global batch's mean gradient
        got = torch.load(tmp_path / f"grads{rank}.pt")
        for p, gp in zip(model.parameters(), got, strict=True):
            torch.testing.assert_close(gp, p.grad, rtol=1e-5, atol=1e-5)


def _relation_losses() -> dict:
    """Methods whose loss relates the samples of a batch to each other, on (student, teacher) rows."""
    from kdrun.losses.base import Outputs
    from kdrun.losses.dist import DIST
    from kdrun.losses.pkt import PKT
    from kdrun.losses.rkd import RKD
    from kdrun.losses.sp import SP

    return {
        "sp": lambda s, t: SP().pair_loss(0, s, t, None),
        "rkd": lambda s, t: RKD().pair_loss(0, s, t, None),
        "pkt": lambda s, t: PKT().pair_loss(0, s, t, None),
        "dist": lambda s, t: DIST().forward(Outputs(s), Outputs(t), None)["dist"],
    }


def _relation_rows(n=8):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 5, generator=g), torch.randn(5, 6, generator=g), torch.randn(n, 6, generator=g)


def _relation_worker(rank, world, port, out_dir):
    _join(rank, world, port)
    x, w0, t = _relation_rows()
    mine = distributed.shard(torch.arange(len(x)), rank, world)
    out = {}
    for name, loss_of in _relation_losses().items():
        w = torch.nn.Parameter(w0.clone())
        loss = loss_of(x[mine] @ w, t[mine])
        loss.backward()
        dist.all_reduce(w.grad)  # DDP: the mean of the ranks' gradients
        out[name] = (loss.detach(), w.grad / world)
    torch.save(out, os.path.join(out_dir, f"relations{rank}.pt"))
    _leave()


def test_losses_over_a_batchs_relations_see_the_whole_global_batch(tmp_path):
    """SP, RKD, PKT and DIST relate the samples of a batch: with 2 workers each rank computes the loss of the whole
    global batch (not of its shard, which for SP doubled the loss), and the gradient is one process's."""
    mp.spawn(_relation_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    x, w0, t = _relation_rows()
    for name, loss_of in _relation_losses().items():
        w = torch.nn.Parameter(w0.clone())
        loss = loss_of(x @ w, t)
        loss.backward()
        for rank in (0, 1):
            got_loss, got_grad = torch.load(tmp_path / f"relations{rank}.pt")[name]
            torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(got_grad, w.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("n,world", [(10, 2), (7, 2), (1, 2), (5, 4), (3, 3), (64, 1)])
def test_every_rank_gets_an_equal_non_empty_share(n, world):
    idx = torch.arange(100, 100 + n)
    shares = [distributed.shard(idx, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-n // world) > 0
    assert set(torch.cat(shares).tolist()) == set(idx.tolist())  # padding repeats samples, loses none


def _crd_worker(rank, world, port, out_dir):
    from kdrun.losses.base import StepContext
    from kdrun.losses.crd import CRD

    _join(rank, world, port)
    torch.manual_seed(0)
    crd = CRD(nce_k=4, layers={"teacher": "pre_logits", "student": "pre_logits"})
    crd.build([torch.Size([1, 6])], [torch.Size([1, 5])], 16)
    g = torch.Generator().manual_seed(3)
    fs, ft, index = torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g), torch.randperm(16, generator=g)[:8]
    mine = distributed.shard(torch.arange(8), rank, world)
    crd.pair_loss(0, fs[mine], ft[mine], StepContext(torch.zeros(len(mine), dtype=torch.long), index[mine], 0, 1, 16))
    torch.save({"s": crd.memory_s, "t": crd.memory_t, "z": crd.z}, os.path.join(out_dir, f"bank{rank}.pt"))
    _leave()


def _shared_cache(rank, out_dir):
    """A 12-image cache file every worker writes: rank 0 creates it, the others attach."""
    from kdrun.cache import CacheShape, LogitCache

    path, shape = os.path.join(out_dir, "t.kdlc"), CacheShape(12, 0, 3, None)
    if rank == 0:
        LogitCache.open(path, shape, "k")
    dist.barrier()
    return LogitCache.attach(path, shape, "k")


def _fill_worker(rank, world, port, out_dir):
    import time

    from kdrun.cache import fill_pass
    from tests.test_engine import tiny_loader

    _join(rank, world, port)
    cache = _shared_cache(rank, out_dir)
    if rank == 1:
        time.sleep(1.0)  # rank 0 is writing its first batches by now
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    fill_pass(cache, teacher, tiny_loader(n=12, batch=2), batch_size=2)
    _leave()


def test_a_cache_filled_by_two_workers_in_one_pass_is_complete(tmp_path):
    """The rows to fill are rank 0's list, read before any worker writes: a worker that read its own list after
    another had begun split the rows otherwise, and left some to no one."""
    from kdrun.cache import CacheShape, LogitCache

    mp.spawn(_fill_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    cache = LogitCache.attach(str(tmp_path / "t.kdlc"), CacheShape(12, 0, 3, None), "k")
    assert cache.filled == 12 and cache.complete


def test_crd_memory_banks_gather_every_ranks_updates(tmp_path):
    """Every rank holds the same banks, and the same normalising constants Z (set from the first global batch)."""
    mp.spawn(_crd_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    banks = [torch.load(tmp_path / f"bank{r}.pt") for r in (0, 1)]
    assert (banks[0]["z"] > 0).all() and torch.equal(banks[0]["z"], banks[1]["z"])
    from kdrun.losses.base import StepContext
    from kdrun.losses.crd import CRD

    torch.manual_seed(0)
    crd = CRD(nce_k=4, layers={"teacher": "pre_logits", "student": "pre_logits"})
    crd.build([torch.Size([1, 6])], [torch.Size([1, 5])], 16)
    g = torch.Generator().manual_seed(3)
    fs, ft, index = torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g), torch.randperm(16, generator=g)[:8]
    crd.pair_loss(0, fs, ft, StepContext(torch.zeros(8, dtype=torch.long), index, 0, 1, 16))
    for b in banks:
        torch.testing.assert_close(b["s"], crd.memory_s)
        torch.testing.assert_close(b["t"], crd.memory_t)


def test_each_rank_binds_its_local_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed, "world", lambda: (3, 4))
    monkeypatch.setenv("LOCAL_RANK", "1")  # rank 3 of 4 is the second process of its node
    assert distributed.bind_device("auto") == torch.device("cuda:1")
    assert distributed.bind_device("cuda") == torch.device("cuda:1")
    assert chosen == [1, 1]
    assert distributed.bind_device("cpu") == torch.device("cpu") and chosen == [1, 1]
    assert distributed.backend_for("cuda") == "nccl" and distributed.backend_for("cpu") == "gloo"
    monkeypatch.setattr(distributed, "world", lambda: (0, 1))
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.bind_device("auto") == torch.device("cuda") and chosen[-1] == 0


def _lock_worker(rank, world, port, store_dir, out_dir):
    from datetime import timedelta

    from kdrun.store import Store

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=3)
    )
    store, cpu = Store(store_dir), torch.device("cpu")
    locks = (lambda: store.lock("teacher", "k"), lambda: store.try_lock("teacher", "k"))
    with distributed.lock_on_main(*locks, cpu, poll_s=0.2):
        got = distributed.shared(lambda: "rank 0 holds the lock")
    open(os.path.join(out_dir, f"lock{rank}"), "w").write(got)
    _leave()


def test_workers_wait_together_for_a_store_lock_held_longer_than_the_group_timeout(tmp_path):
    """Another job holds the teacher's store lock (it is training that teacher) for longer than the process group's
    timeout: rank 0 used to block on the file lock while the other workers timed out in their broadcast."""
    import time

    from kdrun.store import Store

    with Store(str(tmp_path / "store")).lock("teacher", "k"):
        ctx = mp.spawn(_lock_worker, args=(2, _port(), str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False)
        time.sleep(6)  # twice the workers' collective timeout
    ctx.join()
    assert [(tmp_path / f"lock{r}").read_text() for r in (0, 1)] == ["rank 0 holds the lock"] * 2


# ---------------------------------------------------------------- end to end (tiny MLPs on digits)

ARGS = [
    "teacher=mlp",
    "student=mlp",
    "teacher.kwargs.hidden=[48]",
    "student.kwargs.hidden=[24]",
    "trainer.teacher_epochs=2",
    "trainer.epochs=2",
    "trainer.batch_size=96",
    "trainer.deterministic=true",
    "trainer.latency=false",
    "store.enabled=false",
    "baseline=false",
    "optim.warmup_epochs=1",
    "optim.grad_clip=5",
    "dataset.student_fraction=1.0",
]  # 1438 = 14 x 96 + 94: every batch splits evenly


def weights(run_dir) -> dict:
    return {
        stage: torch.load(run_dir / "checkpoints" / f"{stage}.pt", weights_only=True)["model"]
        for stage in ("teacher", "student")
    }


def assert_same_weights(got: dict, want: dict) -> None:
    for stage, state in want.items():
        for k, v in state.items():
            torch.testing.assert_close(got[stage][k], v, rtol=1e-4, atol=2e-5, msg=f"{stage} {k}")


@pytest.fixture(scope="module")
def one_process_dir(tmp_path_factory):
    from tests.conftest import run_kdrun

    run_dir = tmp_path_factory.mktemp("ddp") / "one"
    p = run_kdrun("train", *ARGS, f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_process(one_process_dir):
    return weights(one_process_dir)


def loss_rows(run_dir, stage="student") -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((run_dir / f"metrics_{stage}.csv").open())]


def test_two_workers_end_with_the_weights_of_one_process(kdrun, tmp_path, one_process):
    run_dir = tmp_path / "two"
    p = kdrun("train", *ARGS, "trainer.devices=2", f"hydra.run.dir={run_dir}", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "data parallel: 2 workers (gloo)" in p.stderr
    assert (run_dir / "metrics.json").exists()
    assert_same_weights(weights(run_dir), one_process)


def test_two_workers_stop_together_for_a_requeue_and_resume(kdrun, tmp_path, one_process, one_process_dir):
    """SIGTERM (SLURM signals every task of a preempted job): the workers agree on a stop every STOP_POLL_STEPS
    steps, not every step (each check is a collective, and a host sync on GPUs), save one checkpoint and exit
    75; the same command resumes and ends with the weights of one process. Meanwhile logit rows in both
    workers' shares of the cache were damaged on disk: each worker checks its share, and all of them are
    computed again."""
    import numpy as np

    from kdrun.cache import HEADER_BYTES, CacheShape, read_header
    from kdrun.engine import STOP_POLL_STEPS
    from kdrun.preempt import EXIT_PREEMPTED

    run_dir = tmp_path / "two"
    args = ["train", *ARGS, "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    p = kdrun(*args, env={"KDRUN_KILL_AT": "student:3:TERM"}, timeout=600)
    assert p.returncode == EXIT_PREEMPTED, p.stderr[-3000:]
    assert f"student: stopped by SIGTERM at epoch 1, step {STOP_POLL_STEPS}; checkpoint saved" in p.stderr
    assert p.stderr.strip().endswith(f"kdrun train resume={run_dir} continues it"), p.stderr[-1000:]
    assert torch.load(run_dir / "checkpoints" / "student_last.pt", weights_only=False)["step"] == STOP_POLL_STEPS
    cache = run_dir / "teacher_logits.kdlc"
    h = read_header(str(cache))
    shape = CacheShape(h["samples"], h["views"], h["classes"], h["topk"])
    flags = np.fromfile(cache, np.uint8, shape.rows, offset=HEADER_BYTES)
    filled = np.flatnonzero(flags)
    half = shape.rows // 2
    bad = [*filled[filled < half][:3], *filled[filled >= half][-4:]]  # rank 0's share, then rank 1's
    with open(cache, "r+b") as f:
        for pos in bad:
            f.seek(shape.data_offset + int(pos) * shape.row_bytes)
            f.write(b"\x00\x5b" * (shape.row_bytes // 2))  # fp16 224.0: a confident, wrong teacher
    p = kdrun(*args, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "student: resuming from" in p.stderr
    assert f"7 of {len(filled)} filled rows fail their checksum" in p.stderr, p.stderr[-3000:]
    assert_same_weights(weights(run_dir), one_process)
    # the interrupted epoch's loss sums both workers' steps before the stop (not rank 0's alone) with those after
    assert loss_rows(run_dir) == pytest.approx(loss_rows(one_process_dir), rel=1e-4)


def test_a_sigterm_sent_to_the_launching_process_alone_stops_every_worker_with_a_checkpoint(tmp_path):
    """``kill PID``, ``timeout`` or a container's stop signal only the process the user started; with
    trainer.devices=2 it passes the SIGTERM on, and the workers stop together as under SLURM (exit 75)."""
    import signal
    import time

    from tests.conftest import KDRUN, SMOKE_RUN, WORKDIR

    run_dir = tmp_path / "run"
    args = [*SMOKE_RUN, "trainer.latency=false", "baseline=false", "trainer.epochs=300", "trainer.devices=2"]
    log = open(tmp_path / "stderr", "w+")
    p = subprocess.Popen([*KDRUN, "train", *args, f"hydra.run.dir={run_dir}"], cwd=WORKDIR, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while "student epoch=2 " not in (tmp_path / "stderr").read_text():  # the student stage is under way
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)  # to the launching process alone, not its group
        assert p.wait(timeout=120) == 75, (tmp_path / "stderr").read_text()[-3000:]
    finally:
        p.kill()
        log.close()
    err = (tmp_path / "stderr").read_text()
    assert "student: stopped by SIGTERM at epoch" in err and "checkpoint saved" in err, err[-3000:]
    assert torch.load(run_dir / "checkpoints" / "student_last.pt", weights_only=False)["epoch"] < 300


def _crash_on_rank_1(cfg, run_dir):
    if dist.get_rank() == 1:
        raise RuntimeError("injected on rank 1")
    dist.barrier()  # rank 0 waits in a collective, which fails once rank 1 is gone
    return {}


def _no_setup(rank, run_dir):
    pass


def test_a_worker_crash_is_reported_with_its_own_traceback_not_a_knock_on_error(tmp_path):
    """Rank 1 raises; rank 0 then fails in its next collective ("Connection closed by peer"). The error raised (and
    written to FAILED) is rank 1's, with its traceback."""
    with pytest.raises(distributed.WorkerFailed) as e:
        distributed.launch(2, "cpu", _crash_on_rank_1, None, str(tmp_path), _no_setup)
    assert str(e.value).startswith("worker 1 of 2 failed:\nTraceback (most recent call last):"), str(e.value)
    assert str(e.value).endswith("RuntimeError: injected on rank 1"), str(e.value)


def _setup_fails_on_rank_1(rank, run_dir):
    if rank == 1:
        raise RuntimeError("injected in rank 1's set-up")


def test_a_worker_that_fails_before_joining_the_group_is_reported_with_its_traceback(tmp_path):
    """Rank 1 fails setting up (its logging, its device) and never joins; rank 0 waits in the group's rendezvous,
    where only a signal ends it (after WORKER_GRACE_S, not torch's 30 s). The error is rank 1's, as in a run."""
    with pytest.raises(distributed.WorkerFailed) as e:
        distributed.launch(2, "cpu", _crash_on_rank_1, None, str(tmp_path), _setup_fails_on_rank_1)
    assert str(e.value).startswith("worker 1 of 2 failed:\nTraceback (most recent call last):"), str(e.value)
    assert str(e.value).endswith("RuntimeError: injected in rank 1's set-up"), str(e.value)


class _Held:
    """Stands for a module holding the group (a DDP model): writes, when freed, whether the group was still up."""

    def __init__(self, path):
        self.path = path

    def __del__(self):
        with open(self.path, "w") as f:
            f.write(f"freed with the group {'up' if dist.is_initialized() else 'destroyed'}")


def _leave_a_cycle(cfg, run_dir):
    gc.disable()
    cycle: list = [_Held(os.path.join(run_dir, f"held{dist.get_rank()}.txt"))]
    cycle.append(cycle)  # reachable by nothing, freed only by a collection
    return {"done": True}


def test_a_launched_worker_frees_what_its_run_left_in_cycles_before_the_group_closes(tmp_path):
    """A DDP model left in a reference cycle holds the gloo group; freed at interpreter exit instead, after
    destroy_process_group, gloo can abort the worker (SIGABRT), and a run that finished would read as failed."""
    assert distributed.launch(2, "cpu", _leave_a_cycle, None, str(tmp_path), _no_setup) == {"done": True}
    assert [(tmp_path / f"held{r}.txt").read_text() for r in (0, 1)] == ["freed with the group up"] * 2


def _joined_from_env(rank, world, port, out_dir):
    """A worker as torchrun starts one: the group from the environment, left for the process's exit to close."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed.init_from_env("cpu")
    gc.disable()
    cycle: list = [_Held(os.path.join(out_dir, f"held{rank}.txt"))]
    cycle.append(cycle)


def test_a_worker_joined_from_the_environment_closes_its_group_at_exit(tmp_path):
    """Under torchrun or SLURM the group serves every job of the process (a sweep): it is closed at exit, after what
    the run left in cycles is freed, not by the interpreter's teardown (where gloo can abort)."""
    mp.spawn(_joined_from_env, args=(2, _port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"held{r}.txt").read_text() for r in (0, 1)] == ["freed with the group up"] * 2


def test_two_torchrun_nodes_end_with_the_weights_of_one_process(tmp_path, one_process):
    """``torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d``: two "nodes" on localhost."""
    from tests.conftest import WORKDIR

    run_dir = tmp_path / "nodes"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_port()}",
        "--rdzv-id=kdrun-test",
        "-m",
        "kdrun.cli",
        "train",
        *ARGS,
        f"hydra.run.dir={run_dir}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR",)}
    nodes = [
        subprocess.Popen(cmd, cwd=WORKDIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[1][-2000:] for o in outs)
    assert (run_dir / "metrics.json").exists()
    assert_same_weights(weights(run_dir), one_process)
    assert (run_dir / "train.log").read_text().count(" teacher epoch=1 ") == 1  # rank 0's lines alone


SLURM_TASK = {  # a SLURM job's fourth task, on its second node
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_ID": "42",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SUBMITIT_EXECUTOR": "slurm",
}
# sweep=slurm_local with tasks_per_node=2: submitit's local executor describes its tasks in variables of its own
# (no SLURM_NTASKS); its tasks used to run as separate whole pipelines racing in one run directory
LOCAL_TASK = {
    "SUBMITIT_EXECUTOR": "local",
    "SUBMITIT_LOCAL_NTASKS": "2",
    "SUBMITIT_LOCAL_GLOBALID": "1",
    "SUBMITIT_LOCAL_LOCALID": "1",
    "SUBMITIT_LOCAL_JOB_ID": "1234",
    "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
    "SUBMITIT_LOCAL_NODEID": "0",
}


@pytest.mark.parametrize(
    "env, want",
    [
        (SLURM_TASK, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01"}),
        (LOCAL_TASK, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": socket.gethostname()}),
    ],
    ids=["slurm", "submitit-local"],
)
def test_a_slurm_task_joins_the_group_its_environment_describes(monkeypatch, env, want):
    """SLURM (submitit launcher, several tasks): rank, world, local rank and master come from its environment."""
    pytest.importorskip("submitit")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with mock.patch.dict(os.environ):  # _slurm_env exports RANK, WORLD_SIZE, ...: none may leak into later tests
        distributed._slurm_env()
        exported = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    assert exported == want
    assert "WORLD_SIZE" not in os.environ


@pytest.mark.parametrize("env", [SLURM_TASK, LOCAL_TASK], ids=["slurm", "submitit-local"])
def test_a_batch_the_slurm_tasks_cannot_share_equally_is_refused(monkeypatch, env):
    """The batch-size check ran before the SLURM bridge set WORLD_SIZE, so it counted one worker for a job's
    tasks: with 4 tasks a batch of 5 was padded with repeated images."""
    from kdrun.cli import compose
    from kdrun.config import validate

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SUBMITIT_LOCAL_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    tasks = int(env.get("SLURM_NTASKS") or env["SUBMITIT_LOCAL_NTASKS"])
    validate(compose([f"trainer.batch_size={4 * tasks}"]))
    with pytest.raises(ConfigError, match=rf"trainer.batch_size=5: must be a multiple of the {tasks} data-parallel"):
        validate(compose(["trainer.batch_size=5"]))


def test_sync_bn_on_cpus_is_refused_before_anything_runs(kdrun, tmp_path):
    run_dir = tmp_path / "run"
    p = kdrun("train", "trainer.sync_bn=true", "trainer.device=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "kdrun: error: trainer.sync_bn=true: SyncBatchNorm needs CUDA GPUs; leave it false on CPUs"
    ]
    assert not run_dir.exists()


def test_two_workers_run_a_method_with_an_initialisation_stage(kdrun, tmp_path):
    """AB's initialisation stage trains the student's features, so its classifier gets no gradient there, and
    its adapters (the teacher is 4x wider) serve that stage alone: DDP must wait for neither."""
    run_dir = tmp_path / "run"
    args = ["trainer=smoke", "teacher=resnet8x4", "student=resnet8", "loss=ab", "loss.init_epochs=1"]
    p = kdrun("train", *args, "trainer.devices=2", "store.enabled=false", "baseline=false", f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "checkpoints" / "student_init_last.pt").is_file() and (run_dir / "metrics.json").is_file()


def test_every_worker_fills_the_logit_cache_with_the_teacher_rank_0_saved(kdrun, tmp_path):
    """Each worker keeps BatchNorm statistics of its own shards while a stage trains; at the end every worker takes
    rank 0's, so the rows a second worker writes into the logit cache are the saved teacher's logits too."""
    from omegaconf import OmegaConf

    from kdrun.cache import CacheShape, LogitCache, read_header
    from kdrun.run_data import RunData
    from kdrun.stages import StageRunner
    from kdrun.weights import load_teacher, model_identity

    run = tmp_path / "run"
    args = ["trainer=smoke", "trainer.teacher_epochs=3", "dataset.augment.crop_pad=1", "baseline=false"]
    p = kdrun("train", *args, "trainer.devices=2", "store.enabled=false", f"hydra.run.dir={run}", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    data = RunData(cfg, torch.device("cpu"))
    teacher = StageRunner(cfg, data, str(tmp_path / "scratch"), ("x", "x")).build("teacher", cfg.teacher)
    load_teacher(str(run / "checkpoints" / "teacher.pt"), teacher, model_identity(cfg.teacher, data.data))
    header = read_header(str(run / "teacher_logits.kdlc"))
    shape = CacheShape(header["samples"], header["views"], header["classes"], header["topk"])
    cache = LogitCache.attach(str(run / "teacher_logits.kdlc"), shape, header["key"])
    n, views = len(data.student_set), shape.views
    index, view = torch.arange(n).repeat(views), torch.arange(views).repeat_interleave(n)
    cached, filled = cache.lookup(index, view)
    loader = data.train_loader(views, data.student_set)
    with torch.no_grad():
        want = torch.cat([teacher.eval()(b.x).float() for b in loader.batches(index, view, 64)]).half().float()
    assert filled.sum() == n  # one epoch: one view of each image, half of them from each worker
    metrics = __import__("json").loads((run / "metrics.json").read_text())
    # the rows both workers' teachers computed (not rank 0's alone, about half): 143 images in batches of 128 and
    # 15, the 15 padded to 16 so that each worker has 8; the padding's image is computed a second time unless the
    # other worker's row for it is already written when it looks (a race either way)
    assert n == 143 and metrics["stages"]["cache"]["teacher_rows"] in (143, 144)
    torch.testing.assert_close(cached[filled], want[filled], rtol=0, atol=0)


def _join_briefly(rank, world, port):
    """A group whose collectives give up after 60 s: a worker left waiting fails the test instead of hanging it."""
    from datetime import timedelta

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )


def _outcome(out_dir, rank, fn):
    """Run ``fn()``; write what it returned or raised to ``{out_dir}/outcome{rank}.txt``."""
    try:
        got = f"returned {fn()!r}"
    except KdrunError as e:
        got = f"raised {type(e).__name__} {e}"
    with open(os.path.join(out_dir, f"outcome{rank}.txt"), "w") as f:
        f.write(got)


def _outcomes(out_dir, world=2):
    return [open(os.path.join(out_dir, f"outcome{r}.txt")).read() for r in range(world)]


def _agree_worker(rank, world, port, out_dir):
    _join_briefly(rank, world, port)
    first = distributed.agree(rank == 1, torch.device("cpu"))  # a stop asked by one worker is every worker's
    if rank == 1:
        distributed.defer(ConfigError("cache: rank 1's logit does not fit"))
        distributed.defer(KdrunError("a consequence of the first"))  # the first error is the one raised
    _outcome(out_dir, rank, lambda: (first, distributed.agree(False, torch.device("cpu"))))
    after = distributed.agree(False, torch.device("cpu"))  # raised once: the workers go on together
    assert after is False
    _leave()


def test_an_error_one_worker_defers_is_raised_by_every_worker_at_their_next_agreement(tmp_path):
    mp.spawn(_agree_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    assert _outcomes(str(tmp_path)) == ["raised ConfigError cache: rank 1's logit does not fit"] * 2


def _shared_worker(rank, world, port, out_dir):
    _join_briefly(rank, world, port)

    def lookup():  # run by rank 0 alone (e.g. hashing the image files): its error is every worker's
        raise ConfigError(f"data: a file rank {dist.get_rank()} could not read")

    _outcome(out_dir, rank, lambda: distributed.shared(lookup))
    assert distributed.shared(lambda: {"rank": dist.get_rank()}) == {"rank": 0}
    _leave()


def test_an_error_rank_0_meets_computing_for_every_worker_is_raised_by_every_worker(tmp_path):
    mp.spawn(_shared_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    assert _outcomes(str(tmp_path)) == ["raised ConfigError data: a file rank 0 could not read"] * 2


class _Overflows(torch.nn.Module):
    """A teacher whose logits fp16 cannot hold on rank 1 only."""

    def forward(self, x):
        scale = 1e6 if dist.get_rank() == 1 else 1.0
        return x.flatten(1)[:, :3] * scale


def _fill_overflow_worker(rank, world, port, out_dir):
    from kdrun.cache import fill_pass
    from tests.test_engine import tiny_loader

    _join_briefly(rank, world, port)
    cache = _shared_cache(rank, out_dir)
    _outcome(out_dir, rank, lambda: fill_pass(cache, _Overflows(), tiny_loader(n=12, batch=2), batch_size=2) and None)
    _leave()


def test_a_logit_the_cache_cannot_hold_on_one_worker_ends_every_worker_of_the_fill_pass(tmp_path):
    """Rank 1's teacher logits overflow fp16: before, rank 1 raised alone and rank 0 went on to wait at the pass's
    barrier (under a bare srun until the group timed out); now both raise the cache's message."""
    mp.spawn(_fill_overflow_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    outcomes = _outcomes(str(tmp_path))
    assert outcomes[0] == outcomes[1], outcomes
    assert re.match(r"raised KdrunError cache: a teacher logit of magnitude [\d.]+e\+0[56] does not fit", outcomes[0])


def _stage_defer_worker(rank, world, port, out_dir):
    from kdrun.engine import train_stage
    from tests.test_engine import Linear, optim, tiny_loader

    _join_briefly(rank, world, port)
    gc.disable()  # what the raised error keeps alive stays alive, as at interpreter exit
    steps = []

    def objective(net, batch, epoch):
        steps.append(len(steps) + 1)
        if rank == 1 and len(steps) == 2:  # e.g. the distiller meeting a logit the cache cannot hold
            distributed.defer(KdrunError("cache: rank 1 failed at step 2"))
        return {"ce": ((net(batch.x) - batch.y.float()) ** 2).mean()}

    run = lambda: train_stage(  # noqa: E731
        "s", Linear(), objective, tiny_loader(n=48, batch=2), epochs=2, optim_cfg=optim(lr=0.01),
        run_dir=out_dir, checkpoint_every_steps=4,
    )  # fmt: skip
    _outcome(out_dir, rank, lambda: run() and None)
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    with open(os.path.join(out_dir, f"steps{rank}.txt"), "w") as f:
        f.write(f"{len(steps)} steps, {alive} DDP alive")
    gc.enable()
    _leave()


def test_an_error_one_worker_meets_mid_stage_ends_every_worker_before_the_next_checkpoint(tmp_path):
    """...and nothing of the stage outlives the error: the raised error once held the frame that raised it, a
    cycle that kept the stage's DDP model (and the gloo group it holds) alive until interpreter exit, where gloo
    could abort the worker (SIGABRT, about 1 run in 30 on 2 busy cores)."""
    mp.spawn(_stage_defer_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    assert _outcomes(str(tmp_path)) == ["raised KdrunError cache: rank 1 failed at step 2"] * 2
    steps = [open(tmp_path / f"steps{r}.txt").read() for r in (0, 1)]
    assert steps == ["4 steps, 0 DDP alive"] * 2  # the first agreement: step 4
    assert not (tmp_path / "checkpoints" / "s_last.pt").exists()  # its checkpoint never written


def _images_one_unreadable(out_dir, n=12, bad=5):
    """``n`` 2x2 grey PNGs in ``out_dir``; file ``bad`` is not an image (e.g. a download cut short)."""
    from PIL import Image

    files = [os.path.join(out_dir, f"{i}.png") for i in range(n)]
    for i, f in enumerate(files):
        if i == bad:
            open(f, "wb").write(b"not an image")
        else:
            Image.new("L", (2, 2), 10 * i).save(f)
    return files


def _stream(files, rank, world, batch=4):
    from kdrun.data import FileSet
    from kdrun.data.loader import Normalize
    from kdrun.data.stream import StreamLoader

    data = FileSet(files, torch.arange(len(files)) % 2, 2, 1)
    norm = Normalize([0.5], [0.5], 1, "cpu")
    return StreamLoader(data, batch, norm, shuffle=False, num_workers=0, shard=(rank, world))


def _stream_stage_worker(rank, world, port, out_dir):
    from kdrun.engine import train_stage
    from tests.test_engine import Linear, optim

    _join_briefly(rank, world, port)
    files = [os.path.join(out_dir, f"{i}.png") for i in range(12)]
    run = lambda: train_stage(  # noqa: E731
        "s", Linear(), lambda net, b, e: {"ce": ((net(b.x) - b.y.float()) ** 2).mean()}, _stream(files, rank, world),
        epochs=1, optim_cfg=optim(lr=0.01), run_dir=out_dir,
    )  # fmt: skip
    _outcome(out_dir, rank, lambda: run() and None)
    _leave()


def test_an_image_one_worker_cannot_decode_ends_every_worker_with_its_one_line(tmp_path):
    """Streamed, image 5 falls to rank 1 alone: before, rank 1 raised alone and rank 0 waited in the next gradient
    all-reduce (under torchrun or a bare srun, until the group timed out). Now both raise the file's one line
    at the epoch's end, and no checkpoint of that epoch is written."""
    files = _images_one_unreadable(str(tmp_path))
    assert distributed.shard(torch.arange(4, 8), 1, 2).tolist() == [5, 7]  # rank 1's share of the second batch
    mp.spawn(_stream_stage_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    outcomes = _outcomes(str(tmp_path))
    assert outcomes[0] == outcomes[1], outcomes
    assert (
        outcomes[0].startswith(f"raised UnreadableImage {files[5]}: not a readable image (") and "\n" not in outcomes[0]
    )
    assert not (tmp_path / "checkpoints" / "s_last.pt").exists()


def _stream_fill_worker(rank, world, port, out_dir):
    from kdrun.cache import fill_pass

    _join_briefly(rank, world, port)
    cache = _shared_cache(rank, out_dir)
    files = [os.path.join(out_dir, f"{i}.png") for i in range(12)]
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    _outcome(out_dir, rank, lambda: fill_pass(cache, teacher, _stream(files, rank, world), batch_size=2) and None)
    _leave()


def test_an_image_one_worker_cannot_decode_ends_the_fill_pass_of_every_worker_and_is_not_cached(tmp_path):
    """The pass splits the 12 missing rows into jobs of 2 images: rank 1 fills rows 2-3, 6-7 and 10-11, and cannot
    decode image 3. Both workers raise the file's one line; no logit rank 1 computed from the zeros standing in
    for image 3 (or after it) is stored."""
    from kdrun.cache import CacheShape, LogitCache

    files = _images_one_unreadable(str(tmp_path), bad=3)
    mp.spawn(_stream_fill_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    outcomes = _outcomes(str(tmp_path))
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith(f"raised UnreadableImage {files[3]}: not a readable image (")
    cache = LogitCache.attach(str(tmp_path / "t.kdlc"), CacheShape(12, 0, 3, None), "k")
    assert cache.missing().tolist() == [2, 3, 6, 7, 10, 11]  # rank 0's rows all filled; rank 1's none


def _run_lock_worker(rank, world, port, run_dir, out_dir):
    import contextlib

    from kdrun import runlock

    _join_briefly(rank, world, port)
    with contextlib.ExitStack() as stack:
        _outcome(out_dir, rank, lambda: runlock.hold_for_group(stack, run_dir))
        open(os.path.join(out_dir, f"state{rank}"), "w").write(str(runlock.state(run_dir)))
        dist.barrier()  # rank 0 lets go once both have looked
    _leave()


@pytest.mark.parametrize("busy", [False, True])
def test_every_worker_hears_whether_rank_0_took_the_run_directory(tmp_path, busy):
    """torchrun's workers of a run started in a directory another run is at work in: every one refuses (the others
    used to go on alone, fail in their next collective and mark the live run FAILED); free, rank 0 holds it."""
    import contextlib

    from kdrun import runlock

    run_dir = str(tmp_path / "run")
    with runlock.held(run_dir) if busy else contextlib.nullcontext():
        mp.spawn(_run_lock_worker, args=(2, _port(), run_dir, str(tmp_path)), nprocs=2)
    if busy:
        assert all(o.startswith(f"raised RunInProgress {run_dir}: a run is at work") for o in _outcomes(str(tmp_path)))
    else:
        assert _outcomes(str(tmp_path)) == ["returned None"] * 2
        assert [(tmp_path / f"state{r}").read_text() for r in (0, 1)] == ["running"] * 2
    assert runlock.state(run_dir) is None and not os.path.exists(os.path.join(run_dir, "FAILED"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_torchrun_killed_stops_its_workers_for_a_resume(tmp_path):
    """torchrun starts its workers in sessions of their own: ``kill -9`` of its process group left them training (and
    holding the run against its resume). Now each stops as when preempted, once the agent is gone."""
    import signal
    import time

    from tests.conftest import WORKDIR

    run_dir = tmp_path / "run"
    args = ["trainer=smoke", "teacher=resnet8", "student=resnet8", "trainer.latency=false", "store.enabled=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "kdrun.cli"]
    cmd += ["train", *args, "trainer.epochs=100000", "dataset.student_fraction=1.0", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR",)}
    log = open(tmp_path / "log.txt", "w")
    agent = subprocess.Popen(cmd, cwd=WORKDIR, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "student epoch=" not in (tmp_path / "log.txt").read_text():
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-2000:]
            time.sleep(1)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 120  # the workers checkpoint and exit; the FAILED note comes last
        while not (run_dir / "FAILED").exists() or runlock.state(str(run_dir)) == "running":
            assert time.monotonic() < deadline, "the workers went on training after torchrun was killed"
            time.sleep(1)
    finally:
        log.close()
        subprocess.run(["pkill", "-9", "-f", str(run_dir)], check=False)
    assert "stopped by SIGTERM" in (run_dir / "FAILED").read_text()
