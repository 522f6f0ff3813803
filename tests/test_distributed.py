"""Data parallel on CPU (gloo): the gradient of N workers is the global batch's, and a 2-worker run matches one."""
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdrun import distributed


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grad_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    xs, ys = x[rank::world], y[rank::world]
    torch.nn.functional.cross_entropy(model(xs), ys).backward()
    params = list(model.parameters())
    distributed.all_reduce_grads(params)
    if rank == 0:
        torch.save([p.grad for p in params], os.path.join(out_dir, "grads.pt"))
    dist.destroy_process_group()


def test_all_reduced_gradient_equals_full_batch_gradient(tmp_path):
    mp.spawn(_grad_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    got = torch.load(tmp_path / "grads.pt")
    for p, gp in zip(model.parameters(), got):
        torch.testing.assert_close(gp, p.grad, rtol=1e-5, atol=1e-6)


def test_two_workers_match_one_device(kdrun, tmp_path):
    args = ["teacher=resnet8", "student=resnet8", "trainer.teacher_epochs=4", "trainer.epochs=4",
            "trainer.batch_size=64", "trainer.latency=false", "store.enabled=false", "optim.lr=0.1"]
    tops = {}
    for n in (1, 2):
        run_dir = tmp_path / f"d{n}"
        p = kdrun("train", *args, f"trainer.devices={n}", f"hydra.run.dir={run_dir}", timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        m = json.loads((run_dir / "metrics.json").read_text())
        tops[n] = {k: v.get("last", v)["top1"] for k, v in m["test"].items()}
        if n == 2:
            assert "data parallel: 2 workers (gloo)" in p.stderr
    for model in ("teacher", "student", "baseline"):
        assert tops[1][model] > 80 and abs(tops[1][model] - tops[2][model]) < 5, tops
