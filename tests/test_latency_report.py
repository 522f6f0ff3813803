"""CPU latency: median and best call, speed-ups from the best calls, and a warning when the cores were busy.

No real timing is asserted: a fake clock (and fake scheduler counters) advance by scripted amounts in each
forward pass, or the timings themselves are scripted."""

from __future__ import annotations

import os
import re
import types

import pytest
import torch
from torch import nn

from kdrun import report
from kdrun.models import report as mr
from kdrun.models.report import BUSY_QUEUED, BUSY_SPREAD, Contention, Timing
from kdrun.models_cli import models_main


class FakeCpu:
    """``perf_counter`` and this process's scheduler counters (ns on a CPU, ns waiting for one)."""

    def __init__(self):
        self.now, self.run, self.wait = 0.0, 0, 0

    def perf_counter(self) -> float:
        return self.now

    def sched_ns(self) -> tuple[int, int]:
        return self.run, self.wait


class Scripted(nn.Module):
    """Each forward pass takes the next of ``ms`` milliseconds on the fake clock, ``run`` ns on a CPU and
    ``wait`` ns queued for one."""

    def __init__(self, cpu: FakeCpu, ms: list[float], run: int = 1, wait: int = 0):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.cpu, self.ms, self.run, self.wait = cpu, list(ms), run, wait

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cpu.now += self.ms.pop(0) / 1000
        self.cpu.run += self.run
        self.cpu.wait += self.wait
        return self.lin(x)


@pytest.fixture
def cpu(monkeypatch) -> FakeCpu:
    fake = FakeCpu()
    monkeypatch.setattr(mr, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    monkeypatch.setattr(mr, "_sched_ns", fake.sched_ns)
    return fake


def test_latencies_give_the_median_and_the_fastest_call_of_each_model(cpu):
    teacher = Scripted(cpu, [4, 1, 9, 3, 7, 2], run=1, wait=3)  # two rounds of three calls each
    student = Scripted(cpu, [2, 2, 2, 2, 2, 8], run=9, wait=1)
    out = mr.latencies_ms(
        {"teacher": teacher, "student": student}, (4,), warmup=0, min_time=0, rounds=2, min_iters=3, max_iters=3
    )
    assert out["teacher"].median == pytest.approx(3.5) and out["teacher"].best == pytest.approx(1.0)
    assert out["student"].median == pytest.approx(2.0) and out["student"].best == pytest.approx(2.0)
    assert out["teacher"].spread == pytest.approx(3.5)
    # the queue share is each model's own: waited / (ran + waited) over its timed calls
    assert out["teacher"].queued == pytest.approx(0.75) and out["student"].queued == pytest.approx(0.1)
    single = mr.latency_ms(Scripted(cpu, [5, 3, 4]), (4,), warmup=0, min_time=0, max_iters=3)
    assert (single.median, single.best) == pytest.approx((4.0, 3.0))


def test_latencies_without_scheduler_counters_leave_the_queue_share_unknown(cpu, monkeypatch):
    monkeypatch.setattr(mr, "_sched_ns", lambda: None)
    t = mr.latency_ms(Scripted(cpu, [1, 1, 1]), (4,), warmup=0, min_time=0, max_iters=3)
    assert t.queued is None
    assert not Contention.of([t]).busy


@pytest.mark.parametrize(
    "timings, busy",
    [
        ([Timing(1.0, 1.0, 0.0), Timing(BUSY_SPREAD, 1.0, BUSY_QUEUED)], False),  # at the thresholds: quiet
        ([Timing(1.0, 1.0, 0.0), Timing(BUSY_SPREAD * 1.01, 1.0, 0.0)], True),  # one median a little above
        ([Timing(1.0, 1.0, 0.0), Timing(1.0, 1.0, BUSY_QUEUED + 0.01)], True),  # uniformly slow: queued only
        ([Timing(1.2, 1.0, None)], False),  # no scheduler counters: the spread alone
    ],
)
def test_busy_exactly_when_a_spread_or_the_queue_share_exceeds_its_threshold(timings, busy):
    assert Contention.of(timings).busy is busy


def fake_run_metrics(monkeypatch, b1: dict[str, Timing], b32: dict[str, Timing]) -> dict:
    """The ``metrics.json`` fields of a run whose CPU timings were ``b1`` and ``b32`` (by role)."""
    monkeypatch.setattr(mr, "latencies_ms", lambda nets, shape, batch, **_: {1: b1, 32: b32}[batch])
    monkeypatch.setattr(mr, "cpu_load", lambda: (4.7, 2))
    nets = {role: nn.Linear(4, 2) for role in ("teacher", "student")}
    timing = report.cpu_latency(nets, (4,))
    models = {role: {"name": role, "params": 10, "flops": 10, "size_mb": 1.0} | timing.stats(role) for role in nets}
    return {
        "test": {"teacher": {"top1": 90.0, "errors": 1}, "student": {"top1": 80.0, "errors": 2}},
        "models": models,
        "ratios": report.ratios(models),
        "cpu_timing": timing.verdict(),
        "roles": {"teacher": "teacher", "student": "student"},
        "dataset": {"name": "digits", "test": 359},
        "timings_s": {"total": 1.0},
    }


def test_metrics_keep_medians_add_the_best_and_take_speedups_from_the_best(monkeypatch):
    b1 = {"teacher": Timing(30.0, 3.0, 0.0), "student": Timing(2.0, 2.0, 0.0)}  # a burst of load on the teacher
    b32 = {"teacher": Timing(40.0, 20.0, 0.0), "student": Timing(8.0, 5.0, 0.0)}
    m = fake_run_metrics(monkeypatch, b1, b32)
    t = m["models"]["teacher"]
    assert (t["latency_ms_cpu_b1"], t["latency_ms_cpu_b1_best"]) == (30.0, 3.0)
    assert (t["latency_ms_cpu_b32"], t["latency_ms_cpu_b32_best"]) == (40.0, 20.0)
    assert m["ratios"]["speedup_cpu_b1"] == 1.5 and m["ratios"]["speedup_cpu_b32"] == 4.0  # not 15x and 5x
    assert m["cpu_timing"] == {
        "speedups_from": "best",
        "load_1min": 4.7,
        "cpus": 2,
        "median_over_best_max": 10.0,
        "queued_max": 0.0,
        "busy": True,
    }
    tail = report.summary_table(m).splitlines()[-1]
    assert "CPU speed-up 1.50x at batch 1, 4.00x at batch 32 (fastest calls; timed on busy cores" in tail
    assert "medians up to 10.0x the best, 0% of run time waiting for a core, load 4.7 on 2 CPUs)" in tail
    table = report.summary_table(m)
    teacher_row = table.splitlines()[1]
    assert teacher_row.split()[-1] == "3.000"  # ms b1: the fastest call, as the speed-ups
    assert "ms b1" in table.splitlines()[0] and "; MFLOPs: 2 a multiply-add; ms b1: the fastest CPU call" in table


@pytest.mark.parametrize("batch", [1, 32])  # under load the spread shows mostly at batch 32
@pytest.mark.parametrize(
    "spread, queued, busy",
    [(BUSY_SPREAD, BUSY_QUEUED, False), (BUSY_SPREAD * 1.01, 0.0, True), (1.0, BUSY_QUEUED + 0.01, True)],
)
def test_the_summary_warns_exactly_when_the_timing_was_disturbed(monkeypatch, batch, spread, queued, busy):
    quiet = {"teacher": Timing(1.0, 1.0, 0.0), "student": Timing(1.0, 1.0, 0.0)}
    disturbed = {"teacher": Timing(2.0 * spread, 2.0, queued), "student": Timing(1.0, 1.0, 0.0)}
    m = fake_run_metrics(monkeypatch, *((disturbed, quiet) if batch == 1 else (quiet, disturbed)))
    assert m["cpu_timing"]["busy"] is busy
    tail = report.summary_table(m).splitlines()[-1]
    assert "(fastest calls" in tail
    assert ("timed on busy cores" in tail) is busy


def models_report(monkeypatch, capsys, timings: dict[int, Timing], *args: str) -> str:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mr, "latency_ms", lambda model, shape, batch, device: timings[batch])
    monkeypatch.setattr(mr, "cpu_load", lambda: (4.7, 2))
    assert models_main(["mlp", "dataset=digits", *args]) == 0
    return capsys.readouterr().out


def test_models_report_prints_the_fastest_call_and_the_median(monkeypatch, capsys):
    threads = torch.get_num_threads()
    out = models_report(monkeypatch, capsys, {1: Timing(0.6, 0.5, 0.01), 32: Timing(2.5, 2.0, 0.01)}, "threads=1")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    assert re.search(  # batch 32, as a run's summary times it
        r"latency cpu\s+0\.500 ms at batch 1, 2\.000 ms at batch 32 \(fastest calls; "
        rf"medians 0\.600 and 2\.500 ms; 1 thread\(s\) of {os.cpu_count()} CPU cores\)\n",
        out,
    )
    assert "busy" not in out


def test_models_report_warns_when_the_timing_was_disturbed(monkeypatch, capsys):
    out = models_report(monkeypatch, capsys, {1: Timing(168.0, 0.5, 0.6), 32: Timing(2.3, 2.0, 0.6)})
    assert "timed on busy cores: medians up to 336.0x the best, 60% of run time waiting for a core, " in out
    assert "load 4.7 on 2 CPUs" in out


def test_a_model_in_two_roles_keeps_its_figures_and_both_roles_in_the_summary(monkeypatch):
    """scheme=self with 2 generations: generation 1 teaches and is the baseline; its row shows both roles and the
    teacher's parameters, FLOPs, size and latency (the speed-up in the last line is taken from them)."""
    quiet = {"teacher": Timing(3.0, 3.0, 0.0), "student": Timing(1.0, 1.0, 0.0)}
    m = fake_run_metrics(monkeypatch, quiet, quiet)
    m["test"] = {"gen1": {"top1": 90.0, "errors": 1}, "student": {"top1": 80.0, "errors": 2}}
    m["roles"] = {"teacher": "gen1", "baseline": "gen1", "student": "student"}
    gen1 = report.summary_table(m).splitlines()[1]
    assert gen1.startswith(f"gen1 (teacher, baseline) {m['models']['teacher']['name']}")
    assert gen1.split()[-1] == "3.000"  # its latency: the teacher's figures are on its row


def test_the_model_list_describes_each_model_in_a_whole_phrase():
    """It kept a docstring's first line, cut mid-sentence ("... in airbench94),")."""
    from kdrun.models import MODELS
    from kdrun.models_cli import summary

    assert summary(MODELS.get("airbench")) == "airbench94's network"
    assert summary(MODELS.get("mlp")).startswith("MLP of Hinton et al. (2015)")
    assert all(not summary(MODELS.get(n)).endswith((",", "(", ";")) for n in MODELS.names())
