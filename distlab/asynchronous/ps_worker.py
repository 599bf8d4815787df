"""A worker of the parameter server: pull, compute a gradient, push (Dean et al. 2012).

Each clock the worker receives from every server shard ``[GO or STOP, version]`` and that
shard's slice of the parameters, measures the loss of what it pulled on fixed examples,
computes a minibatch gradient on its own shard of the data, and pushes each shard its slice
``[worker, clock, version_read, loss] + g[lo:hi]``. It never learns the staleness of its
gradient: the server measures and reports it.

Communication per clock with S shards and P parameters: ``2S alpha + 2P beta``.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from distlab import comm
from distlab.asynchronous.ps_config import (BYE, GO, REPLY_HEAD, STOP, ParameterServerConfig,
                                            shard_bounds, worker_batch)
from distlab.metrics import report
from distlab.problems import convex


def work(config: ParameterServerConfig, worker: int, group=None) -> dict:
    """Worker ``worker`` (rank ``num_servers + worker``) until a shard tells it to stop."""
    workload = config.workload.loaded()
    model, ds, loss_fn = workload.build_model(), workload.dataset, workload.loss
    bounds = shard_bounds(sum(p.numel() for p in model.parameters()), config.num_servers)
    slowdown = config.slowdown[worker] if worker < len(config.slowdown) else 1.0
    delays = torch.Generator().manual_seed(workload.seed * 31 + worker)
    X_eval, y_eval = ds.X[:config.eval_size], ds.y[:config.eval_size]
    clock, compute_time, loss = 0, 0.0, None
    while True:
        replies = [torch.empty(REPLY_HEAD + hi - lo) for lo, hi in bounds]
        for wk in [comm.irecv(r, j, group=group) for j, r in enumerate(replies)]:
            wk.wait()
        if any(r[0] == STOP for r in replies):
            _say_goodbye(worker, bounds, replies, group)
            break
        if worker == config.drop_worker and clock == config.drop_at:
            print(f"worker {worker}: killed at clock {clock} (injected failure)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no message: a crash
            time.sleep(60)                         # SIGKILL is delivered asynchronously
        versions = [int(r[1]) for r in replies]
        flat = torch.cat([r[REPLY_HEAD:] for r in replies])   # (P,)
        t = time.perf_counter()
        loss = convex.loss_at(model, loss_fn, X_eval, y_eval, flat)   # of what was pulled
        idx = worker_batch(config, ds, worker, clock)
        _, g = convex.flat_gradient(model, loss_fn, ds.X[idx], ds.y[idx], flat, config.clip)
        # A straggler takes `slowdown` times as long as the (simulated) compute.
        work_time = time.perf_counter() - t + config.step_time
        extra = (slowdown - 1.0) * work_time + config.step_time
        if config.random_delay > 0:
            extra += float(torch.empty(1).exponential_(1 / config.random_delay,
                                                       generator=delays))
        time.sleep(extra)
        compute_time += time.perf_counter() - t
        sends = [comm.isend(torch.cat([torch.tensor([worker, clock, versions[j], loss]),
                                       g[lo:hi]]), j, group=group)
                 for j, (lo, hi) in enumerate(bounds)]
        for wk in sends:
            wk.wait()
        report(step=clock, compute_time=compute_time, **comm.ledger().totals())
        clock += 1
    return {"role": "worker", "worker": worker, "clocks": clock, "compute_time": compute_time,
            "loss": loss}


def _say_goodbye(worker: int, bounds, replies, group) -> None:
    """Tell the shards that still said GO that this worker leaves.

    Shards decide to stop independently (each counts its own updates; only shard 0 sees
    the loss), and those that said GO are waiting for a push from this worker.
    """
    byes = [comm.isend(torch.cat([torch.tensor([worker, BYE, 0, 0]), torch.zeros(hi - lo)]),
                       j, group=group)
            for j, ((lo, hi), r) in enumerate(zip(bounds, replies)) if r[0] == GO]
    for wk in byes:
        wk.wait()
