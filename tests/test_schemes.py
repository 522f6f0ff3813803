"""Every scheme runs end to end on the default dataset and reports what it claims."""

import csv
import json

import pytest
import torch

from kdrun.errors import ConfigError
from kdrun.schedules import parse

FAST = ["trainer=smoke", "teacher=resnet14", "student=resnet8", "trainer.latency=false", "store.enabled=false"]


def run(kdrun, tmp_path, *args):
    p = kdrun("train", *FAST, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_online_mutual_learning(kdrun, tmp_path):
    """The student is the first peer that is the configured student, chosen in advance (not the best of the peers
    on validation, which would make its KD gain the best of K draws), against its own baseline."""
    m = run(kdrun, tmp_path, "scheme=online", "scheme.peers=[resnet14,resnet8]", "trainer.val_fraction=0.1")
    assert m["scheme"] == "online"
    assert {"peer1", "peer2", "baseline_peer1", "baseline_peer2"} <= set(m["test"])
    online = m["stages"]["online"]
    assert online["chosen_by"] == "the configured student" and online["student_peer"] == 2
    assert m["roles"]["student"] == "peer2" and m["roles"]["baseline"] == "baseline_peer2"
    assert m["models"]["student"]["name"] == "resnet8"
    assert set(online["val_top1_by_model"]) == {"peer1", "peer2"}
    rows = list(csv.DictReader((tmp_path / "run" / "metrics_online.csv").open()))
    assert {"loss_ce_peer1", "loss_kl_peer1", "loss_ce_peer2", "loss_kl_peer2"} <= set(rows[0])
    w1, w2 = (
        torch.load(tmp_path / "run" / "checkpoints" / f, weights_only=True)["model"] for f in ("peer1.pt", "peer2.pt")
    )
    assert not torch.equal(w1["conv1.weight"], w2["conv1.weight"])  # peers start (and stay) different


def traced_run(tmp_path, monkeypatch, *overrides) -> tuple[dict, dict]:
    """An in-process run; with {stage: (steps per epoch, views of its loader)} as each stage trained."""
    from kdrun import stages, train
    from kdrun.cli import compose

    seen, real = {}, stages.train_stage

    def traced(stage, model, objective, loader, **kw):
        seen[stage] = (len(loader), loader.views)
        return real(stage, model, objective, loader, **kw)

    monkeypatch.setattr(stages, "train_stage", traced)
    metrics = train.run(compose([*FAST, "trainer.batch_size=16", *overrides]), str(tmp_path / "run"))
    assert metrics is not None
    return seen, metrics


def test_online_peers_train_as_their_baselines_do(tmp_path, monkeypatch):
    """On the student stages' images (dataset.student_fraction=0.1 by default: 143 of 1438), under each peer's
    weight constraints, and with trainer.ema every peer has its EMA too."""
    overrides = ["scheme=online", "student=mlp", "student.kwargs.hidden=[32]", "student.kwargs.max_norm=0.5"]
    seen, m = traced_run(tmp_path, monkeypatch, *overrides, "trainer.ema=0.9")
    assert seen["online"] == seen["baseline_peer1"] == seen["baseline_peer2"] == (9, None)  # 143 images / 16
    for name in ("peer1", "peer2", "baseline_peer1"):
        w = torch.load(tmp_path / "run" / "checkpoints" / f"{name}.pt", weights_only=True)["model"]
        norms = w["layers.0.fc.weight"].norm(dim=1)
        assert norms.max() <= 0.5 + 1e-5, name
    assert {"peer1_ema", "peer2_ema", "baseline_peer1_ema"} <= set(m["test"])
    assert (tmp_path / "run" / "checkpoints" / "peer2_ema.pt").is_file()


def test_self_distillation_baseline_sees_the_students_views(tmp_path, monkeypatch):
    """Generation 1 is the baseline: with the logit cache (8 replayed views of the augmented digits) it trains on
    the cached views the later generations read, not on fresh ones."""
    seen, _ = traced_run(tmp_path, monkeypatch, "scheme=self", "scheme.generations=2", "dataset.augment.crop_pad=1")
    assert seen["gen1"] == seen["student"] == (9, 8)


def test_self_born_again_generations(kdrun, tmp_path):
    m = run(kdrun, tmp_path, "scheme=self", "scheme.generations=3")
    assert {"gen1", "gen2", "student"} <= set(m["test"])
    assert m["roles"] == {"baseline": "gen1", "teacher": "gen2", "student": "student"}
    assert m["models"]["teacher"]["name"] == m["models"]["student"]["name"] == "resnet8"


def test_each_born_again_generation_starts_from_new_weights(kdrun, tmp_path):
    """As each of the paper's generations is a new network: generation k from trainer.seed + k - 1 (0 epochs: the
    saved weights are the initial ones)."""
    run(kdrun, tmp_path, "scheme=self", "scheme.generations=3", "trainer.epochs=0", "baseline=false")
    w = {
        g: torch.load(tmp_path / "run" / "checkpoints" / f"{g}.pt", weights_only=True)["model"]["conv1.weight"]
        for g in ("gen1", "gen2", "student")
    }
    assert not torch.equal(w["gen1"], w["gen2"]) and not torch.equal(w["gen2"], w["student"])
    assert not torch.equal(w["gen1"], w["student"])


def test_assistant_chain_with_direct_comparison(kdrun, tmp_path):
    m = run(kdrun, tmp_path, "scheme=assistant", "scheme.assistants=[resnet8]")
    assert {"teacher", "assistant1", "student", "student_direct", "baseline"} <= set(m["test"])
    assert (tmp_path / "run" / "assistant1_logits.kdlc").is_file()


def test_assistant_direct_student_is_distilled_from_the_teacher(tmp_path, monkeypatch):
    """The chain teacher -> assistant1 -> student, and student_direct straight from the teacher (the comparison
    that says what the assistant bought)."""
    from kdrun import train

    taught_by, real = {}, train.Run.distil

    def distil(self, stage, mcfg, teacher, who="student"):
        taught_by[stage] = teacher.name
        return real(self, stage, mcfg, teacher, who=who)

    monkeypatch.setattr(train.Run, "distil", distil)
    traced_run(tmp_path, monkeypatch, "scheme=assistant", "scheme.assistants=[resnet8]", "baseline=false")
    assert taught_by == {"assistant1": "teacher", "student": "assistant1", "student_direct": "teacher"}


def test_mutual_kl_is_averaged_over_the_other_peers():
    """Three peers with fixed logits (one sample, two classes, T=1): p1 = (1/2, 1/2), p2 = (3/4, 1/4),
    p3 = (1/4, 3/4). Peer 1: KL(p2||p1) = KL(p3||p1) = 3/4 ln 3 - ln 2; peer 2 (and 3, by symmetry):
    KL(p1||p2) + KL(p3||p2) = 1/2 ln(4/3) + 1/2 ln 3 = ln 2. Each sum is divided by K - 1 = 2."""
    import math

    from torch import nn

    from kdrun.data.loader import Batch
    from kdrun.schemes.online import MutualObjective, Peers

    class Fixed(nn.Module):
        def __init__(self, *logits):
            super().__init__()
            self.z = nn.Parameter(torch.tensor([logits]))

        def forward(self, x):
            return self.z.expand(len(x), -1)

    ln3 = math.log(3)
    peers = Peers([Fixed(0.0, 0.0), Fixed(ln3, 0.0), Fixed(0.0, ln3)])
    batch = Batch(torch.zeros(1, 1, 8, 8), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    terms = MutualObjective(temperature=1.0, kl_weight=0.6)(peers, batch, 0)
    assert set(terms) == {f"{t}_peer{i}" for t in ("ce", "kl") for i in (1, 2, 3)}
    assert terms["kl_peer1"].item() == pytest.approx(0.6 * (0.75 * ln3 - math.log(2)), rel=1e-5)
    assert terms["kl_peer2"].item() == pytest.approx(0.6 * math.log(2) / 2, rel=1e-5)
    assert terms["kl_peer3"].item() == pytest.approx(0.6 * math.log(2) / 2, rel=1e-5)
    assert terms["ce_peer2"].item() == pytest.approx(-math.log(0.75), rel=1e-5)


def test_bad_scheme_values_are_one_line(kdrun_here, tmp_path):
    p = kdrun_here("train", *FAST, "scheme=online", "sweep.metric=student.best_val_top1", f"hydra.run.dir={tmp_path}/r")
    assert p.returncode == 2 and p.stderr.strip() == (
        "kdrun: error: sweep.metric=student.best_val_top1: scheme=online trains its peers in one stage, validated by "
        "their mean logits, so a peer has no best epoch of its own; use student.val_top1 (its last epoch)"
    )
    p = kdrun_here("train", *FAST, "scheme=self", "teacher.checkpoint=t.pt", f"hydra.run.dir={tmp_path}/r")
    assert p.returncode == 2 and p.stderr.strip() == (
        "kdrun: error: teacher.checkpoint=t.pt: scheme=self uses no teacher (its students teach each other); leave it "
        "out, or use scheme=offline"
    )
    peers = "scheme.peers=[resnet8,nosuchnet]"
    p = kdrun_here("train", *FAST, "scheme=online", peers, f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2 and "scheme.peers[1]=nosuchnet: unknown model; valid:" in p.stderr
    p = kdrun_here("train", *FAST, "scheme=nosuch", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2 and "scheme=nosuch: unknown option; valid: assistant, offline, online, self" in p.stderr


def test_temperature_schedule_is_applied_and_logged(kdrun, tmp_path):
    run(kdrun, tmp_path, "trainer.epochs=3", "baseline=false", "+loss.temperature={schedule:linear,start:8,end:2}")
    rows = list(csv.DictReader((tmp_path / "run" / "metrics_student.csv").open()))
    assert [float(r["temperature"]) for r in rows] == [8.0, 5.0, 2.0]


def test_schedule_values():
    lin = parse("loss.temperature", {"schedule": "linear", "start": 8, "end": 1})
    assert [lin.at(e, 0, 8, 10) for e in range(8)] == [8, 7, 6, 5, 4, 3, 2, 1]
    cos = parse("loss.alpha", {"schedule": "cosine", "start": 0.0, "end": 1.0, "per": "step"})
    assert cos.at(0, 0, 2, 3) == pytest.approx(0.0) and cos.at(1, 2, 2, 3) == pytest.approx(1.0)
    assert cos.at(0, 2, 2, 6) == pytest.approx(0.5 - 0.5 * __import__("math").cos(__import__("math").pi * 2 / 11))
    step = parse("loss.weight", {"schedule": "step", "values": [0, 10, 100], "milestones": [2, 4]})
    assert [step.at(e, 0, 6, 1) for e in range(6)] == [0, 0, 10, 10, 100, 100]
    assert parse("loss.alpha", {"schedule": "constant", "value": 0.3}).at(5, 0, 9, 1) == 0.3


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"schedule": "exp", "start": 1, "end": 2}, "loss.temperature.schedule=exp: unknown schedule; valid:"),
        ({"schedule": "linear", "start": 1}, "loss.temperature.end: missing"),
        ({"schedule": "step", "values": [1, 2], "milestones": [1, 2]}, "one more value than milestones"),
    ],
)
def test_bad_schedules(spec, message):
    with pytest.raises(ConfigError) as e:
        parse("loss.temperature", spec)
    assert message in str(e.value)


def test_schedule_out_of_range_is_refused(kdrun_here, tmp_path):
    p = kdrun_here("train", *FAST, "+loss.alpha={schedule:linear,start:0.5,end:1.5}", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2
    assert "loss.alpha: schedule reaches 1.5; must be a number in [0, 1]" in p.stderr


@pytest.mark.parametrize(
    "scheme, overrides, unused",
    [
        ("online", [], None),
        ("online", ["loss.temperature=8", "cache.topk=3"], "cache.topk=3, loss.temperature=8 not used"),
        ("self", ["cache.topk=3"], None),  # the generations read the logit cache: used
    ],
)
def test_a_scheme_says_which_settings_it_leaves_unused(caplog, scheme, overrides, unused):
    """Neither scheme trains the configured teacher (said in the log); scheme=online's peers follow their own KL on
    fresh views, so the KD method's values and the logit cache's are warned about when set, not silently dropped."""
    import logging
    from types import SimpleNamespace

    from hydra import compose, initialize_config_module

    from kdrun.schemes import note_unused

    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"scheme={scheme}", *overrides])
    with caplog.at_level(logging.INFO, logger="kdrun"):
        note_unused(SimpleNamespace(cfg=cfg), scheme, peers=scheme == "online")
    assert f"scheme={scheme} trains no teacher: teacher=resnet20 and trainer.teacher_epochs are not used" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == (
        [
            f"scheme=online: {unused} (the peers learn from each other on fresh views through their own "
            "KL: scheme.temperature, scheme.kl_weight)"
        ]
        if unused
        else []
    )
