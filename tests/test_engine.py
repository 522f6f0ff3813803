"""The training engine: the CE objective (label smoothing, a fixed value), per-step LR schedules
(closed forms), gradient clipping, EMA, a frozen teacher in every scheme, no logit cache without a consumer,
compile with feature methods and the online scheme."""

import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun.data.base import ImageSet
from kdrun.data.loader import Batch, Normalize, TensorLoader
from kdrun.engine import cross_entropy, train_stage
from kdrun.optim import build_scheduler

# ---------------------------------------------------------------- CE objective


def test_cross_entropy_label_smoothing_is_szegedys_mixture():
    """(1 - e) * -log p_y + e * mean_c(-log p_c), for logits (2, 0, -1) and label 0: log p = (-0.16986,
    -2.16986, -3.16986) (log-sum-exp 2.16986); at e = 0.3: 0.7 * 0.16986 + 0.3 * 1.83653 = 0.66986."""
    z = torch.tensor([[2.0, 0.0, -1.0]])
    batch = Batch(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    ce = cross_entropy(lambda x: z, batch, 0, label_smoothing=0.3)["ce"]
    assert ce.item() == pytest.approx(0.66986, abs=1e-4)
    assert cross_entropy(lambda x: z, batch, 0)["ce"].item() == pytest.approx(0.16986, abs=1e-4)


# ---------------------------------------------------------------- LR per step

E, S = 5, 7  # epochs, steps per epoch


def lrs(cfg: dict, epochs=E, steps=S) -> list[float]:
    """The LR each optimiser step runs at, stepping the scheduler after each step as the engine does."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = build_scheduler(opt, OmegaConf.create(cfg), epochs, steps)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def closed_form(schedule: str, k: int, warm_epochs: int = 0, milestones=(), gamma=0.1) -> float:
    w, t = warm_epochs * S, E * S
    if k < w:
        return 0.1 * (k + 1) / w
    if schedule == "cosine":
        return 0.1 * 0.5 * (1 + math.cos(math.pi * (k - w) / (t - w)))
    if schedule == "step":
        return 0.1 * gamma ** sum(k >= m * S for m in milestones)
    return 0.1


@pytest.mark.parametrize("warm", [0, 1, 2])
@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_lr_per_step_equals_the_closed_form(schedule, warm):
    cfg = {"schedule": schedule, "warmup_epochs": warm, "milestones": [2, 4], "gamma": 0.1}
    got = lrs(cfg)
    want = [closed_form(schedule, k, warm, (2, 4)) for k in range(E * S)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert len(set(got)) > (1 if schedule == "constant" and warm else 0)  # it changes within epochs


COSINE_4 = [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # 4 steps, none of them at LR 0


@pytest.mark.parametrize("schedule, want", [("cosine", COSINE_4), ("step", [0.1, 0.1, 0.01, 0.01])])
def test_a_one_step_warm_up_does_not_move_the_schedule(schedule, want):
    """One step per epoch (a transfer set under one batch) and warmup_epochs=1: that step runs at the full LR, and
    the schedule is the one without warm-up (it ran one step early: a step milestone an epoch early)."""
    got = lrs({"schedule": schedule, "warmup_epochs": 1, "milestones": [2], "gamma": 0.1}, epochs=4, steps=1)
    assert got == pytest.approx(lrs({"schedule": schedule, "milestones": [2], "gamma": 0.1}, epochs=4, steps=1))
    assert got == pytest.approx(want, abs=1e-12)


def test_step_milestones_are_the_recipes_epoch_boundaries():
    """RepDistiller: x0.1 after epochs 150, 180, 210 of 240 -> at steps 150*S, 180*S, 210*S."""
    got = lrs({"schedule": "step", "milestones": [150, 180, 210], "gamma": 0.1}, epochs=240, steps=3)
    assert got[150 * 3 - 1] == pytest.approx(0.1) and got[150 * 3] == pytest.approx(0.01)
    assert got[180 * 3] == pytest.approx(0.001) and got[210 * 3] == pytest.approx(0.0001)


# ---------------------------------------------------------------- clipping and EMA through train_stage


def tiny_loader(n=8, batch=4) -> TensorLoader:
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 255, (n, 1, 2, 2), dtype=torch.uint8, generator=g), torch.arange(n) % 2)
    return TensorLoader(data, batch, Normalize([0.5], [0.5], 1, "cpu"), shuffle=False)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))  # 2x2 images

    def forward(self, x):
        return x.flatten(1) @ self.w


def optim(**kw):
    return OmegaConf.create(
        {
            "name": "sgd",
            "lr": 1.0,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "nesterov": False,
            "schedule": "constant",
            "milestones": [],
            "gamma": 0.1,
            "warmup_epochs": 0,
        }
        | kw
    )


def test_grad_clip_limits_the_global_norm_of_each_step(tmp_path):
    model = Linear()

    def objective(net, batch, epoch):
        return {"big": 1000.0 * net.w.sum()}  # gradient 1000 per element: norm 2000

    train_stage(
        "clip", model, objective, tiny_loader(n=4), epochs=1, optim_cfg=optim(grad_clip=2.0), run_dir=str(tmp_path)
    )
    # one SGD step with lr 1 moves the weights by the clipped gradient: norm exactly 2, direction kept
    assert model.w.detach().norm().item() == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(model.w.detach(), torch.full((4,), -1.0))


def test_ema_is_the_moving_average_of_the_weights(tmp_path):
    model = Linear()
    seen = []

    def objective(net, batch, epoch):
        seen.append(net.w.detach().clone())  # weights before this step
        return {"ce": ((net(batch.x) - batch.y.float()) ** 2).mean()}

    loader = tiny_loader(n=12, batch=4)
    res = train_stage(
        "ema", model, objective, loader, epochs=1, optim_cfg=optim(lr=0.1), run_dir=str(tmp_path), ema=0.75
    )
    w1, w2, w3 = seen[1], seen[2], model.w.detach()
    # the first update copies the weights, then ema <- 0.75 ema + 0.25 w
    want = 0.75 * (0.75 * w1 + 0.25 * w2) + 0.25 * w3
    torch.testing.assert_close(res.ema.w.detach(), want)
    assert not torch.equal(res.ema.w.detach(), w3)


def test_the_ema_copy_leaves_the_stages_feature_taps_behind(tmp_path):
    """Distill's hooks are on the student while the stage runs: the EMA copy, made then, used to keep them (every
    later forward of it wrote into the closed tap and held its last features)."""
    model, taps = Linear(), []
    model.register_forward_hook(lambda m, i, o: taps.append(o))
    objective = lambda net, batch, epoch: {"ce": ((net(batch.x) - batch.y.float()) ** 2).mean()}  # noqa: E731
    res = train_stage(
        "ema", model, objective, tiny_loader(n=4), epochs=1, optim_cfg=optim(), run_dir=str(tmp_path), ema=0.5
    )
    taps.clear()
    res.ema(torch.zeros(2, 4))
    assert taps == [] and len(model._forward_hooks) == 1  # the student keeps its own, for the stage to remove


# ---------------------------------------------------------------- runs (tiny, digits)

BASE = [
    "teacher=resnet8",
    "student=resnet8",
    "trainer.teacher_epochs=1",
    "trainer.epochs=1",
    "trainer.batch_size=256",
    "trainer.latency=false",
    "store.enabled=false",
    "baseline=false",
]


def compose(*overrides):
    from kdrun.cli import compose as kd_compose

    return kd_compose([*BASE, *overrides])


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss=fitnet"],
        ["cache.enabled=false"],
        ["scheme=assistant", "scheme.assistants=[resnet8]", "scheme.direct=false", "cache.enabled=false"],
    ],
    ids=["offline-fitnet", "offline-no-cache", "assistant"],
)
def test_teacher_stays_frozen_through_every_distillation_stage(tmp_path, monkeypatch, overrides):
    from kdrun import train

    distil, checked = train.Run.distil, []

    def watched(self, stage, mcfg, teacher, *a, **kw):
        before = snapshot(teacher.model)
        assert any("running_mean" in k for k in before)  # BatchNorm statistics are compared too
        student = distil(self, stage, mcfg, teacher, *a, **kw)
        after = snapshot(teacher.model)
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), f"{stage}: teacher's {k} changed"
        assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
        checked.append(stage)
        return student

    monkeypatch.setattr(train.Run, "distil", watched)
    train.run(compose(*overrides), str(tmp_path))
    assert checked == (["assistant1", "student"] if "scheme=assistant" in overrides else ["student"])


def test_no_logit_cache_when_no_stage_reads_it(tmp_path):
    from kdrun import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = train.run(compose("trainer.epochs=0"), str(run_dir))
    assert not any("cache" in k for k in metrics["stages"]), metrics["stages"].keys()
    assert not list(run_dir.glob("*logits*"))


@pytest.mark.parametrize("overrides", [["loss=fitnet"], ["scheme=online"]], ids=["fitnet", "online"])
def test_compile_trains_feature_methods_and_the_online_scheme(kdrun, tmp_path, overrides):
    """Hooks on the original modules, the trainable module compiled (719: two equal batches, one graph)."""
    run_dir = tmp_path / "run"
    p = kdrun(
        "train",
        *BASE,
        *overrides,
        "trainer.teacher_epochs=0",
        "trainer.batch_size=719",
        "trainer.compile=true",
        f"hydra.run.dir={run_dir}",
        timeout=900,
        env={"TORCH_LOGS": "dynamo"},  # torch's own account of what it traced and compiled
    )
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    stage = "online" if "scheme=online" in overrides else "student"
    assert m["stages"][stage]["epochs"] == 1 and math.isfinite(m["stages"][stage]["final_train_loss"])
    # the trainable module's forward (the distiller wrapping the student, or the peers) was compiled by inductor
    traced = re.findall(r"torchdynamo start tracing (\w+) ", p.stderr)
    assert "forward" in traced, traced
    assert "done compiler function inductor" in p.stderr


def test_log_every_counts_the_stage_s_steps_across_epochs(tmp_path):
    """Epochs of 2 steps with log_every=3: steps 3 and 6 of the stage are logged (counted within each epoch, as
    before, no step was ever logged: every digits stage of the default run is shorter than log_every=50)."""
    from kdrun import engine

    logged = []

    class Steps:
        def log_step(self, stage, step, terms, **values):
            logged.append(step)

        def log_epoch(self, *a):
            pass

    def objective(net, batch, epoch):
        return {"ce": ((net(batch.x) - batch.y.float()) ** 2).mean()}

    engine.train_stage(
        "s",
        Linear(),
        objective,
        tiny_loader(n=4, batch=2),
        epochs=3,
        optim_cfg=optim(),
        run_dir=str(tmp_path),
        log_every=3,
        logger=Steps(),
    )
    assert logged == [3, 6]
