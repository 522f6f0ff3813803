"""The ``kdrun`` command: ``kdrun COMMAND [hydra overrides...]``.

``kdrun train`` composes the config and validates it (every value of a sweep
too) *before* Hydra creates a run directory, so bad input exits with code 2,
one line and nothing on disk. Errors print a traceback only with
HYDRA_FULL_ERROR=1.
"""

from __future__ import annotations

import difflib
import os
import sys

USAGE = """usage: kdrun COMMAND [ARGS...]

commands:
  train [OVERRIDES...]      teacher -> logit cache -> distilled student -> report
                            (e.g. kdrun train teacher=resnet50 student=mbv2 loss.temperature=8;
                             add -m to sweep: kdrun train -m loss.temperature=1,4,8;
                             kdrun train resume=RUN_DIR continues an interrupted run)
  models [NAME] [dataset=D] list the model zoo, or one model's report
  report DIR                write report.md/report.csv/plots for a run, a sweep or a tree of them
  compare RUN_A RUN_B       two runs' models image by image: top-1 difference, its 95% interval and
                            the exact McNemar test (on the validation split when both hold one)
  store ls|gc               list or clean the artifact store of trained teachers and logit caches
  export RUN_DIR [format=onnx|torchscript] [quantize=int8] [models=student,teacher]
                            ONNX/TorchScript (+int8) files with parity, top-1 and latency

`kdrun train --help` shows the config groups and their options."""

CONFIG_MODULE = "kdrun.configs"
EXIT_SWEEP_FAILED = 1  # some jobs of a multirun failed (the others ran; report.md lists both)
EXIT_BROKEN_PIPE = 141  # the reader of stdout closed it (128 + SIGPIPE, as a shell reports such a command)
# Hydra flags that take a value (skipped when collecting overrides)
_FLAGS_WITH_VALUE = {
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--config-dir",
    "-cd",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "-i",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
}


def fail(msg: str, code: int = 2) -> int:
    if not other_worker():  # every worker of a launcher refuses the same input: the first says so for all
        print(f"kdrun: error: {msg}", file=sys.stderr)
    return code


def other_worker() -> bool:
    """Whether this process is a worker a launcher started other than the first on its machine (torchrun's
    ``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``, SLURM's ``SLURM_LOCALID`` of its tasks), known before any process group
    is joined: the first of each machine speaks for the others there (what one meets, a missing file, an
    unwritable folder, they meet too); a ``LOCAL_RANK`` alone (a user's own variable) is no launcher's."""

    def above_0(rank: str, count: str) -> bool:
        r, n = os.environ.get(rank, ""), os.environ.get(count, "")
        return r.isdigit() and n.isdigit() and int(n) > 1 and int(r) > 0

    return above_0("LOCAL_RANK", "LOCAL_WORLD_SIZE") or above_0("SLURM_LOCALID", "SLURM_NTASKS")


def devices_under_launcher(workers: int, devices: int) -> str | None:
    """Why ``trainer.devices`` cannot spawn workers of its own in a process a launcher started (None: it can)."""
    if workers > 1 and devices > 1:
        return (
            f"trainer.devices={devices}: a launcher (torchrun, SLURM) started {workers} workers already; keep "
            "trainer.devices=1 and set their number there (torchrun --nproc-per-node, SLURM tasks)"
        )
    return None


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def split_args(args: list[str]) -> tuple[list[str], str]:
    """(overrides, config name) from ``kdrun train`` arguments."""
    overrides, config_name, skip = [], "train", False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in ("-cn", "--config-name") and i + 1 < len(args):
            config_name = args[i + 1]
        if a in _FLAGS_WITH_VALUE:
            skip = True
        elif a.startswith("--config-name="):
            config_name = a.split("=", 1)[1]
        elif not a.startswith("-"):
            overrides.append(a)
    return overrides, config_name


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Override lists to check: each value of each sweep once (others at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # interval/glob sweeps (Optuna): checked by the sweeper
                continue
            choices.append([f"{o.get_key_element()}={v}" for v in values])
        else:
            choices.append([str(o.input_line)])
    points = [[c[0] for c in choices]]
    for i, c in enumerate(choices):
        for v in c[1:]:
            points.append([x[0] if j != i else v for j, x in enumerate(choices)])
    return points


def _first_sweep(overrides: list[str]) -> str | None:
    """The first override that gives several values (``loss=kd,dkd``), as typed; None without one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return next(
        (str(o.input_line) for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()),
        None,
    )


def compose(overrides: list[str], config_name: str = "train", with_hydra: bool = False):
    """The composed config (with the ``hydra`` node too when ``with_hydra``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)


def one_line(e: Exception, overrides: list[str], config_name: str) -> str:
    """A Hydra composition error as one line naming the key and what is valid."""
    from hydra.errors import MissingConfigException

    msg = str(e)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        options = e.options or _group_options(group)  # options of a list-valued group (logger=[a,b])
        if group and options:
            guess = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
            hint = f"did you mean {group}={guess[0]}? " if guess else ""
            return f"{group}={option}: unknown option; {hint}valid: {', '.join(sorted(options))}"
    key = _unknown_key(e)
    if key and key.startswith("hydra.sweeper.params."):  # its keys hold dots: Hydra cannot address one of them
        return (
            f"{key}: hydra.sweeper.params' keys hold dots, so no override can address one; give the key as a sweep "
            "override ('loss.temperature=choice(1,2,4,8)') or set params entries with quoted values "
            "('hydra.sweeper.params={loss.temperature:\"choice(1,2,4,8)\"}')"
        )
    if key:
        parent = key.rpartition(".")[0]

        def touches(o: str) -> bool:
            # the bad override itself, one that sets the key's parent whole, or a sibling (which may be unknown too)
            k = o.split("=")[0].lstrip("+~")
            return k == key or key.startswith(k + ".") or k.startswith((parent or key) + ".")

        def chooses_group(o: str) -> bool:  # loss=crd: keys come from the option chosen, so keep it
            k, _, v = o.partition("=")
            return bool(_group_options(k.lstrip("+~"))) and not v.lstrip().startswith("{")

        kept = [o for o in overrides if chooses_group(o) or not touches(o)]
        base = OVERLAYS.get(parent)
        if base:  # an overlay starts empty: its keys are those of base, added with '+'
            keys = _overlay_keys(base, kept, config_name)
            if key.rpartition(".")[2] in keys or not keys:
                given = next((o for o in overrides if o.split("=")[0] == key), f"{key}=...")
                why = f"{parent} holds only the {base}.* keys it overrides, and not this one yet"
                return f"{key}: {why}: add it with +{given}"
            return f"{key}: unknown key; {parent} takes the keys of {base}: {', '.join(keys)}"
        head, _, rest = key.partition(".")
        option = rest.partition(".")[0]
        chosen = _keys_of("logger", kept, config_name).split(", ") if head == "logger" else []
        if head == "logger" and option in _group_options("logger") and option not in chosen:  # a tracker not chosen
            named = [o.split("=")[0].lstrip("+~") for o in overrides]
            given = next((k for k in named if k == key or k.startswith(key + ".")), key)
            return f"{given}: the {option} logger is not selected; add it to the list (e.g. logger=[csv,{option}])"
        valid = _keys_of(parent, kept, config_name)
        where = f" of {parent}" if parent else ""
        meant = _did_you_mean(key, valid, kept, config_name)
        if meant:  # a typo (loss.temprature) or a key in its group's place (epochs=3): not one to add with '+'
            return f"{key}: unknown key; did you mean {meant}? valid keys{where}: {valid}"
        if parent in ("trainer", "teacher", "student"):  # their keys are what kdrun reads: none can be added
            return f"{key}: unknown key; valid keys{where}: {valid}"
        return f"{key}: unknown key; valid keys{where}: {valid} (use +{key}=... to add a new one)"
    first = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(first[:2]) if first else type(e).__name__


def _unresolved(e: Exception) -> str:
    """``loss.temperature: Interpolation key 'oops' not found ...``: an OmegaConf error met reading a key."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    key = getattr(e, "full_key", None)
    return f"{key}: {first}; give a value, or an interpolation of a key that exists" if key else first


# mappings that start empty and take the keys of another node, for one stage: a key is added with '+'
OVERLAYS = {"teacher.optim": "optim", "teacher.augment": "dataset.augment"}


def _overlay_keys(base: str, overrides: list[str], config_name: str) -> list[str]:
    """The keys an overlay of ``base`` takes: ``base``'s in this config (an augmentation's: every option)."""
    keys = set(_keys_of(base, overrides, config_name).split(", ")) - {"?", "none (an empty mapping)"}
    if base == "dataset.augment":
        from dataclasses import fields

        from kdrun.data.transforms import Augment

        keys |= {f.name for f in fields(Augment)}
    return sorted(keys)


def _unknown_key(e: Exception) -> str | None:
    """The key an override names that the config does not have, from the OmegaConf error Hydra chains."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return str(cause.full_key)
    return None


def _group_options(group: str) -> list[str]:
    from importlib.resources import files

    folder = files(CONFIG_MODULE).joinpath(group)
    return [f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml")] if folder.is_dir() else []


def _did_you_mean(key: str, valid: str, overrides: list[str], config_name: str) -> str | None:
    """The key ``key`` was probably meant to be: a close spelling among its parent's ``valid`` keys
    (``loss.temprature`` -> ``loss.temperature``), or, for a top-level key, a group's key of that name
    (``epochs`` -> ``trainer.epochs``); None when nothing is close."""
    from omegaconf import DictConfig

    parent, _, name = key.rpartition(".")
    guess = difflib.get_close_matches(name, [k.strip() for k in valid.split(",")], n=1, cutoff=0.75)
    if guess:
        return f"{parent}.{guess[0]}" if parent else guess[0]
    if parent:
        return None
    try:
        cfg = compose(overrides, config_name)
    except Exception:  # noqa: BLE001 (no suggestion rather than another error)
        return None
    groups = [str(g) for g in cfg if isinstance(cfg[g], DictConfig) and name in cfg[g]]
    return f"{groups[0]}.{name}" if len(groups) == 1 else None


def _keys_of(parent: str, overrides: list[str], config_name: str) -> str:
    from omegaconf import DictConfig, OmegaConf

    try:
        cfg = compose(overrides, config_name, with_hydra=parent.split(".")[0] == "hydra")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig):
            return ", ".join(sorted(str(k) for k in node.keys())) or "none (an empty mapping)"
    except Exception:
        pass
    return "?"


def precheck(overrides: list[str], config_name: str, multirun: bool = False) -> None:
    """Compose and validate every point of the requested run or sweep; raise KdrunError on bad input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from kdrun import plugins
    from kdrun.config import validate
    from kdrun.errors import ConfigError

    try:
        points = sweep_points(overrides)
    except HydraException as e:
        raise ConfigError(one_line(e, overrides, config_name)) from e
    swept = None if multirun else _first_sweep(overrides)
    if swept:  # Hydra's own answer is a paragraph and exit code 1
        key, _, values = swept.partition("=")
        plain = "" if "(" in values else f", or give a list as {key}=[{values}] or a string as {key}='{values}'"
        raise ConfigError(f"{swept}: several values are a sweep: add -m (kdrun train -m {swept} ...){plain}")
    for i, point in enumerate(points):
        try:
            cfg = compose(point, config_name, with_hydra=i == 0)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(one_line(e, point, config_name)) from e
        plugins.load(cfg.get("plugins"))  # their models and methods, before the names are checked
        try:
            validate(cfg)
        except OmegaConfBaseException as e:  # an interpolation to nothing (loss.temperature='${oops}')
            raise ConfigError(_unresolved(e)) from e
        if i == 0:
            check_writable(cfg, multirun)
            if multirun:
                check_objective(cfg)
                check_sweep_dir(cfg, overrides)
            else:
                check_launched_run_dir(cfg)
                check_resumable(cfg)


def check_launched_run_dir(cfg) -> None:
    """Workers a launcher started (torchrun, SLURM tasks) must be given their run's folder: each resolves the default
    ``${now:...}`` itself, and workers that start on either side of a second write two folders and fail. Their
    number is the launcher's: ``trainer.devices`` stays 1."""
    from omegaconf import OmegaConf

    from kdrun import distributed
    from kdrun.errors import ConfigError

    workers = distributed.launched_workers()
    if why := devices_under_launcher(workers, int(cfg.trainer.get("devices") or 1)):  # it was ignored
        raise ConfigError(why)
    if workers > 1 and "${now:" in OmegaConf.to_yaml(cfg.hydra.run):  # hydra.run holds only dir, unresolved
        raise ConfigError(
            f"hydra.run.dir: {workers} workers started by a launcher need it given (hydra.run.dir=DIR, or resume=DIR): "
            "each would name its own time-stamped folder"
        )


def check_objective(cfg) -> None:
    """A sweeper that optimises (Optuna) needs the validation split its objective ``sweep.metric`` is measured on."""
    from omegaconf import OmegaConf

    from kdrun.errors import ConfigError

    sweeper = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or "")
    if sweeper and not sweeper.endswith("BasicSweeper") and not float(cfg.trainer.val_fraction) > 0:
        metric = OmegaConf.select(cfg, "sweep.metric", default=None)
        raise ConfigError(
            f"trainer.val_fraction={cfg.trainer.val_fraction}: this sweeper maximises "
            f"sweep.metric={metric}, measured on a validation split held out of the training data; "
            "set trainer.val_fraction > 0 (e.g. 0.1)"
        )


def check_sweep_dir(cfg, overrides: list[str]) -> None:
    """A sweep into a ``hydra.sweep.dir`` that holds runs: job N's directory is ``N/``, so each run there must be
    the one the new sweep's job N is (the same sweep, continued). Refuse any other before Hydra rewrites its
    ``.hydra/`` and the job sets its ``metrics.json`` aside. BasicSweeper only: other sweepers number their own."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from kdrun.errors import ConfigError
    from kdrun.io import load_yaml

    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    sweeper = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or "")
    if not sweeper.endswith("BasicSweeper") or not isinstance(sweep, dict) or sweep.get("subdir") != "${hydra.job.num}":
        return
    try:
        sweep_dir = str(cfg.hydra.sweep.dir)
    except Exception:  # interpolations that need a running job: a fresh directory
        return
    if not os.path.isdir(sweep_dir):
        return
    parsed = OverridesParser.create().parse_overrides(overrides)
    task = [o for o in parsed if not o.get_key_element().lstrip("+~").startswith("hydra.")]
    jobs = [job for batch in BasicSweeper.split_arguments(task, None) for job in batch]
    for num, job in enumerate(jobs):
        job_dir = os.path.join(sweep_dir, str(num))
        if not any(os.path.exists(os.path.join(job_dir, f)) for f in ("checkpoints", "metrics.json")):
            continue
        path = os.path.join(job_dir, ".hydra", "overrides.yaml")
        had = [str(o) for o in load_yaml(path)] if os.path.exists(path) else None
        if had is None or sorted(had) != sorted(job):  # the same overrides in another order make the same run
            theirs = " ".join(o for o in had or [] if o not in job) or "other overrides"
            ours = " ".join(o for o in job if o not in (had or [])) or "those alone"
            order = ""
            if had is not None and sorted(had) in [sorted(j) for j in jobs]:
                order = " (the same sweep with its arguments in another order: Hydra numbers the jobs in that order)"
            raise ConfigError(
                f"hydra.sweep.dir={sweep_dir}: job {num} there is a run of {theirs}, not of {ours}{order}; rerun "
                "that sweep as it was, or give a new hydra.sweep.dir"
            )


def check_resumable(cfg) -> None:
    """A run directory with stage checkpoints is continued only by the configuration that made them. Refuse any
    other now: once Hydra starts the job it rewrites the directory's ``.hydra/`` with the new overrides, so a refusal
    from the stage itself (:class:`kdrun.errors.ResumeRefused`) would leave the run described by a configuration
    that did not make it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    from kdrun import distributed, runlock
    from kdrun.errors import ConfigError
    from kdrun.task import keep_finished_run

    try:
        run_dir = str(cfg.hydra.run.dir)
    except InterpolationKeyError as e:  # hydra.run.dir=/x/${oops}
        raise ConfigError(_unresolved(e)) from e
    except Exception:  # interpolations that need a running job: a fresh directory
        return
    runlock.check_free(run_dir)
    _check_checkpoints(cfg, run_dir)
    # a folder named by the command (not ${now:...}, which Hydra resolves again, perhaps a second later) is taken
    # before Hydra writes its .hydra/, so a second command there is refused before it rewrites them; the workers a
    # launcher started share it: their rank 0 takes it later
    named = "${now:" not in OmegaConf.to_yaml(cfg.hydra.run) or os.path.isdir(run_dir)
    if named and distributed.launched_workers() <= 1:
        runlock.take(run_dir)
    keep_finished_run(run_dir)


def _check_checkpoints(cfg, run_dir: str) -> None:
    """ConfigError when ``run_dir``'s stage checkpoints were made by another configuration or worker count."""
    from omegaconf import OmegaConf

    from kdrun import distributed
    from kdrun.engine import workers_changed
    from kdrun.errors import ConfigError
    from kdrun.io import load_checkpoint
    from kdrun.stages import resume_fingerprints

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    lasts = sorted(f for f in os.listdir(ckpt_dir) if f.endswith("_last.pt")) if os.path.isdir(ckpt_dir) else []
    if not lasts:
        return
    fingerprints = resume_fingerprints(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    # the workers this command will run: the launcher's (torchrun, SLURM), else those trainer.devices spawns
    launched = distributed.launched_workers()
    workers = launched if launched > 1 else int(cfg.trainer.get("devices") or 1)
    for name in lasts:
        ckpt = load_checkpoint(os.path.join(ckpt_dir, name))
        stage = name.removesuffix("_last.pt")
        if ckpt is not None and ckpt.get("workers", workers) != workers:
            raise ConfigError(
                f"hydra.run.dir={run_dir}: checkpoints/{name} was {workers_changed(ckpt['workers'], workers)}"
            )
        if ckpt is not None and ckpt.get("fingerprint") not in [f"{f}-{stage}" for f in fingerprints]:
            if _same_overrides(cfg, run_dir):  # the run as it was: the kdrun that trains it has changed
                raise ConfigError(
                    f"hydra.run.dir={run_dir}: checkpoints/{name} was made by a kdrun that trained this configuration "
                    "differently (another version); it cannot be continued by this one: give a new hydra.run.dir to "
                    "start the run over"
                )
            raise ConfigError(
                f"hydra.run.dir={run_dir}: checkpoints/{name} was made by a different configuration"
                f"{_changes(cfg, run_dir)}; continue the run as it was (kdrun train resume={run_dir}) or give a new "
                "hydra.run.dir"
            )


def _changes(cfg, run_dir: str) -> str:
    """`` (loss.temperature: 4.0 -> 8.0)``: what differs from the configuration the run saved (the first three);
    ``""`` when it saved none, or nothing that a checkpoint keeps differs (another kdrun's defaults)."""
    from omegaconf import DictConfig, OmegaConf

    from kdrun.io import load_yaml
    from kdrun.stages import resume_changes

    try:
        saved = load_yaml(os.path.join(run_dir, ".hydra", "config.yaml"))
        changes = resume_changes(saved, OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except Exception:  # noqa: BLE001 (no saved config, or one that no longer resolves: the message without it)
        return ""
    if not isinstance(saved, DictConfig) or not changes:
        return ""
    more = f", and {len(changes) - 3} more" if len(changes) > 3 else ""
    return f" ({'; '.join(changes[:3])}{more})"


def _same_overrides(cfg, run_dir: str) -> bool:
    """Whether ``cfg`` is composed from the overrides ``run_dir`` saved (in any order)."""
    from kdrun.io import load_yaml

    try:
        saved = load_yaml(os.path.join(run_dir, ".hydra", "overrides.yaml"))
        return sorted(map(str, saved)) == sorted(map(str, cfg.hydra.overrides.task))
    except Exception:  # noqa: BLE001 (no saved overrides, or none composed: not the same run)
        return False


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_writable(cfg, multirun: bool) -> None:
    """The run (or sweep) directory of ``cfg`` (composed with its ``hydra`` node) must be creatable: its nearest
    existing parent must be writable; so must the artifact store's (``store.dir``, which takes a lock file even to
    read an entry)."""
    from kdrun.errors import ConfigError
    from kdrun.io import can_create_in

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        out = str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
    except Exception:  # interpolations that need a running job: Hydra will report them
        return
    parent = _nearest_existing(out)
    if not can_create_in(parent):
        raise ConfigError(
            f"{key}={out}: cannot create the output directory ({parent} is not writable); "
            f"choose another with {key}=PATH"
        )
    try:
        store = str(cfg.store.dir) if cfg.store.enabled else None
    except Exception:  # an interpolation of the running job
        return
    if store is None:
        return
    from kdrun.store import KINDS

    kinds = [os.path.join(store, k) for k in KINDS if os.path.isdir(os.path.join(store, k))]
    for where in [_nearest_existing(store), *kinds]:  # lock files go into the kinds' folders
        if not can_create_in(where):
            raise ConfigError(
                f"store.dir={store}: cannot write the artifact store there ({where} is not writable, and the store "
                "takes a lock file even to read an entry); give a writable store.dir=PATH, or store.enabled=false"
            )


def expand_resume(args: list[str]) -> list[str]:
    """``resume=RUN_DIR``: the run's own overrides, in its own directory (then any further overrides)."""
    from kdrun.errors import ConfigError

    rest = [a for a in args if not a.startswith("resume=")]
    dirs = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    if not dirs:
        return args
    run_dir = dirs[-1]
    if len({os.path.abspath(d) for d in dirs}) > 1:
        raise ConfigError(f"resume={dirs[0]} resume={dirs[1]}: give one run directory to continue")
    if any(a in ("-m", "--multirun") for a in args):  # a multirun ignores hydra.run.dir: it would start anew
        raise ConfigError(
            f"resume={run_dir}: continues one run; to continue a sweep, give its command again with -m and "
            "hydra.sweep.dir=SWEEP_DIR (each job resumes in its own directory)"
        )
    if not os.path.isdir(run_dir):
        raise ConfigError(f"resume={run_dir}: no such directory")
    here = os.path.abspath(run_dir)
    elsewhere = [
        a for a in rest if a.lstrip("+~").startswith("hydra.run.dir=") and os.path.abspath(a.split("=", 1)[1]) != here
    ]
    if elsewhere:
        raise ConfigError(
            f"{elsewhere[0]}: resume={run_dir} continues the run in its own directory; to train the same "
            "configuration elsewhere, give its overrides (RUN_DIR/.hydra/overrides.yaml) without resume="
        )
    saved = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if not os.path.isfile(saved):
        raise ConfigError(f"resume={run_dir}: not a kdrun run directory (no .hydra/overrides.yaml)")
    from omegaconf import OmegaConf

    from kdrun.io import load_yaml

    lines = OmegaConf.to_container(load_yaml(saved))
    if not isinstance(lines, list):
        raise ConfigError(f"resume={run_dir}: {saved} is not a list of overrides; valid: a kdrun run directory")
    previous = [str(o) for o in lines if not str(o).startswith("hydra.run.dir=")]
    return [*previous, *rest, f"hydra.run.dir={run_dir}"]


def train_command(args: list[str]) -> int:
    from kdrun.errors import KdrunError
    from kdrun.progress import check_env

    try:
        check_env()  # KDRUN_PROGRESS, KDRUN_PROGRESS_SECONDS
        args = expand_resume(args)
    except KdrunError as e:
        return fail(str(e), e.exit_code)
    overrides, config_name = split_args(args)
    if not any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c") for a in args):
        try:
            precheck(overrides, config_name, multirun=any(a in ("-m", "--multirun") for a in args))
        except KdrunError as e:
            if _full_error():
                raise
            return fail(str(e), e.exit_code)
    from kdrun.task import hydra_train

    flags = [a for a in args if a not in overrides]  # Hydra wants its flags before the overrides
    sys.argv = ["kdrun-train", *flags, *overrides]
    hydra_train()
    return sweep_exit_code()


def sweep_exit_code() -> int:
    """0, or 1 with one line when jobs of the multirun just run failed (each left a FAILED file with its reason)."""
    from kdrun import callbacks

    outcome, callbacks.LAST_SWEEP = callbacks.LAST_SWEEP, None
    if outcome is None or not outcome.failed:
        return 0
    name, reason = outcome.failed[0]
    more = f" (and {len(outcome.failed) - 1} more)" if len(outcome.failed) > 1 else ""
    where = outcome.report or outcome.sweep_dir
    others = "the other jobs completed" if len(outcome.failed) < outcome.jobs else "none completed"
    return fail(
        f"{len(outcome.failed)} of {outcome.jobs} sweep jobs failed; job {name}: {reason}{more}; {others}; see {where}",
        code=EXIT_SWEEP_FAILED,
    )


def _delegate(module: str, func: str):
    """A command implemented in ``kdrun.<module>.<func>(args) -> exit code``; KdrunErrors become one line."""

    def command(args: list[str]) -> int:
        import importlib

        from kdrun.errors import KdrunError

        try:
            return getattr(importlib.import_module(f"kdrun.{module}"), func)(args)
        except KdrunError as e:
            if _full_error():
                raise
            return fail(str(e), e.exit_code)
        except BrokenPipeError:  # the reader of stdout has gone: main ends quietly
            raise
        except OSError as e:  # permissions, a full disk, a read-only folder: the file and the reason, one line
            if _full_error():
                raise
            where = f"{e.filename}: " if e.filename else ""
            return fail(f"{where}{e.strerror or e} (an operating-system error; run it where kdrun can write)")

    return command


COMMANDS = {
    "train": train_command,
    "models": _delegate("models_cli", "models_main"),
    "report": _delegate("report_cli", "report_main"),
    "compare": _delegate("compare", "compare_main"),
    "store": _delegate("store_cli", "store_main"),
    "export": _delegate("export", "export_main"),
}


def completion(argv: list[str]) -> int:
    """``kdrun -sc install=bash|zsh|fish`` prints the shell's completion script for ``kdrun``; the shell then
    calls ``kdrun -sc query=SHELL`` with the line typed so far, answered by Hydra for ``kdrun train``."""
    words = os.environ.get("COMP_LINE", "").split(" ")
    if len(words) > 1 and words[1] == "train":  # Hydra completes the overrides after the command
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
        if os.environ.get("COMP_POINT", "").isdigit():
            os.environ["COMP_POINT"] = str(max(0, int(os.environ["COMP_POINT"]) - len("train ")))
    from kdrun.task import hydra_train

    sys.argv = ["kdrun", *argv]
    hydra_train()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # no command: the usage, to stderr, and the exit code of a usage error (as argparse's)
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-sc", "--shell-completion"):  # tab completion of `kdrun train` overrides (Hydra's)
        return completion(argv)
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        return fail(f"unknown command '{argv[0]}'; valid: {', '.join(COMMANDS)}")
    try:
        code = cmd(argv[1:])
        sys.stdout.flush()  # a reader that has gone shows here, not in the flush at exit
        return code
    except BrokenPipeError:  # e.g. `kdrun report DIR | head`: the reader has gone, so stop quietly as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
