"""Data-parallel training on N processes (``trainer.devices=N``): DDP semantics, no framework.

The Hydra process composes the config and owns the run directory; with
``trainer.devices=N > 1`` it starts N workers (``torch.multiprocessing``,
gloo on CPU, NCCL on GPU, worker r on ``cuda:r``), each running the whole
pipeline on its shard of every global batch. After each backward pass the
gradients of all trainable parameters (model and KD adapters) are averaged
across workers, so N workers with ``trainer.batch_size=B`` follow the same
optimisation path as one device with batch B (up to BatchNorm statistics,
which each worker computes on its B/N images). Only rank 0 writes files and
evaluates; the logit cache is built in parallel, each rank its share of the
batches. Started by ``torchrun`` instead (``RANK``/``WORLD_SIZE`` set), kdrun
joins that process group and does not spawn.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

from kdrun.errors import KdrunError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def size() -> int:
    return world()[1]


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Average gradients over the workers, as one flat buffer (missing grads count as zero)."""
    n = size()
    if n == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= n
    offset = 0
    for p, g in zip(params, grads):
        numel = g.numel()
        p.grad = flat[offset:offset + numel].view_as(p).clone()
        offset += numel


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if size() > 1:
        dist.all_reduce(t)
    return t


def any_flag(flag: bool, device) -> bool:
    """True on every worker when any worker's flag is set (one tiny collective)."""
    if size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shared(fn):
    """``fn()`` computed on rank 0 and handed to every worker (e.g. an artifact-store lookup)."""
    if size() == 1:
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_only(ctx):
    """``ctx`` on rank 0, a no-op elsewhere (e.g. a file lock other workers must not wait on)."""
    return ctx if is_main() else nullcontext()


def barrier() -> None:
    if size() > 1:
        dist.barrier()


def device_for(name: str) -> str:
    """The device of this worker: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if size() > 1 and name.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', world()[0]))}"
    return name


def init_from_env() -> bool:
    """Join a process group started by torchrun; True when this process is one of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, n: int, port: int, backend: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    run_dir = args[1]
    try:
        result = fn(*args)
        if rank == 0:
            with open(os.path.join(run_dir, ".result.json"), "w") as f:
                json.dump(result, f)
    except KdrunError as e:
        with open(os.path.join(run_dir, f".error.{rank}"), "w") as f:
            json.dump({"message": str(e), "code": e.exit_code}, f)
        sys.exit(e.exit_code)
    finally:
        dist.destroy_process_group()


def launch(n: int, device_type: str, fn, cfg, run_dir: str, setup_logging) -> dict:
    """Run ``fn(cfg, run_dir)`` on ``n`` workers; returns rank 0's result, re-raises a worker's KdrunError."""
    import torch.multiprocessing as mp

    backend = "nccl" if device_type == "cuda" else "gloo"
    try:
        mp.spawn(_entry, args=(n, _free_port(), backend, fn, (cfg, run_dir), setup_logging), nprocs=n)
    except mp.ProcessExitedException:
        for r in range(n):
            path = os.path.join(run_dir, f".error.{r}")
            if os.path.exists(path):
                with open(path) as f:
                    err = json.load(f)
                os.remove(path)
                e = KdrunError(err["message"])
                e.exit_code = err["code"]
                raise e from None
        raise
    path = os.path.join(run_dir, ".result.json")
    with open(path) as f:
        result = json.load(f)
    os.remove(path)
    return result


def _entry(rank, n, port, backend, fn, args, setup):
    setup(rank, args[1])
    _worker(rank, n, port, backend, fn, args)


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
