"""Experiment trackers behind one small interface: ``logger=[csv,tensorboard,mlflow,wandb]``.

Every tracker is a :class:`Logger` and receives the same calls:

- ``start(config)``: the composed config (flattened ``a.b.c`` keys) as hyperparameters;
- ``step(stage, step, scalars)``: every ``trainer.log_every`` optimiser steps, each loss term, the loss,
  the learning rate and the scheduled values (``temperature``, ``alpha``...) in effect;
- ``epoch(stage, epoch, scalars)``: the row of ``metrics_<stage>.csv`` (epoch means, LR, scheduled values,
  validation accuracy);
- ``finish(metrics, checkpoints)``: the final figures of ``metrics.json`` (flattened) and the exported
  checkpoints (MLflow stores the student's as an artifact);
- ``close(failed)``: end the tracker's run (marked failed when the run stopped on an error).

Scalars are named ``<stage>/<name>`` with the stage's own step counter (``teacher/loss_ce``,
``student/loss_kd``, ``student/temperature``). The per-epoch CSV of each stage is always written (resuming
reads it); ``csv`` adds ``metrics_<stage>_steps.csv`` with the per-step scalars.
Each tracker's options are its config node ``logger.<name>`` (``configs/logger/<name>.yaml``).
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Self

from omegaconf import DictConfig, OmegaConf

from kdrun.errors import ConfigError

log = logging.getLogger("kdrun")

Scalars = dict[str, float]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}`` (lists are kept as leaves)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: obj}


def numeric(flat: dict[str, Any]) -> Scalars:
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def to_float(v) -> float:
    return float(v.detach().float().item()) if hasattr(v, "detach") else float(v)


class Logger:
    """One tracker; every method does nothing unless the tracker needs it."""

    def start(self, config: dict) -> None:
        pass

    def step(self, stage: str, step: int, scalars: Scalars) -> None:
        pass

    def epoch(self, stage: str, epoch: int, scalars: Scalars) -> None:
        pass

    def finish(self, metrics: dict, checkpoints: dict[str, str]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class Loggers(Logger):
    """All the configured trackers as one (what the engine and the pipeline call); also a context
    manager that closes them, marked failed if the block raised."""

    def __init__(self, loggers: list[Logger] | None = None):
        self.loggers = list(loggers or [])

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def start(self, config: dict) -> None:
        for lg in self.loggers:
            lg.start(config)

    def log_step(self, stage: str, step: int, terms: dict, **values) -> None:
        """Called by the training loop: ``terms`` are the loss terms (tensors), ``values`` loss, lr and
        scheduled values; one host sync per term, only every ``log_every`` steps."""
        if not self.loggers:
            return
        scalars = {f"loss_{k}": to_float(v) for k, v in terms.items()}
        scalars |= {k: to_float(v) for k, v in values.items() if v is not None}
        self.step(stage, step, scalars)

    def log_epoch(self, stage: str, epoch: int, row: dict) -> None:
        if self.loggers:
            self.epoch(stage, epoch, numeric({k: v for k, v in row.items() if k != "epoch"}))

    def step(self, stage: str, step: int, scalars: Scalars) -> None:
        for lg in self.loggers:
            lg.step(stage, step, scalars)

    def epoch(self, stage: str, epoch: int, scalars: Scalars) -> None:
        for lg in self.loggers:
            lg.epoch(stage, epoch, scalars)

    def finish(self, metrics: dict, checkpoints: dict[str, str]) -> None:
        for lg in self.loggers:
            lg.finish(metrics, checkpoints)

    def close(self, failed: bool = False) -> None:
        for lg in self.loggers:
            try:
                lg.close(failed)
            except Exception as e:  # noqa: BLE001 (a tracker that cannot close must not hide the run's outcome)
                log.warning("logger %s: close failed (%s)", type(lg).__name__, e)
        self.loggers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


# ---------------------------------------------------------------- trackers


class CsvLogger(Logger):
    """``metrics_<stage>_steps.csv``: one row per logged step (the per-epoch CSV is written by the loop)."""

    def __init__(self, run_dir: str, opts: DictConfig):
        self.run_dir = run_dir
        self.steps = bool(opts.get("steps", True))
        self.columns: dict[str, list[str]] = {}

    def step(self, stage: str, step: int, scalars: Scalars) -> None:
        if not self.steps:
            return
        path = os.path.join(self.run_dir, f"metrics_{stage}_steps.csv")
        row = {"step": step, **scalars}
        if stage not in self.columns:  # this process's first row of the stage: a resumed stage keeps the rows before
            self.columns[stage], kept = _rows_before(path, step)
            self.columns[stage] = self.columns[stage] or list(row)
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.columns[stage], extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns[stage], extrasaction="ignore").writerow(row)


def _rows_before(path: str, step: int) -> tuple[list[str], list[dict]]:
    """The header and the rows of ``path`` logged before global step ``step`` (none when there is no file)."""
    if not os.path.exists(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if (r.get("step") or "").isdigit() and int(r["step"]) < step]
        return list(reader.fieldnames or []), rows


class TensorBoardLogger(Logger):
    """Event files in ``RUN_DIR/<logger.tensorboard.subdir>`` (``tensorboard --logdir outputs``)."""

    def __init__(self, run_dir: str, opts: DictConfig):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logger=tensorboard: tensorboard is not installed (pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, str(opts.get("subdir") or "tensorboard")))
        self.config: dict = {}

    def start(self, config: dict) -> None:
        self.config = config
        text = OmegaConf.to_yaml(OmegaConf.create(config))
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def step(self, stage: str, step: int, scalars: Scalars) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(f"{stage}/{k}", v, step)

    def epoch(self, stage: str, epoch: int, scalars: Scalars) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(f"{stage}/epoch/{k}", v, epoch)

    def finish(self, metrics: dict, checkpoints: dict[str, str]) -> None:
        from torch.utils.tensorboard.summary import hparams

        final = {f"final/{k}": v for k, v in final_figures(metrics).items()}
        params = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flatten(self.config).items()}
        file_writer = self.writer.file_writer
        assert file_writer is not None  # SummaryWriter opens it when made
        for item in hparams(params, final):  # the HPARAMS tab: config next to the final figures
            file_writer.add_summary(item)
        for k, v in final.items():
            self.writer.add_scalar(k, v, 0)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowLogger(Logger):
    """One MLflow run per kdrun run (``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db``)."""

    def __init__(self, run_dir: str, opts: DictConfig):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("logger=mlflow: mlflow is not installed (pip install mlflow)") from None
        uri = opts.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///outputs/mlflow.db"
        self.client = MlflowClient(tracking_uri=_absolute_uri(uri))
        name = str(opts.get("experiment") or "kdrun")
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            artifacts = opts.get("artifact_location")
            if not artifacts and self.client.tracking_uri.startswith("sqlite:///"):  # next to the database
                artifacts = os.path.join(
                    os.path.dirname(self.client.tracking_uri[len("sqlite:///") :]),
                    "mlartifacts",
                )
            exp_id = self.client.create_experiment(
                name,
                artifact_location=_absolute_uri(artifacts, file=True) if artifacts else None,
            )
        else:
            exp_id = exp.experiment_id
        run_name = opts.get("run_name") or os.path.basename(os.path.normpath(run_dir))
        self.run_id = self.client.create_run(
            exp_id, run_name=run_name, tags={"kdrun.run_dir": os.path.abspath(run_dir)}
        ).info.run_id
        self.artifact_roles = list(opts.get("artifacts") or ["student"])

    def _metrics(self, scalars: Scalars, step: int):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(k, v, now, step) for k, v in scalars.items()]

    def start(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def step(self, stage: str, step: int, scalars: Scalars) -> None:
        self.client.log_batch(
            self.run_id,
            metrics=self._metrics({f"{stage}/{k}": v for k, v in scalars.items()}, step),
        )

    def epoch(self, stage: str, epoch: int, scalars: Scalars) -> None:
        self.client.log_batch(
            self.run_id,
            metrics=self._metrics({f"{stage}/epoch/{k}": v for k, v in scalars.items()}, epoch),
        )

    def finish(self, metrics: dict, checkpoints: dict[str, str]) -> None:
        final = final_figures(metrics)
        ms = self._metrics(final, 0)
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 1000])
        for role in self.artifact_roles:
            path = checkpoints.get(role)
            if path and os.path.exists(path):
                self.client.log_artifact(self.run_id, path, artifact_path="checkpoints")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbLogger(Logger):
    """A Weights & Biases run; ``logger.wandb.mode=offline`` (default) writes ``RUN_DIR/wandb/`` only
    (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later); ``online`` needs a login."""

    def __init__(self, run_dir: str, opts: DictConfig):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logger=wandb: wandb is not installed (pip install wandb)") from None
        self.wandb: Any = wandb  # its API as the installed version has it (wandb's types change between releases)
        self.opts, self.run_dir = opts, run_dir
        self.run: Any = None
        self.stages: set[str] = set()

    def start(self, config: dict) -> None:
        o = self.opts
        self.run = self.wandb.init(
            project=str(o.get("project") or "kdrun"),
            entity=o.get("entity"),
            name=o.get("run_name") or os.path.basename(os.path.normpath(self.run_dir)),
            mode=str(o.get("mode") or "offline"),
            dir=self.run_dir,
            config=config,
            settings=self.wandb.Settings(silent=True, console="off"),
        )

    def _define(self, stage: str) -> None:
        if stage not in self.stages:  # each stage counts its own steps and epochs
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.run.define_metric(f"{stage}/epoch")
            self.run.define_metric(f"{stage}/epoch/*", step_metric=f"{stage}/epoch")
            self.stages.add(stage)

    def step(self, stage: str, step: int, scalars: Scalars) -> None:
        self._define(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in scalars.items()}})

    def epoch(self, stage: str, epoch: int, scalars: Scalars) -> None:
        self._define(stage)
        self.run.log(
            {
                f"{stage}/epoch": epoch,
                **{f"{stage}/epoch/{k}": v for k, v in scalars.items()},
            }
        )

    def finish(self, metrics: dict, checkpoints: dict[str, str]) -> None:
        final = {f"final/{k}": v for k, v in final_figures(metrics).items()}
        self.run.summary.update(final)

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


LOGGERS = {
    "csv": CsvLogger,
    "tensorboard": TensorBoardLogger,
    "mlflow": MlflowLogger,
    "wandb": WandbLogger,
}
_FINAL_PREFIXES = ("test.", "models.", "ratios.", "kd_gain", "timings_s.", "cpu_timing.")


def final_figures(metrics: dict) -> Scalars:
    """The numbers of ``metrics.json`` a tracker records at the end, by dotted key; a list of numbers (an
    interval) as one figure per item (``kd_gain.ci95.0``, ``.1``)."""
    flat = flatten(metrics)
    for k, v in list(flat.items()):
        if (
            isinstance(v, (list, tuple))
            and v
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ):
            flat |= {f"{k}.{i}": x for i, x in enumerate(v)}
    return {k: v for k, v in numeric(flat).items() if k.startswith(_FINAL_PREFIXES)}


def _absolute_uri(uri: str, file: bool = False) -> str:
    """A relative ``sqlite:///path`` or plain path made absolute (runs may change directory)."""
    uri = str(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = os.path.abspath(uri[len("sqlite:///") :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return "sqlite:///" + path
    if "://" not in uri and not uri.startswith("file:"):
        path = os.path.abspath(uri)
        return ("file://" + path) if file else path
    return uri


def names(cfg: DictConfig) -> list[str]:
    """The selected trackers (``logger`` is a mapping of name -> options, or a list of names)."""
    node = cfg.get("logger")
    if node is None:
        return []
    return [str(n) for n in (node.keys() if isinstance(node, DictConfig) else node)]


# the package each tracker needs, checked before the run folder or the data (the import itself waits for the run)
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check(cfg: DictConfig) -> None:
    """ConfigError for an unknown tracker name, or one whose package is not installed."""
    import importlib.util

    for name in names(cfg):
        if name not in LOGGERS:
            raise ConfigError(f"logger={name}: unknown logger; valid: {', '.join(LOGGERS)}")
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"logger={name}: {PACKAGES[name]} is not installed (pip install {PACKAGES[name]})")


def build(cfg: DictConfig, run_dir: str) -> Loggers:
    """The configured trackers (checked by :func:`check` in ``kdrun.config.validate``), started with the composed
    config."""
    node = cfg.get("logger")
    made: list[Logger] = []
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)  # cfg is a DictConfig
    for name in names(cfg):
        opts = node.get(name) if isinstance(node, DictConfig) else None
        try:
            made.append(LOGGERS[name](run_dir, opts if isinstance(opts, DictConfig) else OmegaConf.create({})))
            made[-1].start(config)
        except ConfigError:
            Loggers(made).close(failed=True)
            raise
        except Exception as e:  # noqa: BLE001 (the tracker's own error: a bad URI, no login, a server not answering)
            Loggers(made).close(failed=True)
            what = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ConfigError(
                f"logger={name}: the tracker could not start ({type(e).__name__}{': ' + what if what else ''}); "
                f"check logger.{name}.* (configs/logger/{name}.yaml) or choose another logger"
            ) from e
    return Loggers(made)
