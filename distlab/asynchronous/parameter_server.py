"""Asynchronous SGD on a parameter server, with a staleness bound you can turn.

The classic architecture of Downpour SGD (Dean et al. 2012) and of Li et al. 2014
("Scaling distributed machine learning with the parameter server", OSDI): ranks
``0 .. num_servers-1`` hold the parameters, the other ranks are workers.  Each worker loops:

1. **pull** the parameters (with their *version*: how many updates the server has applied),
2. compute a gradient on a minibatch of its own shard of the data,
3. **push** the gradient, tagged with the version it was computed on.

The server applies each gradient as it arrives, with no global barrier.  By the time it
lands, other workers may have updated the parameters ``tau`` times: the gradient's measured
**staleness** ``tau = version_now - version_read`` (the ``staleness`` column of the metrics).

Consistency models (Ho et al. 2013, "More effective distributed ML via a stale synchronous
parallel parameter server", NeurIPS, section 3):

* ``staleness=0`` - **BSP**, bulk synchronous: every worker waits for the slowest at every
  clock; the server averages the round's gradients into one update (exactly synchronous
  SGD, ``tau = 0``);
* ``staleness=s`` - **SSP**: a worker may start its clock ``c`` only if the slowest worker
  has finished clock ``c - s - 1`` (it is at most ``s`` clocks ahead);
* ``staleness=None`` - fully **asynchronous** (Hogwild-style server, Downpour).

Under SSP(s) with W workers the update delay is bounded too: ``tau <= (2s+1)(W-1)``
(:func:`max_delay`; each other worker can push at most ``2s+1`` clocks during one of yours).

Options to rescue a diverging run: the staleness-aware learning rate of Zhang et al. 2016
("Staleness-aware async-SGD for distributed deep learning", IJCAI, section 3.2: the step of a
gradient with staleness ``tau`` is ``lr / tau``) and gradient-norm clipping.  Stragglers are
injected per worker (a slowdown factor, or a seeded random delay), and a worker can be
killed mid-run (``SIGKILL``, no goodbye): the server notices its silence (a heartbeat timeout,
as in Li et al. 2014, section 4.3), reports the loss and carries on with the others. The
workers are launched as ``expendable_ranks``, so the launcher lets the run go on too.

Communication cost per gradient (alpha-beta model, P parameters, S server shards): the worker
sends and receives P floats in S messages each, ``2S alpha + 2P beta``; an unsharded server
moves ``2WP`` floats per round of W gradients through one network link, a sharded server
``2WP/S`` through each of S links, which is why sharding removes the server bottleneck.

The verbs: :func:`train` is what runs on each rank (ranks below ``num_servers`` serve, the
others work), :func:`start` launches ``num_servers + num_workers`` real processes and returns
the :class:`distlab.Run` at once, :func:`run` waits for it and returns a :class:`Result`,
and :func:`reference` is the single-process synchronous SGD that ``staleness=0`` equals.

The pieces, each a page: :mod:`~distlab.asynchronous.ps_config` (the settings, the SSP rule,
the wire format), :mod:`~distlab.asynchronous.ps_server` (a server shard, one method per
event), :mod:`~distlab.asynchronous.ps_worker` (pull, compute, push).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector

from distlab.asynchronous.ps_config import (ParameterServerConfig, max_delay, may_proceed,
                                            worker_batch)
from distlab.asynchronous.ps_server import ParameterServer
from distlab.asynchronous.ps_worker import work
from distlab.launcher import start as _start
from distlab.problems import convex

__all__ = ["ParameterServerConfig", "Result", "collect", "max_delay", "may_proceed",
           "reference", "run", "start", "train"]


def train(config: ParameterServerConfig, group=None) -> dict:
    """The body of every rank: ranks below ``num_servers`` serve, the others work.

    Returns the rank's summary; every one has a ``loss``: on a server shard, the loss of
    the final parameters (on the first ``eval_size`` examples), on a worker, the loss of the
    parameters it pulled last.
    """
    if not isinstance(config, ParameterServerConfig):
        raise TypeError(f"config must be a ParameterServerConfig, got {type(config).__name__}")
    if dist.get_backend(group) != "gloo":
        raise ValueError(f"the parameter server needs a gloo group (a server receives from "
                         f"any source, which {dist.get_backend(group)} cannot); pass "
                         f"group=dist.new_group(backend='gloo')")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if world_size != config.world_size:
        raise ValueError(f"this config needs world_size={config.world_size} "
                         f"(num_servers + num_workers), got {world_size}")
    if rank < config.num_servers:
        return ParameterServer(config, rank, group).serve()
    return work(config, rank - config.num_servers, group)


def start(config: ParameterServerConfig, timeout: float | None = 300, **launch_kwargs):
    """Launch ``config.world_size`` processes and return the :class:`distlab.Run` at once.

    The workers are expendable: if one dies, the launcher lets the run go on.
    """
    if not isinstance(config, ParameterServerConfig):
        raise TypeError(f"config must be a ParameterServerConfig, got {type(config).__name__}")
    launch_kwargs.setdefault("expendable_ranks",
                             tuple(range(config.num_servers, config.world_size)))
    config = replace(config, workload=config.workload.loaded())   # the data travels with it
    return _start(train, config.world_size, config, timeout=timeout, **launch_kwargs)


def run(config: ParameterServerConfig, **launch_kwargs) -> Result:
    """Run the parameter server to the end (blocking) and return its :class:`Result`."""
    return collect(start(config, **launch_kwargs))


def reference(config: ParameterServerConfig) -> torch.Tensor:
    """Single-process synchronous SGD on the same data: what ``staleness=0`` must equal.

    At step t every worker's minibatch gradient is taken at the same parameters and the
    mean of them, in worker order, is applied by the same ``torch.optim.SGD``. It runs all
    ``num_steps`` (no target, no divergence stop) and ignores the staleness bound: for
    ``staleness > 0`` it is the synchronous run to compare with.
    """
    workload = config.workload.loaded()
    model, ds = workload.build_model(), workload.dataset
    x = parameters_to_vector(model.parameters()).detach().clone()   # (P,)
    optimizer = workload.optimizer([x])
    for t in range(workload.num_steps):
        grads = []
        for w in range(config.num_workers):
            idx = worker_batch(config, ds, w, t)
            grads.append(convex.flat_gradient(model, workload.loss, ds.X[idx], ds.y[idx], x,
                                              config.clip)[1])
        x.grad = torch.stack(grads).mean(0)    # (W, P) -> (P,)
        optimizer.step()
    return x.detach()


@dataclass
class Result:
    """What a finished run gives back: parameters, metrics and what the servers saw."""
    params: torch.Tensor
    """The final flat parameter vector (the shards put back together)."""
    metrics: object
    """The tidy metrics DataFrame (server: ``loss``, and per gradient ``worker``,
    ``staleness``, ``lr``; workers: ``compute_time``, ``bytes_sent`` ...)."""
    servers: list
    workers: list
    """The surviving workers' summaries."""
    died: dict
    """``{rank: how it died}`` for worker processes that died, as the launcher saw it."""

    @property
    def loss(self) -> float:
        """The loss of the final parameters on the first ``eval_size`` training examples."""
        return self.servers[0]["loss"]

    @property
    def diverged(self) -> str | None:
        return self.servers[0]["diverged"]

    @property
    def lost(self) -> dict:
        """``{worker: why}`` for the workers the server gave up on."""
        return self.servers[0]["lost"]


def collect(run_handle) -> Result:
    """Wait for a run started by :func:`start` and assemble its :class:`Result`."""
    results = run_handle.result()
    servers = [r for r in results if r is not None and r["role"] == "server"]
    return Result(torch.cat([s["params"] for s in servers]), run_handle.metrics(), servers,
                  [r for r in results if r is not None and r["role"] == "worker"],
                  dict(getattr(run_handle, "lost", {})))
