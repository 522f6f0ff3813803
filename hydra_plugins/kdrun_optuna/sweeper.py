"""A Hydra sweeper driving an Optuna (>= 4) study with ask/tell, stored where it survives the process.

``hydra/sweeper=kdrun_optuna`` (``kdrun train -m sweep=optuna`` selects it). The study lives in
``storage``: ``journal:PATH`` (Optuna's ``JournalStorage`` on a file; safe for several processes, also
on NFS, with the ``open`` lock) or any Optuna RDB URL (``sqlite:///optuna.db``, ``postgresql://...``);
``null`` keeps it in memory. The same command run again loads the study (``load_if_exists``) and
continues it: trial numbers go on from where it stopped, and the sweeper stops once the study holds
``n_trials`` finished trials (counting those of earlier runs and of other processes sharing the
study), so N SLURM jobs started with the same command share the budget. A trial left RUNNING by a
process of this machine that no longer exists (a killed job) is marked FAIL and its parameters are
queued again.

The search space is ``params`` (and ``-m`` sweep overrides on the command line), in Hydra's override
grammar: ``choice(a,b)`` -> categorical, ``range(lo,hi,step)`` -> int/float steps,
``interval(lo,hi)`` -> float, ``tag(int, interval(lo,hi))`` -> int, ``tag(log, interval(lo,hi))`` -> log
scale; plain values are fixed for every trial. Each trial is one Hydra job; the task's return value
is the objective (``direction``). ``optimization_results.yaml`` in the sweep directory holds the best
trial of the whole study.
"""

# (no ``from __future__ import annotations``: Hydra executes this module outside sys.modules while it
# scans for plugins, and dataclasses cannot resolve postponed annotations there)
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

WORKER_ATTR = "kdrun_worker"  # "host:pid" of the process that asked for a trial


@dataclass
class KdrunOptunaSweeperConf:
    _target_: str = "hydra_plugins.kdrun_optuna.sweeper.KdrunOptunaSweeper"
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    direction: str = "maximize"  # maximize | minimize
    study_name: str = "kdrun"
    storage: Any = None  # journal:PATH | an Optuna RDB URL | null (in memory)
    n_trials: int = 20  # finished trials the study should hold (all runs and processes together)
    n_jobs: int = 1  # trials launched at a time by this process (its launcher runs them)
    params: Any = None  # {key: override grammar}


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="kdrun_optuna",
    node=KdrunOptunaSweeperConf,
    provider="kdrun",
)


def distribution(override: Override):
    """An Optuna distribution for a sweep override, or the plain value (a string) of a fixed one."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop - value.step, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - int(value.step), step=int(value.step))
    if override.is_interval_sweep():
        is_log = "log" in value.tags
        if "int" in value.tags:  # Hydra parses interval ends as floats
            return IntDistribution(int(value.start), int(value.end), log=is_log)
        return FloatDistribution(float(value.start), float(value.end), log=is_log)
    raise ValueError(f"{override.input_line}: not a search space Optuna can sample (use choice, range or interval)")


def search_space(params: dict | None, arguments: list[str]) -> tuple[dict, dict]:
    """(distributions, fixed values) from the ``params`` config and the command-line overrides."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        d = distribution(override)
        if isinstance(d, str):
            fixed[key] = d
            space.pop(key, None)
        else:
            space[key] = d
            fixed.pop(key, None)
    return space, fixed


def open_storage(storage: str | None):
    """An Optuna storage from ``journal:PATH`` (a file, created with its folder), a URL, or None."""
    if not storage:
        return None
    storage = str(storage)
    if storage.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = os.path.abspath(storage[len("journal:") :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # the open(O_EXCL) lock works on NFS as well as on local disks
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        path = os.path.abspath(storage[len("sqlite:///") :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return "sqlite:///" + path
    return storage


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study) -> list[int]:
    """Mark FAIL the RUNNING trials whose process (on this host) is gone, and queue their parameters again."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR, "")
        w_host, _, pid = worker.rpartition(":")
        if w_host == host and pid.isdigit() and not _alive(int(pid)):
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            failed.append(t.number)
    if failed:
        log.info(
            "optuna: trials %s were left running by a process that is gone: marked FAIL, queued again",
            failed,
        )
    return failed


class KdrunOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any = None,
        direction: str = "maximize",
        study_name: str = "kdrun",
        storage: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        params: Any = None,
    ):
        self.sampler_cfg = sampler
        self.direction = str(direction)
        self.study_name = str(study_name)
        self.storage = storage
        self.n_trials = int(n_trials)
        self.n_jobs = max(1, int(n_jobs))
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
        self.launcher = None
        self.config: DictConfig | None = None

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _sampler(self):
        """The sampler (Hydra has usually instantiated the ``_target_`` node already)."""
        from hydra.utils import instantiate

        if isinstance(self.sampler_cfg, (DictConfig, dict)):
            return instantiate(self.sampler_cfg)
        return self.sampler_cfg

    def study(self):
        import optuna

        if self.direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={self.direction}: valid: maximize, minimize")
        return optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            sampler=self._sampler(),
            direction=self.direction,
            load_if_exists=True,
        )

    def sweep(self, arguments: list[str]) -> None:
        from optuna.trial import TrialState

        space, fixed = search_space(self.params, arguments)
        study = self.study()
        fail_stale_trials(study)
        log.info(
            "optuna: study %s in %s, %d finished trials of %d; search space %s",
            self.study_name,
            self.storage or "memory",
            _count(study, TrialState.COMPLETE),
            self.n_trials,
            list(space),
        )
        while True:
            remaining = self.n_trials - _count(study, TrialState.COMPLETE) - _count(study, TrialState.RUNNING)
            if remaining <= 0:
                break
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            for t in trials:
                t.set_user_attr(WORKER_ATTR, this_worker())
            overrides = [
                tuple(f"{k}={v}" for k, v in fixed.items()) + tuple(f"{k}={t.params[k]}" for k in space) for t in trials
            ]
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            for t, ret in zip(trials, returns, strict=True):
                try:
                    value = ret.return_value
                except Exception as e:  # noqa: BLE001 (the job failed: so does its trial, the study goes on)
                    log.warning(
                        "optuna: trial %d failed (%s: %s)",
                        t.number,
                        type(e).__name__,
                        e,
                    )
                    study.tell(t, state=TrialState.FAIL)
                    continue
                t.set_user_attr("run_dir", str(ret.working_dir))
                if value is None:
                    study.tell(t, state=TrialState.FAIL)
                else:
                    study.tell(t, float(value))
        self._write_results(study)

    def _write_results(self, study) -> None:
        from optuna.trial import TrialState

        done = _count(study, TrialState.COMPLETE)
        results = {
            "name": "optuna",
            "study_name": self.study_name,
            "storage": str(self.storage),
            "direction": self.direction,
            "n_trials_complete": done,
        }
        if done:
            best = study.best_trial
            results |= {
                "best_params": best.params,
                "best_value": best.value,
                "best_trial": best.number,
            }
        out = self.config.hydra.sweep.dir
        os.makedirs(out, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), os.path.join(out, "optimization_results.yaml"))
        if done:
            log.info("optuna: best trial %d: %s -> %s", best.number, best.params, best.value)


def _count(study, state) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))
