"""Step time of data-parallel training: torch's DDP against kdrun's former hand-made all-reduce.

    python scripts/bench_ddp.py [--model resnet20] [--batch 128] [--steps 30] [--warmup 5] [--repeats 3]

Both sides run 2 processes (gloo on the CPU, NCCL with ``--device cuda``) on the same model, the same
global batch (``--batch`` images of 32x32x3, each rank its half) and the same SGD step:

* ``ddp``: ``kdrun.distributed.wrap`` -> ``DistributedDataParallel``: bucketed all-reduce overlapping
  backward;
* ``allreduce``: plain backward, then every gradient copied into one flat buffer, all-reduced and copied
  back (``kdrun/distributed.py`` before DDP, reproduced below as ``old_all_reduce_grads``).

A 1-process run of the whole global batch is printed for reference. Each process uses
``--threads`` intra-op threads (default: the cores divided by the processes). Figures are the median
over ``--repeats`` runs of the mean step time after ``--warmup`` steps; the sides alternate.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kdrun import distributed
from kdrun.models import build_model


def old_all_reduce_grads(params: list[torch.Tensor]) -> None:
    """kdrun's former data parallelism: after backward, one flat all-reduce of every gradient."""
    n = dist.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= n
    offset = 0
    for p, g in zip(params, grads):
        numel = g.numel()
        p.grad = flat[offset : offset + numel].view_as(p).clone()
        offset += numel


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_time(mode: str, rank: int, world: int, a) -> float:
    """Mean seconds per step after the warm-up, on this rank."""
    device = torch.device(f"cuda:{rank}" if a.device == "cuda" else "cpu")
    torch.manual_seed(0)
    model = build_model(a.model, 100, 3, 32).to(device)
    net = distributed.wrap(model, device) if mode == "ddp" else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    per_rank = a.batch // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(per_rank, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (per_rank,), generator=g).to(device)
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if mode == "allreduce" and world > 1:
            old_all_reduce_grads(params)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / a.steps


def _worker(rank: int, world: int, port: int, mode: str, a, out) -> None:
    torch.set_num_threads(a.threads)
    backend = "nccl" if a.device == "cuda" else "gloo"
    if a.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    secs = steps_time(mode, rank, world, a)
    t = torch.tensor([secs], device=f"cuda:{rank}" if a.device == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends it
    if rank == 0:
        out.put(float(t))
    dist.destroy_process_group()


def run(mode: str, world: int, a) -> float:
    if world == 1:
        torch.set_num_threads(a.threads * a.procs)
        return steps_time(mode, 0, 1, a)
    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(world, _port(), mode, a, q), nprocs=world)
    return q.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128, help="global batch (each of the 2 ranks: half)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per process (0: cores / procs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    if not a.threads:
        a.threads = max(1, (os.cpu_count() or 2) // a.procs)
    times: dict[str, list[float]] = {"ddp": [], "allreduce": [], "one process": []}
    for r in range(a.repeats):
        order = ["ddp", "allreduce"] if r % 2 == 0 else ["allreduce", "ddp"]
        for mode in order:
            times[mode].append(run(mode, a.procs, a))
            print(f"round {r + 1} {mode}: {times[mode][-1] * 1e3:.0f} ms/step", flush=True)
        times["one process"].append(run("ddp", 1, a))
        print(f"round {r + 1} one process: {times['one process'][-1] * 1e3:.0f} ms/step", flush=True)
    print(
        f"model {a.model}, global batch {a.batch} (32x32x3), {a.procs} processes x {a.threads} threads, "
        f"{a.device}, {a.steps} timed steps after {a.warmup}, median of {a.repeats}"
    )
    print(f"{'engine':<28}{'ms/step':>10}{'images/s':>10}   runs (ms)")
    for mode, label in (
        ("ddp", f"DDP, {a.procs} processes"),
        ("allreduce", f"old all-reduce, {a.procs} processes"),
        ("one process", "1 process, whole batch"),
    ):
        med = statistics.median(times[mode])
        runs = " ".join(f"{t * 1e3:.0f}" for t in times[mode])
        print(f"{label:<28}{med * 1e3:>10.1f}{a.batch / med:>10.0f}   {runs}")


if __name__ == "__main__":
    main()
