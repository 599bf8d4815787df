"""The parameter server's settings, its SSP rule, and what every rank derives from them.

:class:`ParameterServerConfig` is validated before any process starts. :func:`may_proceed`
is the SSP wait condition (Ho et al. 2013, section 3) and :func:`max_delay` the delay bound
it implies. :func:`worker_batch` and :func:`shard_bounds` are computed the same on every rank
from the config alone, so no rank has to be told them. The wire format of a push and of a
reply (the ``*_HEAD`` constants) is shared by :mod:`~distlab.asynchronous.ps_server` and
:mod:`~distlab.asynchronous.ps_worker`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from distlab.checks import is_int, is_number, require, require_arg
from distlab.problems import data
from distlab.problems.convex import WORKLOAD, require_flat_workload
from distlab.problems.workloads import Workload

STOP, GO, BYE = 0.0, 1.0, -1   # reply codes; BYE in a push's clock: "I am leaving"
PUSH_HEAD = 4                  # a push:  [worker, clock, version_read, loss] + gradient slice
REPLY_HEAD = 2                 # a reply: [GO or STOP, version] + parameter slice
FINAL_TAG = 1                  # the servers' closing exchange, apart from the pushes (tag 0)


@dataclass(frozen=True)
class ParameterServerConfig:
    """How a parameter-server run is set up; validated before any process starts.

    What is trained comes from ``workload``: its model and data, its ``lr`` (the server's
    SGD step), ``num_steps`` (server updates) and ``seed`` (the model, the data shards, the
    minibatches and the random delays). Its ``batch_size`` is the examples of **one push**,
    a worker's minibatch drawn from its own shard: under SSP and async each server update
    applies one push, so that is the examples per optimizer step as :class:`Workload` defines
    it; under BSP an update averages the round's ``num_workers`` pushes, so the synchronous
    SGD it equals sees ``num_workers * batch_size`` examples per step. A push may hold at
    most the worker's shard (``len(data) // num_workers`` examples).
    """

    workload: Workload = field(default_factory=lambda: WORKLOAD)
    """What is trained: ``"linear"`` (regression) or ``"mlp"`` (digits); see above."""
    num_workers: int = 4
    """Worker processes (ranks ``num_servers ..``), 1 to 32."""
    num_servers: int = 1
    """Server ranks; the parameter vector is split evenly across them (sharded server)."""
    staleness: int | None = None
    """SSP bound s in clocks: 0 = BSP (synchronous), None = fully asynchronous."""
    eval_size: int = 512
    """Training examples (the first ones) on which workers measure the loss they pull."""
    staleness_aware: bool = False
    """Divide the step of a gradient with staleness tau by tau (Zhang et al. 2016)."""
    clip: float | None = None
    """Clip each gradient's norm to this value before pushing it; None = no clipping."""
    step_time: float = 0.0
    """Seconds of simulated compute added to every gradient (stands in for a bigger model)."""
    slowdown: tuple = ()
    """Per-worker slowdown factors (worker i takes ``slowdown[i]`` times as long); missing = 1."""
    random_delay: float = 0.0
    """Mean (seconds) of an extra exponential delay per gradient, seeded; 0 = none."""
    target_loss: float | None = None
    """Stop as soon as the training loss is at or below this; None = run num_steps."""
    divergence_factor: float = 1e4
    """The run is declared diverged when the loss exceeds this many times the first loss."""
    worker_timeout: float = 10.0
    """Seconds of silence after which a computing worker is declared lost."""
    drop_worker: int | None = None
    """Kill this worker (0-based) mid-run with SIGKILL, as a crashed machine; None = none."""
    drop_at: int = 5
    """The clock at which ``drop_worker`` is killed."""
    wait_rule: Callable | None = field(default=None, compare=False)
    """``may_proceed(clock, clocks, staleness) -> bool``; None = :func:`may_proceed`."""

    def __post_init__(self):
        require_flat_workload(self)
        require(self, "num_workers", is_int(self.num_workers) and 1 <= self.num_workers <= 32,
                "1..32")
        shard = len(self.workload.loaded().dataset.y) // self.num_workers
        require(self, "workload", self.workload.batch_size <= shard,
                f"a workload with batch_size <= {shard}: a push is a minibatch of one "
                f"worker's shard ({shard} examples with num_workers={self.num_workers})")
        require(self, "num_servers", is_int(self.num_servers) and 1 <= self.num_servers <= 8,
                "1..8")
        require(self, "staleness",
                self.staleness is None or (is_int(self.staleness) and self.staleness >= 0),
                "an int >= 0 (0 = BSP) or None (fully asynchronous)")
        require(self, "eval_size", is_int(self.eval_size) and self.eval_size >= 1,
                "an int >= 1")
        require(self, "staleness_aware", isinstance(self.staleness_aware, bool),
                "True or False")
        require(self, "clip", self.clip is None or (is_number(self.clip) and self.clip > 0),
                "> 0 or None")
        require(self, "step_time", is_number(self.step_time) and 0 <= self.step_time <= 10,
                "0..10 s")
        require(self, "slowdown",
                isinstance(self.slowdown, tuple) and len(self.slowdown) <= self.num_workers
                and all(is_number(f) and 1 <= f <= 100 for f in self.slowdown),
                f"a tuple of at most num_workers={self.num_workers} factors in [1, 100]")
        require(self, "random_delay",
                is_number(self.random_delay) and 0 <= self.random_delay <= 10, "0..10 s")
        require(self, "target_loss", self.target_loss is None or is_number(self.target_loss),
                "a number or None")
        require(self, "divergence_factor",
                is_number(self.divergence_factor) and self.divergence_factor > 1, "> 1")
        longest = self.step_time * max(self.slowdown, default=1) + 10 * self.random_delay
        require(self, "worker_timeout",
                is_number(self.worker_timeout) and self.worker_timeout > longest + 0.5,
                f"> {longest + 0.5:g} s (longer than the slowest gradient)")
        require(self, "drop_worker", self.drop_worker is None
                or (is_int(self.drop_worker) and 0 <= self.drop_worker < self.num_workers),
                f"None or 0..{self.num_workers - 1}")
        require(self, "drop_at", is_int(self.drop_at) and self.drop_at >= 1, "an int >= 1")
        require(self, "wait_rule", self.wait_rule is None or callable(self.wait_rule),
                "None or a function may_proceed(clock, clocks, staleness) -> bool")

    @property
    def world_size(self) -> int:
        return self.num_servers + self.num_workers

    @property
    def mode(self) -> str:
        """``"BSP"``, ``"SSP"`` or ``"async"``."""
        return "async" if self.staleness is None else "BSP" if self.staleness == 0 else "SSP"


def may_proceed(clock: int, clocks: list[int], staleness: int | None) -> bool:
    """The SSP wait condition (Ho et al. 2013, section 3): may a worker start ``clock``?

    ``clocks`` are the clocks of the live workers (gradients each has pushed so far). The
    worker may go on if it is at most ``staleness`` clocks ahead of the slowest one: every
    gradient of clocks ``<= clock - staleness - 1`` has then been applied. None: no bound.
    """
    if not clocks:
        raise ValueError("clocks=[] is out of range; allowed the clocks of at least one live "
                         "worker")
    return staleness is None or clock - min(clocks) <= staleness


def max_delay(staleness: int | None, num_workers: int) -> float:
    """The largest update delay tau that SSP(s) allows: ``(2s+1)(W-1)``; 0 for BSP."""
    require_arg("staleness", staleness, staleness is None or (is_int(staleness) and staleness >= 0),
                "an int >= 0 or None")
    require_arg("num_workers", num_workers, is_int(num_workers) and num_workers >= 1,
                "an int >= 1")
    if staleness is None:
        return math.inf
    return 0 if staleness == 0 else (2 * staleness + 1) * (num_workers - 1)



def worker_batch(config: ParameterServerConfig, ds, worker: int, clock: int) -> torch.Tensor:
    """Row indices of ``worker``'s minibatch at ``clock``: seeded, from its own shard."""
    require_arg("worker", worker, is_int(worker) and 0 <= worker < config.num_workers,
                f"0..{config.num_workers - 1}")
    require_arg("clock", clock, is_int(clock) and clock >= 0, "an int >= 0")
    seed = config.workload.seed
    shard = data.shard_indices(len(ds.y), worker, config.num_workers, seed=seed)
    g = torch.Generator().manual_seed(seed * 1_000_003 + worker * 7919 + clock)
    return shard[torch.randint(len(shard), (config.workload.batch_size,), generator=g)]


def shard_bounds(num_params: int, num_servers: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of each server's slice of the flat parameter vector."""
    require_arg("num_params", num_params, is_int(num_params) and num_params >= 1, "an int >= 1")
    require_arg("num_servers", num_servers, is_int(num_servers) and 1 <= num_servers <= num_params,
                f"1..num_params={num_params}")
    sizes = [len(c) for c in torch.arange(num_params).tensor_split(num_servers)]
    starts = [sum(sizes[:i]) for i in range(num_servers)]
    return [(a, a + n) for a, n in zip(starts, sizes)]
