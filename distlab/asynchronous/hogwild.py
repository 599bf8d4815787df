"""Hogwild!: lock-free SGD on parameters in shared memory, from several real processes.

Niu, Recht, Re and Wright 2011, "HOGWILD!: A lock-free approach to parallelizing stochastic
gradient descent" (NeurIPS), Algorithm 1: every process loops

    pick an example i;  read w on the coordinates e_i it touches;
    compute the gradient g_i of its loss;  w[e_i] -= lr * g_i      (no lock at all)

Two processes may read and write the same coordinate at the same time, and one update can
then overwrite another. When each example touches only a few of many coordinates (a sparse
problem: :func:`distlab.problems.data.sparse_classification`, 10 of 2,000 features), such collisions
are rare, and the paper proves (section 4) that SGD still converges at nearly the serial
rate, while the processes never wait for one another.

Beside it, the naive version: the same loop with a lock around read-update-write
(``lock=True``), which serializes the processes (every update waits for the lock).

How the memory is shared. distlab's workers are forked from a *forkserver*, not from the
notebook, so a tensor made in the notebook is not inherited by them. The parameters live
instead in a small file in a private temporary folder: the caller creates it (zeros), every
worker maps it with ``torch.from_file(path, shared=True)`` (``mmap(MAP_SHARED)``), so all
of them - and the caller afterwards - see the very same pages. No bytes go through
torch.distributed at all: the cost model is that of shared memory (a cache line moves
between cores on a write), not alpha-beta; ``bytes_sent`` stays 0.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, is_number, require, require_arg
from distlab.launcher import start as _start
from distlab.metrics import report
from distlab.problems import data
from distlab.problems.convex import log_loss, sparse_logistic


@dataclass(frozen=True)
class HogwildConfig:
    """A Hogwild! run on sparse logistic regression; validated when it is made.

    Its problem is not a :class:`~distlab.problems.workloads.Workload` (no model, no batches:
    single-example updates of a shared vector, :func:`distlab.problems.convex.sparse_logistic`),
    so it keeps its own ``lr``, ``num_steps`` and ``seed``.
    """

    num_workers: int = 4
    """Processes updating the shared parameters, 1 to 16."""
    lr: float = 0.1
    """Step size of each single-example update."""
    num_steps: int = 2000
    """Updates per worker."""
    lock: bool = False
    """The naive version: a lock around every update (serializes the workers)."""
    num_features: int = 2000
    """Dimension d of the sparse problem."""
    nnz: int = 10
    """Non-zero features per example (the coordinates one update touches)."""
    eval_every: int = 200
    """Rank 0 reports the held-out loss every this many of its steps."""
    step_time: float = 0.0
    """Seconds of simulated compute per update (a sleep: lets 2 cores host 4 workers)."""
    seed: int = 0
    """Seeds the data and each worker's order of examples."""

    def __post_init__(self):
        require(self, "num_workers", is_int(self.num_workers) and 1 <= self.num_workers <= 16,
                "1..16")
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
        require(self, "num_steps", is_int(self.num_steps) and 1 <= self.num_steps <= 10**7,
                "1..1e7")
        require(self, "lock", isinstance(self.lock, bool), "True or False")
        require(self, "num_features",
                is_int(self.num_features) and 2 <= self.num_features <= 10**6, "2..1e6")
        require(self, "nnz", is_int(self.nnz) and 1 <= self.nnz <= self.num_features,
                f"1..num_features={self.num_features}")
        require(self, "eval_every", is_int(self.eval_every) and self.eval_every >= 1,
                "an int >= 1")
        require(self, "step_time", is_number(self.step_time) and 0 <= self.step_time <= 1,
                "0..1 s")
        require(self, "seed", is_int(self.seed), "an int")


def sgd_step(w: torch.Tensor, x_i: torch.Tensor, y_i: torch.Tensor, cols: torch.Tensor,
             lr: float) -> None:
    """One sparse logistic-regression update of ``w`` in place, touching only ``cols``.

    Algorithm 1, line 4, written out rather than as a ``torch.optim.SGD`` step: the point
    is an unlocked read of ``w[cols]`` and a write to those ``nnz`` coordinates of the
    shared pages only; and a sparse-gradient optimizer step costs far more than this
    10-coordinate update itself (about a hundred times, measured on a laptop CPU).
    """
    v = x_i[cols]                                    # (nnz,)
    p = torch.sigmoid(torch.dot(w[cols], v))         # read: may be mid-update by another
    w.index_add_(0, cols, v * (-lr * (p - y_i)))     # write: no lock (Hogwild!)


def train(config: HogwildConfig, path: str, group=None) -> dict:
    """The body of every rank: lock-free SGD on the parameters mapped from ``path``.

    ``path`` is the shared parameter file :func:`start` made (``num_features`` float32,
    zeros); it is the only thing the workers share besides the config.
    """
    if not isinstance(config, HogwildConfig):
        raise TypeError(f"config must be a HogwildConfig, got {type(config).__name__}")
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    ds, cols = problem(config)
    w = torch.from_file(path, shared=True, size=config.num_features)   # the shared pages
    order = example_order(config, rank, len(ds.y))
    lock = open(path + ".lock", "w") if config.lock else None
    comm.barrier(group)                              # start together: a fair race
    t0 = time.perf_counter()
    for t, i in enumerate(order.tolist()):
        if config.step_time:
            time.sleep(config.step_time)
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)         # naive: one update at a time
        sgd_step(w, ds.X[i], ds.y[i], cols[i], config.lr)
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
        if rank == 0 and (t + 1) % config.eval_every == 0:
            # Every worker has made about as many steps: count updates as W times ours.
            report(step=(t + 1) * W, loss=log_loss(w, ds.X_val, ds.y_val))
    elapsed = time.perf_counter() - t0
    report(step=config.num_steps, updates_per_s=config.num_steps / elapsed)
    comm.barrier(group)
    return {"rank": rank, "updates_per_s": config.num_steps / elapsed, "elapsed": elapsed}


def start(config: HogwildConfig, **launch_kwargs):
    """Launch the workers on a fresh shared parameter file; return the :class:`distlab.Run`.

    The file (and its folder) is removed when the run is over: ``start`` is for widgets,
    which read the metrics; use :func:`run` for the final parameters.
    """
    folder, path = _new_shared_file(config)
    handle = _start(train, config.num_workers, config, path, **launch_kwargs)
    threading.Thread(target=lambda: (handle.wait(), shutil.rmtree(folder, ignore_errors=True)),
                     daemon=True).start()
    return handle


def run(config: HogwildConfig, **launch_kwargs) -> tuple[torch.Tensor, list[dict]]:
    """Run Hogwild! to the end; return the final parameters ``(d,)`` and each rank's stats."""
    folder, path = _new_shared_file(config)
    try:
        stats = _start(train, config.num_workers, config, path, **launch_kwargs).result()
        w = torch.from_file(path, shared=False, size=config.num_features).clone()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return w, stats


def reference(config: HogwildConfig) -> torch.Tensor:
    """Serial SGD on the workers' examples, taken in turn (one step of each worker per round).

    What Hogwild! computes when the workers run at the same pace and never collide; with a
    single worker it is exactly the same computation.
    """
    ds, cols = problem(config)
    w = torch.zeros(config.num_features)
    orders = torch.stack([example_order(config, r, len(ds.y))
                          for r in range(config.num_workers)])    # (W, num_steps)
    for i in orders.t().flatten().tolist():                       # round-robin
        sgd_step(w, ds.X[i], ds.y[i], cols[i], config.lr)
    return w


def problem(config: HogwildConfig):
    """The sparse dataset and, per example, the indices of its non-zero features ``(N, nnz)``."""
    return sparse_logistic(config.num_features, config.nnz, config.seed)


def example_order(config: HogwildConfig, worker: int, n: int) -> torch.Tensor:
    """The examples worker ``worker`` visits, in order: seeded draws from its own shard."""
    require_arg("worker", worker, is_int(worker) and 0 <= worker < config.num_workers,
                f"0..{config.num_workers - 1}")
    require_arg("n", n, is_int(n) and n >= config.num_workers,
                f"an int >= num_workers={config.num_workers} (each worker needs an example)")
    shard = data.shard_indices(n, worker, config.num_workers, seed=config.seed)
    g = torch.Generator().manual_seed(config.seed * 7919 + worker)
    return shard[torch.randint(len(shard), (config.num_steps,), generator=g)]


def _new_shared_file(config: HogwildConfig) -> tuple[str, str]:
    """A private folder holding the parameter file, ``num_features`` float32 zeros."""
    if not isinstance(config, HogwildConfig):
        raise TypeError(f"config must be a HogwildConfig, got {type(config).__name__}")
    folder = tempfile.mkdtemp(prefix="distlab-hogwild-")
    path = os.path.join(folder, "w.f32")
    torch.zeros(config.num_features).numpy().tofile(path)    # w_0 = 0
    return folder, path
