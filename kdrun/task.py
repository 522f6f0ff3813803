"""The Hydra task behind ``kdrun train``: one run (or one job of a sweep)."""
from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdrun import distributed
from kdrun.config import validate
from kdrun.errors import KdrunError
from kdrun.preempt import install_handlers

log = logging.getLogger("kdrun")


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def hydra_train(cfg: DictConfig) -> float:
    """Run the pipeline in Hydra's output directory; return the sweep objective (see :func:`objective`)."""
    from kdrun import report, train

    run_dir = HydraConfig.get().runtime.output_dir
    install_handlers()
    for stale in ("FAILED", "metrics.json"):  # a rerun in the same directory resumes: not complete yet
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    try:
        validate(cfg)
        devices = int(cfg.trainer.get("devices", 1))
        if distributed.init_from_env():  # started by torchrun: this process is one worker
            metrics = train.run(cfg, run_dir)
            if not distributed.is_main():
                return 0.0
        elif devices > 1:
            kind = train.pick_device(cfg.trainer.device).type
            log.info("data parallel: %d workers (%s)", devices, "nccl" if kind == "cuda" else "gloo")
            metrics = distributed.launch(devices, kind, train.run, cfg, run_dir, distributed.setup_worker)
        else:
            metrics = train.run(cfg, run_dir)
    except KdrunError as e:
        _mark_failed(run_dir, str(e))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"kdrun: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BaseException as e:
        _mark_failed(run_dir, f"{type(e).__name__}: {e}")
        raise
    report.write_json(metrics, os.path.join(run_dir, "metrics.json"))  # written last: marks the run complete
    table = report.summary_table(metrics)
    log.info("summary\n%s\noutputs: %s", table, run_dir)
    return objective(metrics)


def objective(metrics: dict) -> float:
    """What sweepers maximise: the student's last-epoch validation top-1 when a validation split is held
    out (``trainer.val_fraction > 0``), else its test top-1 (then confirm any winner on fresh seeds)."""
    from kdrun.report import last

    val = metrics["stages"].get(metrics["roles"]["student"], {}).get("final_val_top1")
    return val if val is not None else last(metrics["test"]["student"])["top1"]


def _mark_failed(run_dir: str, msg: str) -> None:
    """Leave a FAILED note (and no metrics.json) so the directory never looks complete."""
    try:
        with open(os.path.join(run_dir, "FAILED"), "w") as f:
            f.write(msg + "\n")
    except OSError:
        pass
