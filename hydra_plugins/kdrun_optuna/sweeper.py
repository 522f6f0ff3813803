"""A Hydra sweeper driving an Optuna (>= 4) study with ask/tell, stored where it survives the process.

``hydra/sweeper=kdrun_optuna`` (``kdrun train -m sweep=optuna`` selects it). The study lives in
``storage``: ``journal:PATH`` (Optuna's ``JournalStorage`` on a file; safe for several processes, also
on NFS, with the ``open`` lock) or any Optuna RDB URL (``sqlite:///optuna.db``, ``postgresql://...``);
``null`` keeps it in memory. The same command run again loads the study (``load_if_exists``) and
continues it: trial numbers go on from where it stopped, and the sweeper stops once the study holds
``n_trials`` finished trials (counting those of earlier runs and of other processes sharing the
study), so N SLURM jobs started with the same command share the budget.

A study belongs to one experiment: it records a fingerprint of the fixed (not searched) config when it
is created, and a sweep whose fixed config differs (another student, dataset, ...) or that optimises in
the other ``direction`` is refused (exit 2) rather than continuing the study of another experiment.

A process stamps its running trials every ``heartbeat_interval`` seconds (user attr
``kdrun_heartbeat``). A RUNNING trial whose process is gone is marked FAIL and its parameters are
queued again: at once when that process was on this machine, otherwise once the trial has shown no
heartbeat for ``grace_period`` seconds (a job killed on another node; the clocks of the nodes must
agree to well within ``grace_period``). With Hydra's default ``hydra.sweep.subdir`` each trial's job folder is
``hydra.sweep.dir/<trial number>`` (not the launcher's count: other processes ask trials of the same study
too), and a retry goes on in its trial's folder when that is in this sweep directory (the same
``hydra.sweep.dir`` given again), so kdrun resumes the checkpoints the stopped job left there.
A sweep directory records its study (``.optuna_study.json``); a sweep of another study into it is refused.

Failed trials do not count toward ``n_trials``, so the sweep
stops, logging why, after ``max_failures`` failed trials of its own (default ``n_trials``); the failed
jobs' FAILED notes then make ``kdrun train -m`` exit with 1, as for any sweep with failed jobs.

The search space is ``params`` (and ``-m`` sweep overrides on the command line), in Hydra's override
grammar: ``choice(a,b)`` -> categorical, ``range(lo,hi,step)`` -> int/float steps,
``interval(lo,hi)`` -> float, ``tag(int, interval(lo,hi))`` -> int, ``tag(log, interval(lo,hi))`` -> log
scale; plain values are fixed for every trial. Each trial is one Hydra job; the task's return value
is the objective (``direction``); a job that fails or returns None/NaN is a FAIL trial.
``optimization_results.yaml`` in the sweep directory holds the best trial of the whole study.
"""

# (no ``from __future__ import annotations``: Hydra executes this module outside sys.modules while it
# scans for plugins, and dataclasses cannot resolve postponed annotations there)
import hashlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
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
HEARTBEAT_ATTR = "kdrun_heartbeat"  # unix time that process last showed it still runs the trial
FINGERPRINT_ATTR = "kdrun_fingerprint"  # study attr: hash of the fixed config of the study's experiment
FIXED_CONFIG_ATTR = "kdrun_fixed_config"  # study attr: that config (JSON), to name what differs
STUDY_ID_ATTR = "kdrun_study_id"  # study attr: a random id, set once; a sweep directory records whose trials it holds
JOB_DIR_ATTR = "job_dir"  # trial attr: the folder its job runs in (a retry of a trial goes on in its folder)
STUDY_MARK = ".optuna_study.json"  # in hydra.sweep.dir: the study whose trials its job folders are
DIRECTIONS = ("maximize", "minimize")
# not part of an experiment's identity: where outputs go, how they are logged, and the trainer settings that do
# not change the result (kdrun.stages.RESUME_IGNORED_TRAINER, as for resuming a run); sweep.metric does count
FINGERPRINT_IGNORED = ("hydra", "paths", "logger", "store")


@dataclass
class KdrunOptunaSweeperConf:
    _target_: str = "hydra_plugins.kdrun_optuna.sweeper.KdrunOptunaSweeper"
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    direction: str = "maximize"  # maximize | minimize
    study_name: str = "kdrun"
    storage: Any = None  # journal:PATH | an Optuna RDB URL | null (in memory)
    n_trials: int = 20  # finished trials the study should hold (all runs and processes together)
    n_jobs: int = 1  # trials launched at a time by this process (its launcher runs them)
    max_failures: int | None = None  # failed trials after which this process stops (int >= 1); null: n_trials
    heartbeat_interval: float = 60.0  # seconds between the stamps a process puts on its running trials
    grace_period: float = 600.0  # a RUNNING trial without a stamp for this long is failed and queued again
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


def _last_seen(trial) -> float:
    """Unix time of the last sign of life of a RUNNING trial: its heartbeat, else its start."""
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if isinstance(beat, (int, float)):
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


def fail_stale_trials(study, grace_period: float | None = None) -> list[int]:
    """Mark FAIL the RUNNING trials whose process is gone, and queue their parameters again: a process of
    this host that no longer exists, or (any host) no heartbeat for more than ``grace_period`` seconds."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host, now = socket.gethostname(), time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR, "")
        w_host, _, pid = worker.rpartition(":")
        gone = w_host == host and pid.isdigit() and not _alive(int(pid))
        silent = grace_period is not None and now - _last_seen(t) > grace_period
        if not (gone or silent):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (UpdateFinishedTrialError, ValueError):  # another process finished or failed it meanwhile
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        failed.append(t.number)
    if failed:
        log.info(
            "optuna: trials %s were left running by a process that is gone (or silent for more than "
            "hydra.sweeper.grace_period=%gs): marked FAIL, queued again",
            failed,
            grace_period,
        )
    return failed


class Heartbeat:
    """While in the ``with`` block, a daemon thread stamps ``HEARTBEAT_ATTR`` (unix time) on ``trials`` every
    ``interval`` seconds, so processes elsewhere can tell them from trials of a process that has died."""

    def __init__(self, trials: list, interval: float):
        self.trials, self.interval = trials, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdrun-optuna-heartbeat", daemon=True)

    def beat(self) -> None:
        now = time.time()
        for t in self.trials:
            try:
                t.set_user_attr(HEARTBEAT_ATTR, now)
            except Exception:  # noqa: BLE001 (finished meanwhile, or the storage hiccuped: the next beat retries)
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _drop(tree: dict, key: str) -> None:
    """Remove a dotted key from nested dicts (nothing when it is not there)."""
    *parents, leaf = key.split(".")
    node: Any = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def _flat(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def fixed_config(config: DictConfig, space: dict, fixed_params: dict) -> dict:
    """What makes an experiment: the task config less ``FINGERPRINT_IGNORED``, the trainer's
    ``RESUME_IGNORED_TRAINER`` and the searched keys, plus the fixed values of ``params`` (the jobs get them as
    overrides). Interpolations are kept as written."""
    tree = OmegaConf.to_container(
        OmegaConf.masked_copy(config, [str(k) for k in config if k not in FINGERPRINT_IGNORED]),
        resolve=False,
        enum_to_str=True,
    )
    assert isinstance(tree, dict)
    if isinstance(tree.get("trainer"), dict):
        from kdrun.stages import RESUME_IGNORED_TRAINER

        tree["trainer"] = {k: v for k, v in tree["trainer"].items() if k not in RESUME_IGNORED_TRAINER}
    for key in space:
        _drop(tree, key)
    tree = json.loads(json.dumps(tree, sort_keys=True, default=str))
    if fixed_params:
        tree["hydra.sweeper.params"] = {k: str(v) for k, v in sorted(fixed_params.items())}
    return tree


def fingerprint(tree: dict) -> str:
    return hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _differences(ours: dict, theirs: dict, limit: int = 3) -> str:
    a, b = _flat(ours), _flat(theirs)
    missing = object()
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
    shown = [f"{k}: {_show(b, k)} there, {_show(a, k)} here" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more


def _show(flat: dict, key: str) -> str:
    return "(unset)" if key not in flat else str(flat[key])[:60]


def refuse(msg: str) -> None:
    """Bad input to the sweeper: one line ``kdrun: error: ...`` and exit 2, as ``kdrun``'s own checks (a traceback
    with HYDRA_FULL_ERROR=1). Called before the sweep launches anything."""
    from kdrun.errors import ConfigError

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise ConfigError(msg)
    sys.stdout.flush()
    print(f"kdrun: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(ConfigError.exit_code)


def _quoted(value: str) -> str:
    """``value`` as one quoted string of Hydra's override grammar (a path may hold spaces, commas, ``=``)."""
    return "'" + value.replace("'", "\\'") + "'"


def job_dir(study, trial, sweep_dir: str) -> str:
    """The folder of ``trial``'s job: ``SWEEP_DIR/<trial number>``, except for a retry of a trial whose process
    is gone (``retry_of``): that trial's folder when it is in this sweep directory (the same hydra.sweep.dir given
    again, as a requeued job does), so kdrun resumes its checkpoints there instead of training from scratch. One
    in another sweep directory (the default one is new each time) is not: this sweep's report and exit code
    cover the runs of its own directory."""
    retry_of = trial.user_attrs.get("retry_of")
    if isinstance(retry_of, int):
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number == retry_of]
        before = earlier[0].user_attrs.get(JOB_DIR_ATTR) if earlier else None
        if isinstance(before, str) and os.path.isdir(before) and os.path.dirname(before) == sweep_dir:
            return before
    return os.path.join(sweep_dir, str(trial.number))


class KdrunOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any = None,
        direction: str = "maximize",
        study_name: str = "kdrun",
        storage: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failures: int | None = None,
        heartbeat_interval: float = 60.0,
        grace_period: float = 600.0,
        params: Any = None,
    ):
        self.sampler_cfg = sampler
        self.direction = str(getattr(direction, "value", direction))
        self.study_name = str(study_name)
        self.storage = storage
        self.n_trials = int(n_trials)
        self.n_jobs = max(1, int(n_jobs))
        self.max_failures = max(1, self.n_trials) if max_failures is None else int(max_failures)
        self.heartbeat_interval = float(heartbeat_interval)
        self.grace_period = float(grace_period)
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

    def check_settings(self) -> None:
        """Refuse (one line, exit 2) settings that cannot work, before the study is opened."""
        if self.direction not in DIRECTIONS:
            refuse(f"hydra.sweeper.direction={self.direction}: unknown direction; valid: {', '.join(DIRECTIONS)}")
        if self.max_failures < 1:
            refuse(f"hydra.sweeper.max_failures={self.max_failures}: must be >= 1 (null: n_trials)")
        if not self.heartbeat_interval > 0 or not self.grace_period > self.heartbeat_interval:
            refuse(
                f"hydra.sweeper.grace_period={self.grace_period:g}: must exceed "
                f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval:g} (> 0), or live trials would be "
                "taken for dead ones"
            )

    def study(self):
        import optuna

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "created"/"using an existing study": sweep() logs it
        try:
            study = optuna.create_study(
                study_name=self.study_name,
                storage=open_storage(self.storage),
                sampler=self._sampler(),
                direction=self.direction,
                load_if_exists=True,
            )
        finally:
            optuna.logging.set_verbosity(verbosity)
        if study.trials:  # a study continued: the seeded sampler would propose its first trials over again
            study.sampler.reseed_rng()
        return study

    def check_experiment(self, study, space: dict, fixed: dict) -> None:
        """The study must be this experiment's: the same fixed config (recorded by the sweep that created the
        study; a study without the record adopts this one's) and the same direction; else refuse."""
        fixed_params = {k: fixed[k] for k in (self.params or {}) if k in fixed}
        ours = fixed_config(self.config, space, fixed_params) if self.config is not None else {}
        where = f"study {self.study_name} in {self.storage or 'memory'}"
        hint = "give this sweep its own study with hydra.sweeper.study_name=NAME (or another hydra.sweeper.storage)"
        theirs = study.user_attrs.get(FINGERPRINT_ATTR)
        if theirs is None:  # a new study (or one made before kdrun recorded this): it is this experiment's now
            if study.trials:
                log.info("optuna: %s had no record of its experiment: it now holds this sweep's", where)
            study.set_user_attr(FINGERPRINT_ATTR, fingerprint(ours))
            study.set_user_attr(FIXED_CONFIG_ATTR, json.dumps(ours, sort_keys=True))
        elif theirs != fingerprint(ours):
            try:
                diff = _differences(ours, json.loads(study.user_attrs.get(FIXED_CONFIG_ATTR, "{}")))
            except (TypeError, ValueError):
                diff = ""
            refuse(
                f"hydra.sweeper.study_name={self.study_name}: {where} belongs to an experiment with another "
                f"fixed config ({diff or 'fingerprint ' + str(theirs)}); its trials do not apply here: {hint}"
            )
        if study.direction.name.lower() != self.direction:
            refuse(
                f"hydra.sweeper.direction={self.direction}: {where} was made to "
                f"{study.direction.name.lower()} its objective; {hint}"
            )

    def names_job_folders(self) -> bool:
        """True when job folders are Hydra's default ``hydra.sweep.subdir=${hydra.job.num}``: the sweeper then names
        each by its trial number (and a retry by its trial's); a subdir of the user's own is left to Hydra."""
        sweep = self.config.hydra.sweep if self.config is not None else None
        return sweep is not None and OmegaConf.to_container(sweep, resolve=False).get("subdir") == "${hydra.job.num}"

    def claim_sweep_dir(self, study, sweep_dir: str) -> None:
        """A sweep directory holds the job folders of one study, named by trial number: refuse one that holds another
        study's (or another sweep's) runs, before Hydra rewrites their ``.hydra/`` and a new trial 0 meets an old
        run in ``0/``; record this study's id in a new one."""
        import uuid

        from kdrun import io

        ours = study.user_attrs.get(STUDY_ID_ATTR)
        if ours is None:
            study.set_user_attr(STUDY_ID_ATTR, uuid.uuid4().hex)
            ours = study.user_attrs.get(STUDY_ID_ATTR)  # as stored: processes started together each set one
        mark = os.path.join(sweep_dir, STUDY_MARK)
        hint = "give this sweep its own hydra.sweep.dir"
        where = str(self.storage or "memory")
        held = self._others_runs(study, sweep_dir)
        if os.path.exists(mark):
            try:
                with open(mark) as f:
                    theirs = json.load(f)
            except (OSError, ValueError):
                theirs = {}
            if theirs.get("study_id") == ours:
                return
            same = theirs.get("study_name") == self.study_name and theirs.get("storage") == where
            if same and self.storage and not held:  # processes that made the study together: the id it kept
                io.write_json({"study_id": ours, "study_name": self.study_name, "storage": where}, mark)
                return
            why = (
                "an in-memory study (hydra.sweeper.storage=null) is a new one each time"
                if same and not self.storage
                else "the study was made again since (its storage deleted?)"
                if same
                else f"not of study {self.study_name} in {where}"
            )
            refuse(
                f"hydra.sweep.dir={sweep_dir}: holds the trials of study {theirs.get('study_name', '?')} in "
                f"{theirs.get('storage', '?')}, {why} (job folders are named by trial number); {hint}"
            )
        if held:
            refuse(
                f"hydra.sweep.dir={sweep_dir}: holds runs of another sweep ({', '.join(sorted(held)[:3])}"
                f"{', ...' if len(held) > 3 else ''}), and study {self.study_name} names its job folders by trial "
                f"number; {hint}"
            )
        os.makedirs(sweep_dir, exist_ok=True)
        io.write_json({"study_id": ours, "study_name": self.study_name, "storage": where}, mark)

    @staticmethod
    def _others_runs(study, sweep_dir: str) -> list[str]:
        """The run folders in ``sweep_dir`` that are no trial's of ``study``."""
        # folders of this study's trials are its own (a study swept here before sweeps recorded themselves)
        mine = {
            os.path.abspath(str(t.user_attrs[a]))
            for t in study.get_trials(deepcopy=False)
            for a in ("run_dir", JOB_DIR_ATTR)
            if t.user_attrs.get(a)
        }
        return [
            e.name
            for e in (os.scandir(sweep_dir) if os.path.isdir(sweep_dir) else [])
            if e.is_dir()
            and os.path.abspath(e.path) not in mine
            and any(os.path.exists(os.path.join(e.path, f)) for f in (".hydra", "checkpoints"))
        ]

    def sweep(self, arguments: list[str]) -> None:
        from optuna.trial import TrialState

        self.check_settings()
        space, fixed = search_space(self.params, arguments)
        study = self.study()
        self.check_experiment(study, space, fixed)
        sweep_dir = os.path.abspath(str(self.config.hydra.sweep.dir)) if self.config is not None else ""
        own_folders = self.names_job_folders()
        if own_folders:
            self.claim_sweep_dir(study, sweep_dir)
        log.info(
            "optuna: study %s in %s, %d finished trials of %d; search space %s",
            self.study_name,
            self.storage or "memory",
            _count(study, TrialState.COMPLETE),
            self.n_trials,
            list(space),
        )
        failures = 0
        while True:
            fail_stale_trials(study, self.grace_period)
            running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            remaining = self.n_trials - _count(study, TrialState.COMPLETE) - len(running)
            if remaining <= 0:
                if running:
                    log.info(
                        "optuna: trials %s run in other processes and count toward n_trials=%d (one that shows "
                        "no heartbeat for hydra.sweeper.grace_period=%gs is failed and run again)",
                        running,
                        self.n_trials,
                        self.grace_period,
                    )
                break
            if failures >= self.max_failures:
                log.error(
                    "optuna: stopped after %d failed trials (hydra.sweeper.max_failures=%d); the study holds %d "
                    "finished trials of n_trials=%d; the FAILED note of each job says why",
                    failures,
                    self.max_failures,
                    _count(study, TrialState.COMPLETE),
                    self.n_trials,
                )
                break
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining, self.max_failures - failures))]
            folders = []
            for t in trials:
                t.set_user_attr(WORKER_ATTR, this_worker())
                if own_folders:  # the trial's number, not the launcher's count (other processes ask trials too)
                    folders.append(job_dir(study, t, sweep_dir))
                    t.set_user_attr(JOB_DIR_ATTR, folders[-1])
                    if folders[-1] != os.path.join(sweep_dir, str(t.number)):
                        log.info("optuna: trial %d goes on in %s (its earlier run there)", t.number, folders[-1])
            overrides = [
                tuple(f"{k}={v}" for k, v in fixed.items())
                + tuple(f"{k}={t.params[k]}" for k in space)
                + (
                    (
                        f"hydra.sweep.dir={_quoted(os.path.dirname(folders[i]))}",
                        f"hydra.sweep.subdir={_quoted(os.path.basename(folders[i]))}",
                    )
                    if own_folders
                    else ()
                )
                for i, t in enumerate(trials)
            ]
            with Heartbeat(trials, self.heartbeat_interval):
                returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            for t, ret in zip(trials, returns, strict=True):
                if not _tell(study, t, ret):
                    failures += 1
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
                # its run's folder (a retry runs in the folder of the trial it retries, not one of its number)
                "best_run_dir": best.user_attrs.get("run_dir", best.user_attrs.get(JOB_DIR_ATTR)),
            }
        out = self.config.hydra.sweep.dir
        os.makedirs(out, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), os.path.join(out, "optimization_results.yaml"))
        if done:
            log.info("optuna: best trial %d: %s -> %s", best.number, best.params, best.value)


def _count(study, state) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def _tell(study, trial, ret) -> bool:
    """Tell the study a job's outcome: its objective, or FAIL when the job failed or returned None/NaN.
    True when the trial is COMPLETE."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        value = ret.return_value
        value = None if value is None else float(value)
    except Exception as e:  # noqa: BLE001 (the job failed: so does its trial, the study goes on)
        log.warning("optuna: trial %d failed (%s: %s)", trial.number, type(e).__name__, e)
        value = None
    ok = value is not None and math.isfinite(value)
    try:
        run_dir = (
            OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if getattr(ret, "hydra_cfg", None) else None
        )
        if run_dir:  # the job's own folder (its working_dir is where the sweep was launched: chdir is off)
            trial.set_user_attr("run_dir", str(run_dir))
        if ok:
            study.tell(trial, value)
        else:
            study.tell(trial, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, ValueError) as e:  # failed as stale by another process meanwhile
        log.warning("optuna: trial %d was already finished elsewhere (%s); its result is not recorded", trial.number, e)
        return False
    return ok
