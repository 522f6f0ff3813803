"""Hydra callbacks: the sweep report written at the end of every multirun."""
from __future__ import annotations

import logging

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("kdrun")


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from kdrun.sweep_report import write_report

        try:
            paths = write_report(config.hydra.sweep.dir)
            log.info("sweep report: %s", paths[0] if paths else config.hydra.sweep.dir)
        except Exception as e:  # a report problem must not turn a finished sweep into a failure
            log.warning("sweep report not written: %s", e)
