"""Fault injection: make a chosen rank fail at a chosen step, the way real machines fail.

A :class:`Fault` is a frozen description of one failure; the training loop calls
:meth:`Fault.inject` once per step (and once in the middle of each checkpoint write) and
the fault fires on exactly one rank, at exactly one step, in exactly one attempt. Because
it is plain data it travels to the workers with the config, can be chosen from a widget,
and makes every failure in a test reproducible.

What each kind imitates:

=========== ==============================================================================
``kill``    the machine or process dies: ``SIGKILL``, no cleanup, no message (an OOM
            killer, a kernel panic, a preempted spot instance). Peers only notice when
            their next collective finds the connection closed.
``raise``   a software error in one rank (a bad batch, a NaN check): a Python exception,
            which distlab's launcher reports with the rank's traceback.
``hang``    a rank that stops making progress without dying (a deadlock, a stuck NFS
            read). Only a timeout can detect it: the failure mode that needs one.
``delay``   a slow network link or a straggler: the rank sleeps ``seconds`` and then
            carries on. Synchronous training waits for it; asynchronous training does not.
=========== ==============================================================================

``where="save"`` fires the fault in the middle of writing a checkpoint (after half its
bytes), which is what :mod:`distlab.fault_tolerance.checkpoint` must survive.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from distlab.checks import is_int, is_number, require, require_arg

KINDS = ("kill", "raise", "hang", "delay")
WHERE = ("step", "save")


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws (so a test can tell it from a real bug)."""


@dataclass(frozen=True)
class Fault:
    """One failure: ``kind`` happens to ``rank`` at ``step`` (in restart ``attempt``)."""

    kind: str = "kill"
    """``"kill"`` (SIGKILL), ``"raise"`` (exception), ``"hang"`` or ``"delay"`` (sleep)."""
    rank: int = 0
    """The rank that fails, numbered in the world of the attempt it fires in."""
    step: int = 0
    """The step at which it fails (before that step's gradient is computed)."""
    seconds: float = 2.0
    """How long a ``delay`` sleeps; a ``hang`` sleeps forever (until a timeout ends it)."""
    where: str = "step"
    """``"step"``: at the start of the step; ``"save"``: halfway through a checkpoint write."""
    attempt: int = 0
    """Fires only in this attempt (0 = the first run), so a restarted job does not fail again."""

    def __post_init__(self):
        require(self, "kind", self.kind in KINDS, f"one of {KINDS}")
        for name in ("rank", "step", "attempt"):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= 0, "an int >= 0")
        require(self, "seconds", is_number(self.seconds) and 0 <= self.seconds <= 3600,
                "a number in [0, 3600]")
        require(self, "where", self.where in WHERE, f"one of {WHERE}")

    def fires(self, rank: int, step: int, where: str = "step", attempt: int = 0) -> bool:
        """True when this fault is due on ``rank`` at ``step`` (in ``where``, ``attempt``)."""
        return (rank, step, where, attempt) == (self.rank, self.step, self.where, self.attempt)

    def inject(self, rank: int, step: int, where: str = "step", attempt: int = 0) -> None:
        """Fail now if due; otherwise return at once. Call it from inside a worker."""
        if self.fires(rank, step, where, attempt):
            fail(self.kind, seconds=self.seconds,
                 message=f"injected fault: rank {rank} at step {step} ({where})")

    def describe(self) -> str:
        """One line for a plot or a log: ``"kill rank 1 at step 30"``."""
        where = " during a checkpoint write" if self.where == "save" else ""
        return f"{self.kind} rank {self.rank} at step {self.step}{where}"


def fail(kind: str, seconds: float = 2.0, message: str = "injected fault") -> None:
    """Make this process fail in the way ``kind`` describes (see the module's table)."""
    require_arg("seconds", seconds, is_number(seconds) and 0 <= seconds <= 3600,
                "a number in [0, 3600]")
    if kind == "kill":
        # Flush first so the log shows how far the rank got; then die without cleanup.
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered asynchronously; never run past this line
    elif kind == "raise":
        raise InjectedFault(message)
    elif kind == "hang":
        while True:     # no progress, no exit: only a timeout can tell
            time.sleep(1.0)
    elif kind == "delay":
        time.sleep(seconds)
    else:
        raise ValueError(f"kind={kind!r} is not allowed; use one of {KINDS}")


def maybe_inject(fault: Fault | None, rank: int, step: int, where: str = "step",
                 attempt: int = 0) -> None:
    """:meth:`Fault.inject` that accepts ``None`` (no fault), for loops with an optional one."""
    if fault is not None:
        fault.inject(rank, step, where, attempt)
