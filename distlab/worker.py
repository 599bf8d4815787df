"""The worker side of a distlab launch: what runs inside each of the N processes.

:func:`distlab.launch` (in :mod:`distlab.launcher`) forks the processes; each one runs
:func:`_worker_main`, which routes its output to the caller, joins the process group and
calls the user's function. :func:`init_from_env` is the same first step under ``torchrun``.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import cloudpickle


@dataclass
class _WorkerChannel:
    """What a worker process knows about the launch that started it."""
    rank: int
    world_size: int
    conn: Any          # write end of this rank's message pipe
    t0: float          # the launch's start time (time.time() of the caller)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, msg) -> None:
        data = cloudpickle.dumps(msg)
        with self.lock:
            self.conn.send_bytes(data)


_channel: _WorkerChannel | None = None   # set once per worker process by _worker_main


def worker_channel() -> _WorkerChannel | None:
    """The channel back to the launching process, or None outside a distlab launch."""
    return _channel


def _die_with_parent() -> None:
    """End this worker when the launching process dies, however it dies (``kill -9`` too).

    The worker's parent is the forkserver, so ``PR_SET_PDEATHSIG`` kills the worker when the
    forkserver exits. The forkserver exits when the read end of its "alive" pipe reaches EOF,
    that is when every copy of the write end is closed. The launching process holds one, but
    multiprocessing also hands a copy to every forkserver child (so that a child could use
    the forkserver itself): while any worker lives, the forkserver would never see its parent
    go. Closing the worker's copy leaves the launcher's the only one: a killed kernel ends the
    forkserver, which ends every worker within moments.
    """
    from multiprocessing import forkserver
    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        forkserver._forkserver._forkserver_alive_fd = None
    parent = os.getppid()
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:   # the parent died before the line above took effect
        os._exit(1)


def _watch_launcher(lifeline) -> None:
    """End this worker as soon as the launching process is gone, whatever this rank is doing.

    The launcher holds the only write end of ``lifeline`` and never writes to it: the read
    below returns (EOF) only when that process has exited or been killed (``kill -9``, the
    OOM killer). This is quicker than waiting for the forkserver to exit, which a loaded
    machine can take seconds over.
    """
    def watch():
        try:
            lifeline.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="distlab-lifeline", daemon=True).start()


def _worker_main(rank, world_size, backend, store_path, payload, conn, out_w, err_w,
                 lifeline, t0, timeout, num_threads, sys_path):
    global _channel
    _die_with_parent()
    _watch_launcher(lifeline)
    # Route fds 1 and 2 (Python prints and C++ logs alike) to the caller.
    os.dup2(out_w.fileno(), 1)
    os.dup2(err_w.fileno(), 2)
    out_w.close()
    err_w.close()
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    _channel = ch = _WorkerChannel(rank, world_size, conn, t0)
    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), GLOO_SOCKET_IFNAME="lo",
                      OMP_NUM_THREADS=str(num_threads))
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(num_threads)
        _pin_when_crowded(rank, world_size, num_threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        fn, args, kwargs = cloudpickle.loads(payload)
        store = dist.FileStore(store_path, world_size)
        pg_timeout = datetime.timedelta(seconds=timeout if timeout else 1800)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=pg_timeout)
        # Every rank is connected before any user code runs: a function that returns at
        # once must not exit while a slower peer is still connecting to it.
        dist.barrier()
        result = fn(*args, **kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        ch.send(("result", result))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the caller
        tb = traceback.format_exc()
        try:
            ch.send(("error", f"{type(e).__name__}: {e}", tb))
        except Exception:
            pass
        os._exit(1)
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: nothing left to do and it can be slow


def _pin_when_crowded(rank: int, world_size: int, num_threads: int) -> None:
    """With more ranks than cores, keep each rank (and the threads it starts) on one core.

    Every gloo message wakes two threads of its receiver (the transport's event loop, then
    the thread waiting for the data). When ranks outnumber cores, the scheduler moves those
    threads between cores at every wake-up, and on a virtual machine each move costs tens
    of microseconds: unpinned, a 4 KiB all-reduce of 4 ranks on 2 cores burned about 2 ms
    of CPU per rank and took 7-12 ms; pinned, 1 ms and 3-5 ms (8 ranks: 30 ms against 7 ms;
    see ``benchmarks/results/collectives.md``). Called before the process group starts, so
    gloo's threads inherit the affinity.
    """
    if not hasattr(os, "sched_getaffinity"):
        return
    core = pinned_core(rank, world_size, num_threads, sorted(os.sched_getaffinity(0)))
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except OSError:   # a sandbox that forbids it: run unpinned
            pass


def pinned_core(rank: int, world_size: int, num_threads: int, cores: list[int]) -> int | None:
    """The core a rank is pinned to: ``cores[rank mod c]`` when the ``world_size`` ranks
    outnumber the c cores; None (the scheduler decides) when every rank has a core of its
    own, or when a rank asked for several torch threads (one core would serialize them)."""
    if world_size <= len(cores) or num_threads > 1:
        return None
    return cores[rank % len(cores)]


def init_from_env(backend: str | None = None) -> None:
    """Initialize the default process group from torchrun's environment (env:// rendezvous).

    Lets the same worker function run under ``torchrun --nproc-per-node=N`` with no distlab
    launcher. Does nothing if a group is already initialized.
    """
    import torch
    import torch.distributed as dist
    if dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", world_size=world_size,
                            rank=int(os.environ.get("RANK", "0")))


def device():
    """This rank's device: ``cuda:LOCAL_RANK`` on NCCL, else the CPU."""
    import torch
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
