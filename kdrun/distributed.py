"""Data-parallel training on torch's own engine: DistributedDataParallel over a process group.

Three ways to get N workers, one code path once they exist:

* ``trainer.devices=N > 1``: the Hydra process spawns N local workers (``torch.multiprocessing``);
* ``torchrun --nnodes=M --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m kdrun.cli train``:
  every process joins the group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``);
* SLURM (the submitit launcher, ``hydra.launcher.nodes``/``tasks_per_node``): every task joins the group
  described by SLURM's environment (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the node list).

Each worker binds its own device (``cuda:LOCAL_RANK``, with ``torch.cuda.set_device``), uses NCCL on GPUs
and gloo on CPUs, and trains one :class:`~torch.nn.parallel.DistributedDataParallel` module per stage
(see :func:`wrap`): the bucketed gradient all-reduce overlaps the backward pass. Every rank gets the same
number of equal, non-empty shards of every global batch (:func:`shard`). Only rank 0 writes files and
evaluates; rank 0's result comes back to the launching process through a queue.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import socket
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from kdrun.errors import ConfigError, KdrunError
from kdrun.preempt import EXIT_PREEMPTED, STOP, Preempted, check_stop


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_main() -> bool:
    return world()[0] == 0


def size() -> int:
    return world()[1]


def local_rank() -> int:
    """This worker's index on its node (``LOCAL_RANK``, set by torchrun, the spawner and the SLURM bridge)."""
    return int(os.environ.get("LOCAL_RANK", world()[0]))


def device_kind(name: str) -> str:
    """``cpu`` or ``cuda``: the kind of device ``trainer.device`` means (``auto``: CUDA when available)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def bind_device(name: str) -> torch.device:
    """The device of this worker for ``trainer.device``, made current.

    ``auto`` is CUDA when available, else CPU; with several workers ``cuda`` becomes ``cuda:LOCAL_RANK``
    (one GPU per worker) and is set as the current CUDA device, so NCCL and every ``.cuda()`` use it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and size() > 1:
        name = f"cuda:{local_rank()}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    return device


def shard(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of one global batch, like ``DistributedSampler``: the batch is padded with its own
    first samples to a multiple of ``world_size``, then rank r takes samples r, r + W, ... Every rank gets the
    same, non-zero number of samples (a last batch smaller than W no longer leaves a rank empty)."""
    if world_size == 1:
        return idx
    short = -len(idx) % world_size
    if short:
        idx = torch.cat([idx, idx.repeat((short + len(idx) - 1) // len(idx))[:short]])
    return idx[rank::world_size]


def wrap(module: nn.Module, device: torch.device, sync_bn: bool = False, find_unused: bool = False) -> nn.Module:
    """``module`` as DDP when there are several workers (BatchNorm -> SyncBatchNorm with ``sync_bn``), else as is.
    ``find_unused``: some parameters get no gradient in a step (a pre-stage trains a student's features, not its
    classifier).

    Buffers are synced once, at the start, not at each forward: during a stage BatchNorm statistics are each
    worker's own (rank 0 evaluates and saves its), and at the stage's end every worker takes rank 0's
    (:func:`broadcast_buffers`); a method's large buffers (CRD's memory banks) are kept equal by the method.
    Gradients are views into DDP's buckets (no copy).
    """
    if size() == 1:
        return module
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError("trainer.sync_bn=true: SyncBatchNorm needs CUDA GPUs; leave it false on CPUs")
        module = to_sync_bn(module)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=ids,
        forward_sync_buffers=False,
        gradient_as_bucket_view=True,
        find_unused_parameters=find_unused,
    )


def to_sync_bn(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm below it made a SyncBatchNorm, in place below the root; those already
    converted are kept as they are (with their hooks). Convert before feature taps attach: a converted module is
    a new object, so hooks on the one it replaces no longer fire."""
    if isinstance(module, nn.SyncBatchNorm):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        converted = to_sync_bn(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics, which DDP here never syncs) on every worker."""
    if size() > 1:
        nccl = dist.get_backend() == "nccl"
        for buf in module.buffers():
            if nccl and buf.device.type != "cuda":  # e.g. AveragedModel's n_averaged: a count, equal on every rank
                continue
            dist.broadcast(buf, src=0)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """The same-shaped tensors of every rank, concatenated along dim 0 in rank order (``t`` when alone)."""
    if size() == 1:
        return t
    out = torch.empty((size() * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


class _GlobalBatch(torch.autograd.Function):
    """Forward: every rank's shard, concatenated in rank order. Backward: this rank's rows of the gradient summed
    over the ranks, each of which computed the same loss of the whole batch (so DDP's mean of the ranks'
    parameter gradients is the one process's gradient of that loss)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.rows = slice(world()[0] * t.shape[0], (world()[0] + 1) * t.shape[0])
        return all_gather_cat(t)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        grad = grads[0].contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def global_batch(t: torch.Tensor) -> torch.Tensor:
    """The whole global batch of per-sample rows ``t`` (this rank's shard), differentiable: a loss over relations
    between samples (SP, RKD, PKT, CC, DIST) computed on it is the one process's loss, not that of a shard."""
    if size() == 1:
        return t
    return _GlobalBatch.apply(t) if t.requires_grad else all_gather_cat(t.detach())


def gathered(obj) -> list:
    """Every worker's picklable ``obj``, in rank order (``[obj]`` when alone)."""
    if size() == 1:
        return [obj]
    out: list = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def any_flag(flag: bool, device) -> bool:
    """True on every worker when any worker's flag is set (one tiny collective)."""
    if size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# the first error a worker deferred (:func:`defer`), raised by every worker at their next :func:`agree`
_DEFERRED: list[KdrunError] = []


def defer(err: KdrunError) -> None:
    """Hold this worker's ``err`` until the workers next :func:`agree`, where every worker raises it. A worker
    that raised alone (e.g. a teacher logit the cache cannot hold, met on its own shard) would leave the others
    waiting in their next collective until the group timed out; under a bare ``srun`` nothing else ends them.
    Alone, ``err`` is raised at once."""
    if size() == 1:
        raise err
    if not _DEFERRED:  # the first one: what follows it may be its consequence
        _DEFERRED.append(err)


def deferring() -> bool:
    """Whether this worker holds an error for the workers' next :func:`agree`: its run is ending, and what it
    computes until then (e.g. from the zeros standing in for an image it could not decode) must not be kept."""
    return bool(_DEFERRED)


def agree(stop: bool, device) -> bool:
    """Whether any worker's ``stop`` is set, on every worker (one tiny collective); raises on every worker the
    error a worker deferred (the lowest such rank's), so that all of them end together."""
    if size() == 1:
        return stop
    rank, n = world()
    t = torch.tensor([1.0 if stop else 0.0, float(n - rank) if _DEFERRED else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    stop_any, culprit = bool(t[0].item()), n - int(t[1].item())
    if culprit < n:
        box: list[KdrunError | None] = [_DEFERRED[0] if rank == culprit else None]
        dist.broadcast_object_list(box, src=culprit)
        _DEFERRED.clear()
        _raise_unheld(box.pop())
    return stop_any


def _raise_unheld(err: BaseException | None) -> NoReturn:
    """Raise ``err``, a caller's only reference to it handed over (``box.pop()``), without any frame keeping it: a
    frame that holds the error its traceback holds is a cycle, which kept the stage's DDP model alive past
    destroy_process_group, and gloo could abort at interpreter exit (SIGABRT)."""
    assert err is not None
    try:
        raise err
    finally:
        del err


def shared(fn):
    """``fn()`` computed on rank 0 and handed to every worker (e.g. an artifact-store lookup); a KdrunError it
    raises is raised by every worker (alone, rank 0 would leave the others waiting in the broadcast)."""
    if size() == 1:
        return fn()
    box: list = [None]
    if is_main():
        try:
            box = [(True, fn())]
        except KdrunError as e:
            box = [(False, e)]
    dist.broadcast_object_list(box, src=0)
    if not box[0][0]:
        _raise_unheld(box.pop()[1])
    return box[0][1]


@contextmanager
def lock_on_main(lock, try_lock, device: torch.device, poll_s: float = 5.0):
    """A lock held by rank 0 for the whole group. ``lock()`` waits for it (used alone); ``try_lock()`` yields
    whether it got it (e.g. :meth:`kdrun.store.Store.lock` / ``try_lock``). With several workers rank 0 tries every
    ``poll_s`` seconds and every worker waits with it in one tiny collective per try, so a wait longer than the
    process group's timeout (another job training the same teacher for an hour) ends no worker."""
    if size() == 1:
        with lock():
            yield
        return
    while True:
        with try_lock() if is_main() else nullcontext(False) as held:
            if any_flag(bool(held), device):
                yield
                return
        if any_flag(STOP.requested is not None, device):  # SIGTERM/Ctrl-C while waiting: every worker stops now
            STOP.requested = STOP.requested or "another worker"
            check_stop("the lock another run holds was free")
        time.sleep(poll_s)


def barrier() -> None:
    if size() > 1:
        dist.barrier()


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


# the task count of a SLURM job, and of submitit's local executor (sweep=slurm_local) standing in for one
TASK_COUNTS = ("SLURM_NTASKS", "SUBMITIT_LOCAL_NTASKS")


def _task_count() -> str | None:
    """The variable of :data:`TASK_COUNTS` that says this process is one of several tasks (None: it is alone)."""
    return next((k for k in TASK_COUNTS if int(os.environ.get(k, "1")) > 1), None)


def launched_workers() -> int:
    """How many workers the launcher describes in the environment (torchrun's ``WORLD_SIZE``, else SLURM's or
    submitit's task count; 1 when none), known before the process group is joined."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    tasks = _task_count()
    return int(os.environ[tasks]) if tasks else 1


def _slurm_env() -> None:
    """Describe the process group from SLURM's environment (one task per process), the torchrun way."""
    tasks = _task_count()
    if "WORLD_SIZE" in os.environ or tasks is None:
        return
    try:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except ImportError as e:
        raise KdrunError(
            f"{tasks} > 1: joining a SLURM process group needs submitit (pip install 'kdrun[sweep]')"
        ) from e


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun (or SLURM) describes; True when this process is one of several.

    ``device`` is ``trainer.device``: on CUDA the worker first makes ``cuda:LOCAL_RANK`` current (NCCL).
    """
    _slurm_env()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend_for("cuda" if cuda else "cpu"))
        atexit.register(close)  # the group serves every job of a sweep: it closes with the process
        if "TORCHELASTIC_RUN_ID" in os.environ:
            _stop_with_launcher()
        return True
    return dist.is_initialized()


def _stop_with_launcher() -> None:
    """Linux: a SIGTERM for this worker when the torchrun agent that started it dies. torchrun starts its workers in
    sessions of their own, so ``kill -9`` of its process group left them training, holding the run's lock against
    its resume; now they stop as when preempted (a checkpoint, the FAILED note, exit 75)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def close() -> None:
    """Free what the run left in reference cycles (a DDP model holds the group), then destroy the group: freed at
    interpreter exit instead, after the group, gloo can abort the process (SIGABRT) and a finished run would end as
    failed. Nothing without a group."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, n: int, port: int, backend: str, fn, args, setup, queue) -> None:
    """A spawned worker: join the group, run ``fn(*args)``, hand rank 0's result (or a KdrunError) back."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(n),
        LOCAL_WORLD_SIZE=str(n),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # the cores shared out, as torchrun does (OMP_NUM_THREADS); trainer.threads, when set, overrides this in
    # train.run. With torch's default (every core) in each, 2 workers on 2 cores ran a tiny MLP run 3.5x slower
    torch.set_num_threads(max(1, usable_cores() // n))
    exit_code = 0
    try:  # a failure joining the group (its logging, its device) is handed back like one in the run
        setup(rank, args[1])
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=n)
        result = fn(*args)
        if rank == 0:
            queue.put(("result", result))
    except KdrunError as e:  # handled here, so that its traceback (the stage's frames) is gone before the group
        queue.put(("error", str(e), e.exit_code))
        exit_code = e.exit_code
    except BaseException:  # the cause, handed back before the group closes and the others fail in their turn
        queue.put(("crash", rank, traceback.format_exc()))
        raise
    finally:
        close()
    if exit_code:
        sys.exit(exit_code)


# after a worker crashed, how long the others get to end by themselves, and again after a SIGTERM, before a SIGKILL:
# one blocked joining the group (its peer died at start-up) or in a collective ends no other way (torch's default:
# a SIGTERM at once, then 30 s). Not after a stop or a KdrunError, which every worker meets together: rank 0 may
# still be writing the checkpoint the others' message promises.
WORKER_GRACE_S = 5.0


class WorkerFailed(RuntimeError):
    """A data-parallel worker's exception (not a :class:`KdrunError`): the first worker's to fail, with its
    traceback (the others' are knock-on errors of the closed group)."""


def launch(n: int, device_type: str, fn, cfg, run_dir: str, setup_logging) -> dict:
    """Run ``fn(cfg, run_dir)`` on ``n`` local workers; returns rank 0's result, re-raises a worker's KdrunError."""
    from multiprocessing.connection import wait as wait_any

    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.spawn(
        _entry,
        args=(n, _free_port(), backend_for(device_type), fn, (cfg, run_dir), setup_logging, queue),
        nprocs=n,
        join=False,
    )
    messages, failure, forwarded = [], None, False
    try:
        while True:
            codes = [p.exitcode for p in ctx.processes]
            while not queue.empty():  # read after the exit codes: a worker hands its message back before it ends
                messages.append(queue.get())
            if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                crashed = any(msg[0] == "crash" for msg in messages)
                if ctx.join(grace_period=WORKER_GRACE_S if crashed else None):  # raises for a failed worker
                    break
                continue
            wait_any([p.sentinel for p in ctx.processes if p.exitcode is None], timeout=0.2)
            # a SIGTERM sent to this process alone (kill PID, timeout, a container's stop) goes on to the workers,
            # which stop together and checkpoint; Ctrl-C's SIGINT reaches the whole process group by itself
            if STOP.requested == "SIGTERM" and not forwarded:
                forwarded = True
                for proc in ctx.processes:
                    if proc.is_alive() and proc.pid is not None:
                        os.kill(proc.pid, signal.SIGTERM)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        failure = e
    while not queue.empty():
        messages.append(queue.get())
    for msg in messages:
        if msg[0] == "error":  # a stop stays a stop (the run's continue command; not a failed sweep job)
            err = Preempted(msg[1]) if msg[2] == EXIT_PREEMPTED else KdrunError(msg[1])
            err.exit_code = msg[2]
            raise err from None
    crash = next((msg for msg in messages if msg[0] == "crash"), None)
    if crash is not None:
        raise WorkerFailed(f"worker {crash[1]} of {n} failed:\n{crash[2].rstrip()}") from failure
    if failure is not None:
        raise failure
    return next(msg[1] for msg in messages if msg[0] == "result")


def setup_worker(rank: int, run_dir: str) -> None:
    """A spawned worker's logging (rank 0: console and train.log; others: warnings only) and stop handlers."""
    import logging

    from kdrun.preempt import install_handlers

    install_handlers()
    logger = logging.getLogger("kdrun")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        file = logging.FileHandler(os.path.join(run_dir, "train.log"))
        file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        logger.addHandler(console)
        logger.addHandler(file)
