"""Graceful stop on SIGTERM / SIGINT (SLURM preemption, Ctrl-C).

The handler sets a flag and says so; the training loop checks it after each step (data-parallel workers together,
every ``kdrun.engine.STOP_POLL_STEPS`` steps), writes a checkpoint and raises :class:`Preempted`, which the CLI
turns into exit code 75 (EX_TEMPFAIL, "try again") and the command that continues the run
(``kdrun train resume=RUN_DIR``; a sweep's own command with its ``hydra.sweep.dir``). A second Ctrl-C stops at once,
from the last checkpoint saved (exit code 130).

``KDRUN_KILL_AT=STAGE:STEP[:SIGNAL[+SIGNAL]]`` (testing only) sends the process SIGNAL (default KILL; INT+INT:
Ctrl-C twice) right after global step STEP of stage STAGE (``cache``: after
batch STEP of the cache build), to test recovery from a crash or preemption.
"""

from __future__ import annotations

import os
import signal

from kdrun.errors import KdrunError

EXIT_PREEMPTED = 75


class Preempted(KdrunError):
    exit_code = EXIT_PREEMPTED


class _Stop:
    requested: str | None = None
    installed: bool = False


STOP = _Stop()


def _handler(signum, _frame) -> None:
    if STOP.requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C stops at once
    if STOP.requested is None:  # said at once (os.write: safe inside a handler): evaluation may go on a while
        name = signal.Signals(signum).name
        more = "; Ctrl-C again stops at once" if signum == signal.SIGINT else ""
        note = f"kdrun: {name} received: stopping at the next safe point (a training stage checkpoints first){more}"
        os.write(2, f"\n{note}\n".encode())
    STOP.requested = signal.Signals(signum).name


def install_handlers() -> None:
    """Route SIGTERM and SIGINT to the stop flag (main thread only), once per process: the flag is never cleared,
    so a signal that arrives outside a training loop (evaluation, or between two jobs of a sweep) still stops
    the next job before it starts (:func:`check_stop`)."""
    if STOP.installed:
        return
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _handler)
        STOP.installed = True
    except ValueError:  # not the main thread (some launchers): keep the default handlers
        pass


def check_stop(what: str) -> None:
    """Raise :class:`Preempted` when a stop was requested before ``what`` began."""
    if STOP.requested is not None:
        raise Preempted(f"stopped by {STOP.requested} before {what}")


def maybe_kill(stage: str, global_step: int) -> None:
    """Testing hook: signal ourselves after ``global_step`` of ``stage`` when KDRUN_KILL_AT says so."""
    at = os.environ.get("KDRUN_KILL_AT")
    if not at:
        return
    where, _, sigs = at.partition(":")[2].partition(":")
    if at.split(":")[0] == stage and where == str(global_step):
        for sig in (sigs or "KILL").split("+"):  # INT+INT: Ctrl-C twice
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
