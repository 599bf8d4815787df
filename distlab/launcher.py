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
process is in :mod:`distlab.worker`; how the caller watches a run, in :mod:`distlab.supervisor`;
where the processes come from, in :mod:`distlab.forkserver`.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Callable

from distlab.forkserver import warm_up  # noqa: F401 (public here too)
from distlab.errors import WorkerError  # noqa: F401 (public here too)
from distlab.supervisor import Run  # noqa: F401 (public here too)
from distlab.worker import device, init_from_env  # noqa: F401 (public here too)

MAX_WORLD_SIZE = 64
"""Largest world size a launch accepts on one machine."""

BACKENDS = ("gloo", "nccl")


def launch(fn: Callable, world_size: int, *args, backend: str | None = None,
           timeout: float | None = 120.0, num_threads: int = 1,
           on_output: Callable[[int, str, str], None] | None = None,
           on_metrics: Callable[[list[dict]], None] | None = None,
           expendable_ranks: tuple = (), network=None, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` real processes; return their results.

    Each process has the default torch.distributed process group initialized (gloo on CPU,
    NCCL when there is one GPU per rank). The return values come back in rank order.
    Arguments are as for :func:`start`; ``backend``, ``timeout``, ``num_threads``,
    ``on_output``, ``on_metrics``, ``expendable_ranks`` and ``network`` are the launcher's own
    and are not passed to ``fn``.

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
                 expendable_ranks=expendable_ranks, network=network, **kwargs).result()


def start(fn: Callable, world_size: int, *args, backend: str | None = None,
          timeout: float | None = 120.0, num_threads: int = 1,
          on_output: Callable[[int, str, str], None] | None = None,
          on_metrics: Callable[[list[dict]], None] | None = None,
          expendable_ranks: tuple = (), network=None, **kwargs) -> Run:
    """Start ``fn(*args, **kwargs)`` on ``world_size`` processes and return a :class:`Run` at once.

    The non-blocking form of :func:`launch`, for widgets: the caller keeps control, can
    watch :meth:`Run.metrics` grow, and can :meth:`Run.stop` the run.

    Args:
        fn: the worker function; it finds the default process group initialized.
        world_size: the number of processes (ranks), 1 to ``MAX_WORLD_SIZE``.
        *args: passed to ``fn`` on every rank.
        **kwargs: passed to ``fn`` on every rank.
        backend: ``"gloo"``, ``"nccl"``, or None for NCCL when there is one GPU per rank.
        timeout: seconds before the whole run is ended as stuck; None for no limit.
        num_threads: torch threads per worker (1 keeps N workers from oversubscribing cores).
        on_output: ``callback(rank, stream, text)`` for the workers' output; by default it is
            printed to this process's stdout/stderr, prefixed by the rank.
        on_metrics: ``callback(records)`` called from a background thread with each batch of
            new metric records, for live plots.
        expendable_ranks: ranks whose death does not end the run (a parameter server's
            workers, say): their result is None and :attr:`Run.lost` says why they died.
        network: a :class:`distlab.communication.netsim.Network` every message of
            :mod:`distlab.comm` pays on every rank (:func:`distlab.comm.inject_network`), or
            None for the machine's own speed.
    """
    _validate(fn, world_size, timeout, num_threads, expendable_ranks)
    if network is not None:
        from distlab.communication.netsim import on_network   # no torch: a light import
        fn = on_network(fn, network)
    return Run(fn, world_size, args, kwargs, backend=resolve_backend(backend, world_size),
               timeout=timeout,
               num_threads=num_threads, on_output=on_output, on_metrics=on_metrics,
               expendable_ranks=expendable_ranks)


# ----------------------------------------------------------------------------------------
# Validation: every bad argument is refused before a process starts.
# ----------------------------------------------------------------------------------------

def _cuda_count() -> int:
    # Importing torch here would be most of a first launch's time (about a second on an
    # idle core) in a session that has not imported it: without a GPU device node there is
    # nothing to count.
    if "torch" not in sys.modules and not (glob.glob("/dev/nvidia[0-9]*")
                                           or os.path.exists("/dev/kfd")):
        return 0
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


def _validate(fn, world_size, timeout, num_threads, expendable_ranks):
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
    ranks = frozenset(expendable_ranks)
    if not ranks <= set(range(world_size)) or len(ranks) == world_size:
        raise ValueError(f"expendable_ranks={sorted(ranks)} must be ranks in "
                         f"0..{world_size - 1}, and not all of them")
