"""Start N real torch.distributed worker processes from a notebook cell, and get back.

This is the only module in distlab that creates processes or touches the environment
variables of torch.distributed. Everything else receives its process group as an argument.

How a launch works
------------------
1. The caller's function and arguments are serialized with cloudpickle, so functions and
   lambdas defined in a notebook cell or in a ``__main__`` script travel by value.
2. Workers are forked from a *forkserver* that has already imported torch: starting eight
   of them takes about a second and shares torch's pages between them.
3. The workers meet through a ``FileStore`` in a private temporary folder: no TCP port is
   chosen at all, so two launches, or twenty, can never collide, and nothing listens on the
   network. Gloo's own connections are bound to the loopback interface.
4. Each worker's stdout and stderr (file descriptors 1 and 2, so C++ warnings too) go
   through pipes back to the caller, which prints them prefixed by the rank.
5. Results, metrics and errors come back over a second pipe per rank. The first failure
   (an exception, ``os._exit``, a signal, a hang past ``timeout``, the stop button) ends
   every worker and raises :class:`WorkerError` naming the rank and why.

The worker functions themselves are plain torch.distributed code: they run unchanged under
``torchrun`` (see :func:`distlab.worker.init_from_env`). What happens inside each worker
process is in :mod:`distlab.worker`.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.connection as mpc
from multiprocessing import popen_forkserver, spawn
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any, Callable

import cloudpickle

from distlab.worker import _worker_main, device, init_from_env  # noqa: F401 (public here too)

MAX_WORLD_SIZE = 64
"""Largest world size a launch accepts on one machine."""

BACKENDS = ("gloo", "nccl")


class WorkerError(RuntimeError):
    """A worker process failed: it raised, exited without a result, was killed, or hung.

    Attributes:
        rank: the rank that failed first (the likely root cause).
        reason: one line: what happened to that rank.
        worker_traceback: the worker's own Python traceback, when it raised.
        failures: ``{rank: reason}`` for every rank seen failing.
    """

    def __init__(self, rank: int | None, reason: str, worker_traceback: str = "",
                 failures: dict[int, str] | None = None):
        self.rank = rank
        self.reason = reason
        self.worker_traceback = worker_traceback
        self.failures = dict(failures or {})
        who = "distlab launch" if rank is None else f"rank {rank}"
        msg = f"{who} failed: {reason}"
        others = {r: why for r, why in self.failures.items() if r != rank}
        if others:
            msg += "".join(f"\n  then rank {r}: {_first_line(why)}" for r, why in sorted(others.items()))
        if worker_traceback:
            msg += f"\n\n--- traceback from rank {rank} ---\n{worker_traceback.rstrip()}"
        super().__init__(msg)

    def __reduce__(self):
        return (WorkerError, (self.rank, self.reason, self.worker_traceback, self.failures))


def _first_line(text: str, width: int = 110) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


# ----------------------------------------------------------------------------------------
# Validation: every bad argument is refused before a process starts.
# ----------------------------------------------------------------------------------------

def _cuda_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_backend(backend: str | None, world_size: int) -> str:
    """Return the backend a launch will use: NCCL only when there is one GPU per rank."""
    if backend is None:
        return "nccl" if _cuda_count() >= world_size else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS} or None")
    if backend == "nccl" and _cuda_count() < world_size:
        raise ValueError(f"backend='nccl' needs one GPU per rank: world_size={world_size} "
                         f"but {_cuda_count()} CUDA device(s) are visible; use backend='gloo'")
    return backend


def _validate(fn, world_size, timeout, num_threads):
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}: {fn!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {type(world_size).__name__}")
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"world_size={world_size} is out of range; allowed 1..{MAX_WORLD_SIZE}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds or None")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be an int >= 1")


# ----------------------------------------------------------------------------------------
# The caller side.
# ----------------------------------------------------------------------------------------

# torch._dynamo: torch.optim imports it on the first step; preloading it once in the
# forkserver saves every worker about 2 s of CPU.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "cloudpickle", "distlab.worker"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


_prep_lock = threading.Lock()


class _Popen(popen_forkserver.Popen):
    """Forkserver start without re-running the caller's ``__main__`` in the worker.

    multiprocessing normally re-imports the main script in every child, which runs a script
    with no ``if __name__ == "__main__"`` guard a second time. distlab sends the function by
    value instead (cloudpickle), so the main module is not needed in the worker.
    """

    def _launch(self, process_obj):
        original = spawn.get_preparation_data

        def without_main(name):
            data = original(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        with _prep_lock:
            spawn.get_preparation_data = without_main
            try:
                super()._launch(process_obj)
            finally:
                spawn.get_preparation_data = original


class _Process(mp.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


def warm_up() -> None:
    """Start the forkserver (and import torch in it) now, so the first launch is fast."""
    from multiprocessing import forkserver
    _context()
    forkserver.ensure_running()


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

    def __init__(self, fn, world_size, args, kwargs, *, backend=None, timeout=120.0,
                 num_threads=1, on_output=None, on_metrics=None, name=None,
                 expendable_ranks=()):
        _validate(fn, world_size, timeout, num_threads)
        self.expendable_ranks = frozenset(expendable_ranks)
        if not self.expendable_ranks <= set(range(world_size)) or \
                len(self.expendable_ranks) == world_size:
            raise ValueError(f"expendable_ranks={sorted(self.expendable_ranks)} must be ranks in "
                             f"0..{world_size - 1}, and not all of them")
        self.lost: dict[int, str] = {}
        """``{rank: reason}`` for expendable ranks that died; the run went on without them."""
        self.backend = resolve_backend(backend, world_size)
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

        ctx = _context()
        self._tmpdir = tempfile.mkdtemp(prefix="distlab-")
        store_path = os.path.join(self._tmpdir, "store")
        self.t0 = time.time()
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._procs, self._msg, self._out = [], {}, {}
        try:
            for rank in range(world_size):
                msg_r, msg_w = ctx.Pipe(duplex=False)
                out_r, out_w = ctx.Pipe(duplex=False)
                err_r, err_w = ctx.Pipe(duplex=False)
                p = _Process(target=_worker_main, name=f"distlab-rank{rank}", daemon=True,
                                args=(rank, world_size, self.backend, store_path, payload,
                                      msg_w, out_w, err_w, self.t0, timeout, num_threads,
                                      list(sys.path)))
                p.start()
                for c in (msg_w, out_w, err_w):   # the child has its own copies now
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
                            self._fail(r, _describe_exit(code), "")
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
        for conn in list(self._msg) + list(self._out):
            conn.close()
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
            lost_peer = any(s in why or s in tb for s in _PEER_LOST_MARKERS)
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


_PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "DistBackendError", "Socket Timeout", "timed out", "Timed out",
                      "terminated by SIGTERM")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code} without a result"


def start(fn: Callable, world_size: int, *args, backend: str | None = None,
          timeout: float | None = 120.0, num_threads: int = 1,
          on_output: Callable[[int, str, str], None] | None = None,
          on_metrics: Callable[[list[dict]], None] | None = None,
          expendable_ranks: tuple = (), **kwargs) -> Run:
    """Start ``fn(*args, **kwargs)`` on ``world_size`` processes and return a :class:`Run` at once.

    The non-blocking form of :func:`launch`, for widgets: the caller keeps control, can
    watch :meth:`Run.metrics` grow, and can :meth:`Run.stop` the run.

    Args:
        fn: the worker function; it finds the default process group initialized.
        world_size: the number of processes (ranks), 1 to ``MAX_WORLD_SIZE``.
        *args, **kwargs: passed to ``fn`` on every rank.
        backend: ``"gloo"``, ``"nccl"``, or None for NCCL when there is one GPU per rank.
        timeout: seconds before the whole run is ended as stuck; None for no limit.
        num_threads: torch threads per worker (1 keeps N workers from oversubscribing cores).
        on_output: ``callback(rank, stream, text)`` for the workers' output; by default it is
            printed to this process's stdout/stderr, prefixed by the rank.
        on_metrics: ``callback(records)`` called from a background thread with each batch of
            new metric records, for live plots.
        expendable_ranks: ranks whose death does not end the run (a parameter server's
            workers, say): their result is None and :attr:`Run.lost` says why they died.
    """
    return Run(fn, world_size, args, kwargs, backend=backend, timeout=timeout,
               num_threads=num_threads, on_output=on_output, on_metrics=on_metrics,
               expendable_ranks=expendable_ranks)


def launch(fn: Callable, world_size: int, *args, backend: str | None = None,
           timeout: float | None = 120.0, num_threads: int = 1,
           on_output: Callable[[int, str, str], None] | None = None,
           on_metrics: Callable[[list[dict]], None] | None = None,
           expendable_ranks: tuple = (), **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` real processes; return their results.

    Each process has the default torch.distributed process group initialized (gloo on CPU,
    NCCL when there is one GPU per rank). The return values come back in rank order.
    Arguments are as for :func:`start`; ``backend``, ``timeout``, ``num_threads``,
    ``on_output``, ``on_metrics`` and ``expendable_ranks`` are the launcher's own and are not
    passed to ``fn``.

    Raises:
        WorkerError: a worker raised (its traceback is included), exited without a result,
            was killed by a signal, or the run exceeded ``timeout``.
        ValueError, TypeError: bad arguments, before any process starts.

    Example::

        def hello():
            import torch, torch.distributed as dist
            t = torch.tensor([dist.get_rank() + 1.0])
            dist.all_reduce(t)
            return t.item()

        distlab.launch(hello, 4)   # [10.0, 10.0, 10.0, 10.0]
    """
    return start(fn, world_size, *args, backend=backend, timeout=timeout,
                 num_threads=num_threads, on_output=on_output, on_metrics=on_metrics,
                 expendable_ranks=expendable_ranks, **kwargs).result()
