"""The Hydra task behind ``kdrun train``: one run (or one job of a sweep)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdrun import cli, distributed, plugins, runlock
from kdrun.config import validate
from kdrun.errors import ConfigError, KdrunError, ResumeRefused, UnreadableImage
from kdrun.preempt import Preempted, check_stop, install_handlers

log = logging.getLogger("kdrun")


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def hydra_train(cfg: DictConfig) -> float:
    """Run the pipeline in Hydra's output directory; return the sweep objective (see :func:`objective`)."""
    run_dir = HydraConfig.get().runtime.output_dir
    install_handlers()
    try:  # a SIGTERM between two jobs of a sweep (or during the last one's evaluation) ends the sweep here
        check_stop(f"job {run_dir} started")
    except Preempted as e:
        print(f"kdrun: {e}{_continue_hint(run_dir)}", file=sys.stderr)
        sys.exit(e.exit_code)
    with contextlib.ExitStack() as held:  # run_dir's lock (kdrun.runlock), until its metrics.json or FAILED note
        return _train(cfg, run_dir, held)


def _train(cfg: DictConfig, run_dir: str, held: contextlib.ExitStack) -> float:
    from kdrun import report, train

    # a finished run run again: its checkpoints as they were, to tell an error that changed nothing
    finished = _checkpoint_files(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.json")) else None
    try:
        plugins.load(cfg.get("plugins"))  # a sweep's job may run in a fresh process (joblib, submitit)
        validate(cfg)
        devices = int(cfg.trainer.get("devices", 1))
        joined = distributed.init_from_env(cfg.trainer.device)  # started by torchrun: this process is one worker
        runlock.hold_for_group(held, run_dir)  # rank 0 takes it; with torchrun's workers each hears whether it could
        # a rerun in the same directory resumes. A finished run's metrics.json stays until the rerun writes its own
        # over it (a rerun killed meanwhile leaves the run as complete as it was), or fails (then it goes, with a
        # FAILED note)
        if distributed.is_main() and os.path.exists(os.path.join(run_dir, "FAILED")):
            os.remove(os.path.join(run_dir, "FAILED"))
        if joined:
            if why := cli.devices_under_launcher(distributed.size(), devices):  # e.g. a sweep's SLURM tasks
                raise ConfigError(why)
            if not distributed.is_main():  # rank 0 alone fills the console and train.log, as with trainer.devices
                # the warnings of the other workers of a machine are its first worker's too: said once there
                log.setLevel(logging.ERROR if distributed.local_rank() > 0 else logging.WARNING)
            metrics = train.run(cfg, run_dir)
            if not distributed.is_main():
                return 0.0
        elif devices > 1:
            kind = distributed.device_kind(cfg.trainer.device)
            log.info("data parallel: %d workers (%s)", devices, "nccl" if kind == "cuda" else "gloo")
            metrics = distributed.launch(devices, kind, train.run, cfg, run_dir, distributed.setup_worker)
        else:
            metrics = train.run(cfg, run_dir)
    except KdrunError as e:
        # another process's run (RunInProgress), or a finished run that refused to resume or met an error before
        # anything of it changed (data moved, an unreadable image): left as it was
        kept = _kept(run_dir, finished, e)
        if not (kept or isinstance(e, runlock.RunInProgress)):
            _mark_failed(run_dir, str(e))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if _in_sweep() and not isinstance(e, Preempted):  # costs only this job: the others run
            print(f"kdrun: error: {e}", file=sys.stderr)
            return math.nan
        # a refusal or a stop the workers of a machine meet alike is said once there; another may be this worker's own
        if not (isinstance(e, (ConfigError, Preempted)) and cli.other_worker()):
            hint = "; the finished run is kept as it was" if kept else _resume_hint(e, run_dir)
            said = "kdrun:" if isinstance(e, Preempted) else "kdrun: error:"  # a stop asked for is no error
            print(f"{said} {e}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BaseException as e:
        kept = _kept(run_dir, finished, e)
        if isinstance(e, KeyboardInterrupt) and os.environ.get("HYDRA_FULL_ERROR") != "1":  # Ctrl-C twice
            if not kept:  # a stop, as a sweep report counts it: the last checkpoint continues the run
                _mark_failed(run_dir, "stopped by SIGINT twice: at once, from the last checkpoint saved")
            hint = "; the finished run is kept as it was" if kept else _continue_hint(run_dir)
            print(f"kdrun: stopped at once by a second SIGINT (Ctrl-C){hint}", file=sys.stderr)
            sys.exit(130)
        if not kept:
            _mark_failed(run_dir, f"{type(e).__name__}: {e}")
        if _in_sweep() and isinstance(e, Exception) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            log.exception("job failed; the sweep goes on")
            return math.nan
        raise
    assert metrics is not None  # train.run returns None only on workers other than rank 0, which returned above
    report.write_json(metrics, os.path.join(run_dir, "metrics.json"))  # written last: marks the run complete
    table = report.summary_table(metrics)
    log.info("summary\n%s\noutputs: %s", table, run_dir)
    return objective(metrics, cfg)


def objective(metrics: dict, cfg: DictConfig) -> float:
    """What sweepers maximise: ``sweep.metric`` (default the student's last-epoch top-1 on the validation
    split; never a test-set figure), NaN when the run has none. See :mod:`kdrun.objective`."""
    from kdrun import objective as sweep_objective

    metric = sweep_objective.parse(OmegaConf.select(cfg, "sweep.metric"))
    value = sweep_objective.value(metrics, metric)
    why = sweep_objective.why_missing(metrics, metric) if math.isnan(value) else None
    if why:  # a sweeper counts the trial as failed: say why, once a run
        log.warning("%s; a sweeper counts this run as failed", why)
    return value


def _in_sweep() -> bool:
    """True in a job of a multirun: a failure there marks the job FAILED instead of ending the sweep."""
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _continue_hint(run_dir: str) -> str:
    """The command that continues a run (or the sweep it is a job of) a SIGTERM/SIGINT stopped: the same command
    would start a new time-stamped folder, unless it names this one."""
    if _in_sweep():
        sweep_dir = shlex.quote(os.path.abspath(HydraConfig.get().sweep.dir))
        return f"; to continue the sweep, run its command again with hydra.sweep.dir={sweep_dir}"
    return f"; kdrun train resume={shlex.quote(run_dir)} continues it"


def _resume_hint(err: KdrunError, run_dir: str) -> str:
    """For an image file met mid-run that cannot be decoded (a streamed split), when the run had written
    checkpoints: the command that continues it once the file is fixed; for a stop (SIGTERM, Ctrl-C), the command
    that continues it. Not for other errors, whose fix is often a config change that resuming refuses (a checkpoint
    resumes only with the configuration that made it)."""
    if isinstance(err, Preempted):
        return _continue_hint(run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    if isinstance(err, UnreadableImage) and os.path.isdir(ckpts) and any(f.endswith(".pt") for f in os.listdir(ckpts)):
        return f"; the checkpoints are kept: once the file is fixed, kdrun train resume={shlex.quote(run_dir)} goes on"
    return ""


# a finished run's .hydra/ files as they were before this command (Hydra rewrites them with its overrides once
# the job starts): restored when the command fails without changing the run (:func:`_kept`). Held here, not in
# kdrun.cli, which may also run as __main__ (python -m kdrun.cli): another copy of its module state
_FINISHED_RUN_FILES: dict[str, dict[str, str]] = {}


def keep_finished_run(run_dir: str) -> None:
    """Remember the ``.hydra/`` files of ``run_dir`` when it holds a finished run (its metrics.json)."""
    hydra_dir = os.path.join(run_dir, ".hydra")
    if not (os.path.exists(os.path.join(run_dir, "metrics.json")) and os.path.isdir(hydra_dir)):
        return
    files = {}
    for name in os.listdir(hydra_dir):
        with contextlib.suppress(OSError), open(os.path.join(hydra_dir, name), encoding="utf-8") as f:
            files[name] = f.read()
    _FINISHED_RUN_FILES[os.path.abspath(run_dir)] = files


def restore_finished_run(run_dir: str) -> None:
    """Write back the ``.hydra/`` files :func:`keep_finished_run` remembered for ``run_dir`` (if any)."""
    from kdrun.io import write_text

    for name, text in _FINISHED_RUN_FILES.pop(os.path.abspath(run_dir), {}).items():
        with contextlib.suppress(KdrunError):  # an unwritable folder: the run is still complete
            write_text(os.path.join(run_dir, ".hydra", name), text)


def _checkpoint_files(run_dir: str) -> dict[str, tuple[int, int]]:
    """``{file: (size, mtime)}`` of the run's training checkpoints (``*_last.pt``, ``*_best.pt``): a rerun that
    trained nothing left them as they were. (A finished run run again writes its models, ``teacher.pt`` ..., again
    from those same weights.)"""
    ckpts = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpts):
        return {}
    return {
        f.name: (f.stat().st_size, f.stat().st_mtime_ns)
        for f in os.scandir(ckpts)
        if f.is_file() and f.name.endswith(("_last.pt", "_best.pt"))
    }


def _kept(run_dir: str, finished: dict | None, err: BaseException) -> bool:
    """True when a finished run run again failed without changing it (no checkpoint written, or a refusal to
    resume): its metrics.json stays, and the ``.hydra/`` files the failed command's overrides rewrote are restored
    (:func:`keep_finished_run`), so ``resume=`` continues the run as it was."""
    if not os.path.exists(os.path.join(run_dir, "metrics.json")):
        return False
    if not (isinstance(err, ResumeRefused) or (finished is not None and _checkpoint_files(run_dir) == finished)):
        return False
    restore_finished_run(run_dir)
    return True


def _mark_failed(run_dir: str, msg: str) -> None:
    """Leave a FAILED note (and no metrics.json) so the directory never looks complete."""
    try:
        with open(os.path.join(run_dir, "FAILED"), "w") as f:
            f.write(msg + "\n")
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            os.remove(os.path.join(run_dir, "metrics.json"))
        ckpts = os.path.join(run_dir, "checkpoints")
        if os.path.isdir(ckpts) and not os.listdir(ckpts):  # failed before any stage saved one
            os.rmdir(ckpts)
    except OSError:
        pass
