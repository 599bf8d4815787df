"""The caller's side of a launch while it runs: a :class:`Run` watches N worker processes.

:func:`distlab.start` (in :mod:`distlab.launcher`) validates the arguments and creates a
:class:`Run`. The Run forks the workers from the forkserver (:mod:`distlab.forkserver`),
then a background thread reads their output, metrics and results, notices the first failure
(an exception, an exit, a signal, a hang past the timeout, the stop button), ends every
worker and turns what happened into a :class:`WorkerError` naming the rank.
"""
from __future__ import annotations

import atexit
import multiprocessing.connection as mpc
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any

import cloudpickle

from distlab.errors import PEER_LOST_MARKERS, WorkerError, describe_exit
from distlab.forkserver import WorkerProcess, context
from distlab.worker import _worker_main


_live_runs: "weakref.WeakSet[Run]" = weakref.WeakSet()


@atexit.register
def _stop_all_runs():
    for run in list(_live_runs):
        run.stop()


def _default_output(rank: int, stream: str, text: str, targets) -> None:
    out = targets[stream]
    prefix = f"[rank {rank}] "
    lines = text.splitlines(keepends=True)
    out.write("".join(prefix + ln if ln.endswith("\n") else prefix + ln + "\n" for ln in lines))
    out.flush()


class Run:
    """A launch in progress: started by :func:`start`, finished by :meth:`result`.

    The workers' messages are read by a background thread, so a notebook (or a widget
    callback) stays responsive while the run goes on. Use :meth:`metrics` for the records
    reported so far, :meth:`stop` to end it, and :meth:`result` to wait for the per-rank
    return values (or the :class:`WorkerError`).
    """

    def __init__(self, fn, world_size, args, kwargs, *, backend="gloo", timeout=120.0,
                 num_threads=1, on_output=None, on_metrics=None, name=None,
                 expendable_ranks=()):
        self.expendable_ranks = frozenset(expendable_ranks)
        self.lost: dict[int, str] = {}
        """``{rank: reason}`` for expendable ranks that died; the run went on without them."""
        self.backend = backend
        try:
            payload = cloudpickle.dumps((fn, args, kwargs))
        except Exception as e:
            raise TypeError(f"cannot send fn and its arguments to the workers: {e}") from e
        self.world_size = world_size
        self.timeout = timeout
        self.name = name or getattr(fn, "__name__", "run")
        self._on_metrics = on_metrics
        targets = {"stdout": sys.stdout, "stderr": sys.stderr}
        self._on_output = on_output or (lambda r, s, t: _default_output(r, s, t, targets))
        self._records: list[dict] = []
        self._results: dict[int, Any] = {}
        self._failures: dict[int, tuple[float, str, str]] = {}
        self._error: BaseException | None = None
        self._stop_reason: str | None = None
        self._stop_rank: int | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

        ctx = context()
        self._tmpdir = tempfile.mkdtemp(prefix="distlab-")
        store_path = os.path.join(self._tmpdir, "store")
        self.t0 = time.time()
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._procs, self._msg, self._out = [], {}, {}
        self._lifelines = []   # write ends held by this process only: see worker._watch_launcher
        try:
            for rank in range(world_size):
                life_r, life_w = ctx.Pipe(duplex=False)
                self._lifelines.append(life_w)
                msg_r, msg_w = ctx.Pipe(duplex=False)
                out_r, out_w = ctx.Pipe(duplex=False)
                err_r, err_w = ctx.Pipe(duplex=False)
                p = WorkerProcess(target=_worker_main, name=f"distlab-rank{rank}", daemon=True,
                                args=(rank, world_size, self.backend, store_path, payload,
                                      msg_w, out_w, err_w, life_r, self.t0, timeout,
                                      num_threads, list(sys.path)))
                p.start()
                for c in (msg_w, out_w, err_w, life_r):   # the child has its own copies now
                    c.close()
                self._procs.append(p)
                self._msg[msg_r] = rank
                self._out[out_r] = (rank, "stdout")
                self._out[err_r] = (rank, "stderr")
        except BaseException:
            self._kill_all()
            self._cleanup()
            raise
        _live_runs.add(self)
        self._thread = threading.Thread(target=self._loop, name=f"distlab-{self.name}",
                                        daemon=True)
        self._thread.start()

    # -- the event loop (background thread) ------------------------------------------

    def _loop(self):
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        exited: set[int] = set()
        first_failure_at = None
        try:
            while True:
                watch = list(self._msg) + list(self._out) + [s for s, r in sentinels.items()
                                                             if r not in exited]
                if not watch:
                    break
                now = time.monotonic()
                wait_for = 0.1
                if first_failure_at is not None:
                    # Give other ranks a moment to report, so the root cause is named.
                    if now - first_failure_at > 0.3:
                        break
                ready = mpc.wait(watch, timeout=wait_for)
                batch = []
                for obj in ready:
                    if obj in self._out:
                        self._read_output(obj)
                    elif obj in self._msg:
                        batch.extend(self._read_messages(obj))
                for obj in ready:
                    r = sentinels.get(obj)
                    if r is not None and r not in exited:
                        # Drain whatever the worker sent before it went away.
                        for conn, rk in list(self._msg.items()):
                            if rk == r:
                                batch.extend(self._read_messages(conn))
                        exited.add(r)
                        if r not in self._results and r not in self._failures:
                            code = self._procs[r].exitcode
                            self._fail(r, describe_exit(code), "")
                if batch and self._on_metrics is not None:
                    try:
                        self._on_metrics(batch)
                    except Exception:  # a plotting bug must not kill the run
                        traceback.print_exc()
                if self._failures and first_failure_at is None:
                    first_failure_at = time.monotonic()
                if self._stop_reason and first_failure_at is None:
                    break
                if len(exited) == self.world_size and not self._msg and not self._out:
                    break
                if (first_failure_at is None and self._deadline is not None
                        and time.monotonic() > self._deadline):
                    running = [r for r in range(self.world_size) if r not in exited
                               and r not in self._results and r not in self.lost]
                    self._stop_rank = running[0] if len(running) == 1 else None
                    self._stop_reason = (f"timed out after {self.timeout:g} s; ranks still "
                                         f"running: {running}")
                    break
        except BaseException as e:  # never leave workers behind, whatever happened here
            self._error = e
        finally:
            self._kill_all()
            self._drain_output()
            self._finish()

    def _read_output(self, conn):
        rank, stream = self._out[conn]
        try:
            data = os.read(conn.fileno(), 65536)
        except OSError:
            data = b""
        if not data:
            del self._out[conn]
            conn.close()
            return
        text = data.decode("utf-8", errors="replace")
        try:
            self._on_output(rank, stream, text)
        except Exception:
            pass

    def _drain_output(self):
        for conn in list(self._out):
            while conn in self._out and conn.poll(0):
                self._read_output(conn)
            if conn in self._out:
                del self._out[conn]
                conn.close()

    def _read_messages(self, conn):
        rank = self._msg[conn]
        records = []
        while True:
            try:
                if not conn.poll(0):
                    break
                msg = cloudpickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                del self._msg[conn]
                conn.close()
                break
            kind = msg[0]
            if kind == "metrics":
                rec = msg[1]
                records.append(rec)
                with self._lock:
                    self._records.append(rec)
            elif kind == "result":
                self._results[rank] = msg[1]
            elif kind == "error":
                self._fail(rank, f"raised {msg[1]}", msg[2])
        return records

    def _fail(self, rank: int, reason: str, tb: str) -> None:
        if rank in self.expendable_ranks:   # the run goes on without it
            self.lost.setdefault(rank, reason)
        else:
            self._failures[rank] = (time.monotonic(), reason, tb)

    def _kill_all(self):
        procs = [p for p in self._procs if p.is_alive()]
        for p in procs:
            try:
                p.terminate()
            except Exception:
                pass
        deadline = time.monotonic() + 2.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(2.0)

    def _cleanup(self):
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        for conn in list(self._msg) + list(self._out) + self._lifelines:
            conn.close()
        self._lifelines.clear()
        self._msg.clear()
        self._out.clear()

    def _finish(self):
        self._cleanup()
        _live_runs.discard(self)
        if self._error is None and self._stop_reason:
            self._error = WorkerError(self._stop_rank, self._stop_reason)
        elif self._error is None and self._failures:
            self._error = self._failure_error()
        elif self._error is None and len(self._results) + len(self.lost) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(self._results) - set(self.lost))
            self._error = WorkerError(missing[0], "exited without a result")
        self._done.set()

    def _failure_error(self) -> WorkerError:
        # Prefer a rank that died or raised on its own over one that merely lost a peer.
        def secondary(item):
            _, (t, why, tb) = item
            lost_peer = any(s in why or s in tb for s in PEER_LOST_MARKERS)
            return (lost_peer, t)
        rank, (_, why, tb) = min(self._failures.items(), key=secondary)
        return WorkerError(rank, why, tb, {r: w for r, (_, w, _) in self._failures.items()})

    # -- the public handle ------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once every worker has finished (or the run was stopped)."""
        return self._done.is_set()

    def stop(self, reason: str = "stopped by the user") -> None:
        """End the run now: every worker is terminated. Safe to call more than once."""
        if not self._done.is_set():
            self._stop_reason = self._stop_reason or reason
            self._kill_all()
            self._done.wait(10)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run is over (or ``timeout`` seconds pass); True when over."""
        return self._done.wait(timeout)

    def result(self) -> list:
        """Wait for the run and return each rank's return value, in rank order.

        Raises :class:`WorkerError` if a worker failed, hung past the timeout, or the run was
        stopped. A KeyboardInterrupt (the notebook's stop button) ends every worker.
        """
        try:
            while not self._done.wait(0.05):
                pass
        except KeyboardInterrupt:
            self.stop("interrupted (KeyboardInterrupt)")
            raise
        if self._error is not None:
            raise self._error
        return [self._results.get(r) for r in range(self.world_size)]

    @property
    def error(self) -> BaseException | None:
        """The run's error once it is over, else None."""
        return self._error

    def records(self) -> list[dict]:
        """The metric records reported so far (a copy), each a dict."""
        with self._lock:
            return list(self._records)

    def metrics(self):
        """The metric records reported so far as a tidy pandas DataFrame.

        One row per :func:`distlab.report` call, with columns ``rank``, ``step``, ``time``
        (seconds since the launch started) and one column per reported value.
        """
        from distlab.metrics import to_frame
        return to_frame(self.records(), run=self.name)

    def __repr__(self):
        state = "done" if self.done else "running"
        return f"<distlab.Run {self.name!r} world_size={self.world_size} {state}>"
