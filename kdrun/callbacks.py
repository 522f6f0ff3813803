"""Hydra callbacks: the same global torch state for every job, and the sweep report at the end of a multirun."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("kdrun")


@dataclass
class SweepOutcome:
    """What the last multirun of this process left: its directory, job count and failed jobs (name, reason)."""

    sweep_dir: str
    jobs: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    report: str | None = None


LAST_SWEEP: SweepOutcome | None = None  # read by ``kdrun train -m`` for its exit code


@dataclass(frozen=True)
class TorchGlobals:
    """Process-wide torch settings a run may change (``trainer.deterministic``, ``trainer.threads``, ...)."""

    deterministic: bool
    deterministic_warn_only: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool
    threads: int
    matmul_precision: str

    @classmethod
    def now(cls) -> TorchGlobals:
        return cls(
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
            torch.get_num_threads(),
            torch.get_float32_matmul_precision(),
        )

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_float32_matmul_precision(self.matmul_precision)


class CleanGlobalState(Callback):
    """Every job of a sweep starts from the torch settings the process started with (an earlier job's
    ``trainer.deterministic=true`` or ``trainer.threads=1`` does not leak into the next)."""

    def __init__(self) -> None:
        self.initial = TorchGlobals.now()

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self.initial.restore()


class SweepReport(Callback):
    """Writes report.md/csv and plots at the end of every multirun and notes its failed jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        global LAST_SWEEP
        from kdrun.sweep_report import build, collect, find_run_dirs

        sweep_dir = str(config.hydra.sweep.dir)
        outcome = LAST_SWEEP = SweepOutcome(sweep_dir)
        try:
            runs = collect(sweep_dir)
            outcome.jobs = len(runs)
            outcome.failed = [(r.name, r.note) for r in runs if r.status in ("failed", "stopped")]
        except Exception as e:  # noqa: BLE001 (the report's reading failed: the jobs' FAILED notes still count)
            log.warning("sweep: could not read the jobs of %s: %s", sweep_dir, e)
            outcome.failed = failed_notes(sweep_dir)
            outcome.jobs = len(find_run_dirs(sweep_dir))
        try:
            paths = build(sweep_dir).paths
            outcome.report = paths[0] if paths else None
            log.info("sweep report: %s", outcome.report or sweep_dir)
        except Exception as e:  # noqa: BLE001 (a report problem must not turn a finished sweep into a failure)
            log.warning("sweep report not written: %s", e)
        for name, reason in outcome.failed:
            log.warning("sweep: job %s FAILED: %s", name, reason)


def failed_notes(sweep_dir: str) -> list[tuple[str, str]]:
    """(job, first line of its FAILED note) of every job under ``sweep_dir``, read without the report's machinery:
    the count a sweep's exit code rests on when the report could not read the jobs."""
    import os

    from kdrun.sweep_report import find_run_dirs, first_line

    notes = [(d, os.path.join(d, "FAILED")) for d in find_run_dirs(sweep_dir)]
    return [(os.path.relpath(d, sweep_dir), first_line(f)) for d, f in notes if os.path.isfile(f)]
