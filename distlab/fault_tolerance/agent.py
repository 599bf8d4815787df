"""The elastic agent: start a job, and after each failure restart it on the ranks that are left.

This is the loop of torchrun's agent (PyTorch's "Torch Distributed Elastic",
``torchrun --nnodes=MIN:MAX --max-restarts=K``) around :func:`distlab.start`:

1. start attempt ``k`` of the job on ``world_size`` ranks;
2. **detection**: the launcher sees a rank exit, raise or time out, and ends the attempt;
3. **restart**: start attempt ``k + 1`` on ``world_size - 1`` ranks (or as many as before);
4. the job's worker **resumes** from its latest checkpoint, which is its own business
   (see :func:`distlab.fault_tolerance.elastic.train`).

The agent knows nothing about training: it restarts any worker ``fn(config, *,
attempt)`` that can resume. Restarting costs no communication beyond the new group's
rendezvous; its price is the lost work since the checkpoint and the downtime, which
:meth:`ElasticRun.summary` measures.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from distlab.checks import is_int, is_number, require
from distlab.launcher import MAX_WORLD_SIZE, WorkerError, start
from distlab.metrics import to_frame


@dataclass(frozen=True)
class ElasticConfig:
    """How the agent restarts a failed job (torchrun: ``--nnodes=MIN:MAX --max-restarts``)."""

    world_size: int = 2
    """Ranks of the first attempt."""
    min_world_size: int = 1
    """Give up rather than run on fewer ranks than this."""
    max_restarts: int = 3
    """Give up after this many restarts."""
    timeout: float = 60.0
    """Seconds an attempt may run; a hung rank is detected when it expires."""
    shrink: bool = True
    """Restart on the survivors (``world_size - 1``); False: on as many ranks as before."""

    def __post_init__(self):
        require(self, "min_world_size",
                is_int(self.min_world_size) and 1 <= self.min_world_size <= MAX_WORLD_SIZE,
                f"an int in 1..{MAX_WORLD_SIZE}")
        require(self, "world_size", is_int(self.world_size)
                and self.min_world_size <= self.world_size <= MAX_WORLD_SIZE,
                f"an int in [min_world_size={self.min_world_size}, {MAX_WORLD_SIZE}]")
        require(self, "max_restarts", is_int(self.max_restarts) and self.max_restarts >= 0,
                "an int >= 0")
        require(self, "timeout", is_number(self.timeout) and self.timeout > 0, "seconds > 0")
        require(self, "shrink", isinstance(self.shrink, bool), "True or False")


class ElasticRun:
    """An elastic job in progress: a background agent that restarts it after each failure.

    It answers like a :class:`distlab.Run` (``done``, ``wait``, ``result``, ``stop``,
    ``metrics``, ``error``, ``world_size``), so a :class:`~distlab.ui.panel.RunPanel` drives
    it. Record times are seconds since the *job* started, across attempts; every record
    carries its ``attempt`` and ``world_size``. :attr:`events` is the timeline.

    Args:
        fn: the worker, called as ``fn(config, attempt=k)`` on every rank of attempt ``k``.
        config: the job's configuration, passed to ``fn``.
        elastic: how to restart.
        on_metrics, on_output: as for :func:`distlab.start`, for every attempt.
        name: the ``run`` column of :meth:`metrics`.
    """

    def __init__(self, fn: Callable, config, elastic: ElasticConfig, on_metrics=None,
                 on_output=None, name: str = "elastic"):
        if not isinstance(elastic, ElasticConfig):
            raise TypeError(f"elastic must be an ElasticConfig, got {type(elastic).__name__}")
        self.fn, self.config, self.elastic, self.name = fn, config, elastic, name
        self.world_size = elastic.world_size
        self.events: list[dict] = []
        self._records: list[dict] = []
        self._on_metrics, self._on_output = on_metrics, on_output
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._results, self.error, self._current, self._stopped = None, None, None, False
        self.t0 = time.time()
        self._thread = threading.Thread(target=self._agent, daemon=True, name="distlab-elastic")
        self._thread.start()

    # -- what distlab.Run offers ------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def stop(self, reason: str = "stopped by the user") -> None:
        """Stop the current attempt and restart no more."""
        self._stopped = True
        if self._current is not None:
            self._current.stop(reason)
        self._done.wait(10)

    def result(self) -> list:
        """Wait; return the last attempt's per-rank results, or raise what ended the job."""
        while not self._done.wait(0.05):
            pass
        if self.error is not None:
            raise self.error
        return self._results

    def records(self) -> list[dict]:
        with self._lock:
            return list(self._records)

    def metrics(self) -> pd.DataFrame:
        """All attempts' records as a tidy frame (``time`` on the job's clock)."""
        return to_frame(self.records(), run=self.name)

    # -- what an elastic job adds -----------------------------------------------------

    def timeline(self) -> pd.DataFrame:
        """The events (failure, detection, restart, resume, checkpoint, finish)."""
        with self._lock:
            return pd.DataFrame(self.events)

    def summary(self) -> dict:
        """Lost work of the first failure: steps redone, and seconds from failure to resume."""
        ev = self.timeline()
        first = lambda name: ev[ev.event == name].iloc[0] if (ev.event == name).any() else None
        fail, resume = first("failure"), first("resume")
        ckpt = ev[ev.event == "checkpoint"]
        out = {"checkpoint_time": float(ckpt.groupby("step").checkpoint_time.max().sum())
               if "checkpoint_time" in ckpt else 0.0, "restarts": int((ev.event == "restart").sum())}
        if fail is not None and resume is not None:
            out.update(failure_step=int(fail.step), resume_step=int(resume.step),
                       lost_steps=int(fail.step - resume.step),
                       downtime=float(resume.time - fail.time))
        return out

    def __repr__(self):
        return f"<distlab.ElasticRun {self.name!r} {'done' if self.done else 'running'}>"

    # -- the agent's loop, on a background thread -------------------------------------

    def _agent(self):
        world_size = self.elastic.world_size
        try:
            for attempt in range(self.elastic.max_restarts + 1):
                if self._stopped:
                    self.error = WorkerError(None, "stopped by the user")
                    return
                if attempt:
                    self._event("restart", attempt=attempt, world_size=world_size)
                t_start = time.time()
                run = start(self.fn, world_size, self.config, attempt=attempt,
                            timeout=self.elastic.timeout, on_output=self._on_output,
                            on_metrics=self._relay(t_start, attempt, world_size))
                self._current = run
                if self._stopped:        # Stop pressed while this attempt was starting
                    run.stop("stopped by the user")
                run.wait()
                if run.error is None:
                    self._results = run.result()
                    self._event("finish", attempt=attempt, world_size=world_size)
                    return
                if self._stopped:        # a fault racing the stop still reads "stopped"
                    self.error = WorkerError(None, "stopped by the user")
                    return
                if not isinstance(run.error, WorkerError):
                    self.error = run.error
                    return
                self._event("detection", attempt=attempt, world_size=world_size,
                            rank=run.error.rank, reason=run.error.reason)
                if self.elastic.shrink:
                    world_size -= 1
                if world_size < self.elastic.min_world_size:
                    self.error = WorkerError(run.error.rank, f"{run.error.reason}; only "
                                             f"{world_size} rank(s) left, below min_world_size="
                                             f"{self.elastic.min_world_size}")
                    return
            self.error = WorkerError(None, f"gave up after max_restarts="
                                     f"{self.elastic.max_restarts} restarts")
        except BaseException as e:  # noqa: BLE001 - the caller must hear of any agent bug
            self.error = e
        finally:
            self._done.set()

    def _event(self, event: str, **info) -> None:
        with self._lock:
            self.events.append({"event": event, "time": time.time() - self.t0, **info})

    def _relay(self, run_t0: float, attempt: int, world_size: int):
        # Put an attempt's records on the job's clock and tag them; events join the timeline.
        def on_metrics(records):
            out = []
            for r in records:
                r = {**r, "time": r["time"] + run_t0 - self.t0, "attempt": attempt,
                     "world_size": world_size}
                if "event" in r:
                    with self._lock:
                        self.events.append(dict(r))
                out.append(r)
            with self._lock:
                self._records.extend(out)
            if self._on_metrics is not None:
                self._on_metrics(out)
        return on_metrics
