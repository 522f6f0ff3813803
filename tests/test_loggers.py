"""Experiment trackers: one run with logger=[csv,tensorboard,mlflow,wandb], read back from real files."""

import csv
import glob
import json
import struct

import pytest

from kdrun import loggers
from tests.conftest import SMOKE_RUN, run_kdrun

SCHEDULED_T = "loss.temperature={schedule: linear, start: 8, end: 1, per: step}"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("trackers")
    run_dir, db = root / "run", root / "mlflow.db"
    p = run_kdrun(
        "train",
        *SMOKE_RUN,
        "dataset.student_fraction=1.0",  # the whole split: 12 student steps (digits' default 10% has 2)
        "trainer.log_every=4",
        "trainer.threads=1",
        SCHEDULED_T,
        "logger=[csv,tensorboard,mlflow,wandb]",
        f"logger.mlflow.tracking_uri=sqlite:///{db}",
        f"hydra.run.dir={run_dir}",
        env={"WANDB_SILENT": "true"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir, f"sqlite:///{db}", root


def test_csv_logger_writes_per_step_rows(tracked):
    run_dir, _, _ = tracked
    rows = list(csv.DictReader((run_dir / "metrics_student_steps.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [
        4,
        8,
        12,
    ]  # 1437 images / 128 = 12 steps, every 4th
    assert {"loss_kd", "loss_ce", "loss", "lr", "temperature"} <= set(rows[0])
    temps = [float(r["temperature"]) for r in rows]
    assert temps[0] > temps[-1] >= 1.0  # the per-step schedule is what gets logged
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["loss_kd"]) + float(r["loss_ce"]), rel=1e-5)


def test_csv_steps_of_a_resumed_stage_follow_those_logged_before(tmp_path):
    """A stage resumed from its checkpoint at step 4 logs from step 5 on in a new process: the rows before stay
    (the file used to be started afresh), those after the checkpoint are logged again, once."""
    from omegaconf import OmegaConf

    from kdrun.loggers import CsvLogger

    first = CsvLogger(str(tmp_path), OmegaConf.create({}))
    for step in range(1, 7):  # killed after step 6; the checkpoint holds step 4
        first.step("student", step, {"loss": float(step)})
    resumed = CsvLogger(str(tmp_path), OmegaConf.create({}))
    for step in range(5, 9):
        resumed.step("student", step, {"loss": 10.0 + step})
    rows = list(csv.DictReader((tmp_path / "metrics_student_steps.csv").read_text().splitlines()))
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4)] + [
        (s, 10 + s) for s in range(5, 9)
    ]


def test_tensorboard_event_file_holds_steps_epochs_config_and_final_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = tracked
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "student/loss_kd",
        "student/loss_ce",
        "student/lr",
        "student/temperature",
        "teacher/loss_ce",
        "baseline/loss_ce",
        "student/epoch/loss_kd",
        "final/test.student.last.top1",
    } <= tags
    assert [e.step for e in acc.Scalars("student/loss_kd")] == [4, 8, 12]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (final,) = acc.Scalars("final/test.student.last.top1")
    assert final.value == pytest.approx(metrics["test"]["student"]["last"]["top1"], abs=1e-3)
    assert "config/text_summary" in acc.Tags()["tensors"]  # the composed config as text
    assert "_hparams_/session_start_info" in acc.summary_metadata  # and as hyperparameters (HPARAMS tab)


def test_mlflow_run_has_params_metrics_history_and_the_student_checkpoint(tracked):
    from mlflow.tracking import MlflowClient

    run_dir, uri, _ = tracked
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdrun").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.name"] == "kd" and run.data.params["student.name"] == "resnet8"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["test.student.last.top1"] == pytest.approx(metrics["test"]["student"]["last"]["top1"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "student/loss_kd")] == [4, 8, 12]
    assert len(client.get_metric_history(run.info.run_id, "teacher/epoch/loss")) == 1
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/student.pt"]


def wandb_records(path):
    """The records of a wandb transaction log (``run-*.wandb``: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_holds_history_config_and_summary(tracked):
    run_dir, _, _ = tracked
    (log,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    recs = wandb_records(log)

    def items(rec, field):
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in getattr(rec, field)}

    history = [items(r.history, "item") for r in recs if r.WhichOneof("record_type") == "history"]
    kd_steps = [h["student/step"] for h in history if "student/loss_kd" in h]
    assert kd_steps == [4, 8, 12]
    config = {}
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "run":  # the config given to wandb.init
            config |= items(r.run.config, "update")
        elif kind == "config":  # later updates
            config |= items(r.config, "update")
    assert config["loss"]["name"] == "kd"
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary |= items(r.summary, "update")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert summary["final/test.student.last.top1"] == pytest.approx(metrics["test"]["student"]["last"]["top1"])


def test_loggers_fan_out_and_close_failed_on_error():
    calls = []

    class Probe(loggers.Logger):
        def step(self, stage, step, scalars):
            calls.append(("step", stage, step, scalars))

        def epoch(self, stage, epoch, scalars):
            calls.append(("epoch", stage, epoch, scalars))

        def close(self, failed=False):
            calls.append(("close", failed))

    import torch

    with pytest.raises(RuntimeError), loggers.Loggers([Probe(), Probe()]) as lg:
        lg.log_step("student", 5, {"kd": torch.tensor(0.5)}, loss=0.75, lr=0.1, temperature=4.0)
        lg.log_epoch("student", 1, {"epoch": 1, "lr": 0.1, "loss": 0.7, "note": "text"})
        raise RuntimeError("boom")
    assert calls[0] == (
        "step",
        "student",
        5,
        {"loss_kd": 0.5, "loss": 0.75, "lr": 0.1, "temperature": 4.0},
    )
    assert calls[2] == ("epoch", "student", 1, {"lr": 0.1, "loss": 0.7})
    assert calls[-2:] == [("close", True), ("close", True)]


def test_flatten_and_unknown_logger():
    from omegaconf import OmegaConf

    from kdrun.errors import ConfigError

    assert loggers.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {
        "a.b": 1,
        "a.c": [1, 2],
        "d": "x",
    }
    with pytest.raises(
        ConfigError,
        match="logger=nope: unknown logger; valid: csv, tensorboard, mlflow, wandb",
    ):
        loggers.check(OmegaConf.create({"logger": {"nope": {}}}))


def test_unknown_logger_on_the_command_line_is_one_line(tmp_path):
    p = run_kdrun("train", "logger=[csv,nosuch]", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2
    assert p.stderr.strip() == "kdrun: error: logger=nosuch: unknown option; valid: csv, mlflow, tensorboard, wandb"
    assert not (tmp_path / "r").exists()


def test_a_tracker_not_installed_is_refused_before_the_run_folder(kdrun_here, tmp_path, monkeypatch):
    """It was found after the data was read, leaving a run folder with a FAILED note."""
    monkeypatch.setitem(loggers.PACKAGES, "wandb", "kdrun_no_such_package")
    p = kdrun_here("train", "logger=[csv,wandb]", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "kdrun: error: logger=wandb: kdrun_no_such_package is not installed (pip install kdrun_no_such_package)"
    )
    assert not (tmp_path / "r").exists()


def test_a_tracker_that_cannot_start_is_one_line(tmp_path):
    """A tracking URI MLflow does not take was a traceback (exit 1)."""
    pytest.importorskip("mlflow")
    p = run_kdrun(
        "train", *SMOKE_RUN, "logger=[csv,mlflow]", "logger.mlflow.tracking_uri=foo://x", f"hydra.run.dir={tmp_path}"
    )
    assert p.returncode == 2, p.stderr[-2000:]
    (line,) = p.stderr.strip().splitlines()[-1:]
    assert line.startswith("kdrun: error: logger=mlflow: the tracker could not start (") and "Traceback" not in p.stderr
    assert line.endswith("check logger.mlflow.* (configs/logger/mlflow.yaml) or choose another logger")


def test_a_step_row_holds_the_learning_rate_that_step_took(tmp_path):
    """The per-step rows logged the rate the scheduler had set for the next step (the last step showed 0.0)."""
    p = run_kdrun(
        "train",
        *SMOKE_RUN,
        "trainer.epochs=2",
        "trainer.log_every=1",
        "dataset.student_fraction=1.0",
        "baseline=false",
        "trainer.latency=false",
        f"hydra.run.dir={tmp_path}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    with open(tmp_path / "metrics_student_steps.csv") as f:
        steps = list(csv.DictReader(f))
    with open(tmp_path / "metrics_student.csv") as f:
        epochs = list(csv.DictReader(f))
    per_epoch = len(steps) // 2
    for e, row in enumerate(epochs):  # an epoch's row: the rate at its first step
        assert float(steps[e * per_epoch]["lr"]) == pytest.approx(float(row["lr"]))
    assert float(steps[-1]["lr"]) > 0  # cosine to 0: the rate after the last step, not the last step's


def test_the_final_figures_hold_the_kd_gain_with_its_interval_and_test():
    """The interval, a pair, was dropped as a list; the p-value was not among the final figures."""
    metrics = {
        "test": {"student": {"top1": 90.0}},
        "kd_gain_top1": 2.0,
        "kd_gain_p_value": 0.01,
        "kd_gain": {"gain_top1": 2.0, "p_value": 0.01, "ci95": (0.5, 3.5), "test": "exact McNemar"},
        "config": {"optim": {"lr": 0.1}},
    }
    final = loggers.final_figures(metrics)
    assert final["kd_gain.ci95.0"] == 0.5 and final["kd_gain.ci95.1"] == 3.5 and final["kd_gain_p_value"] == 0.01
    assert final["test.student.top1"] == 90.0 and "config.optim.lr" not in final
