"""The budget-matched comparison: every low-communication method on one injected network.

One model, data and seed (an MLP on the digits), the same number of inner steps and the
same ranks for each method; every message pays the same injected latency and bandwidth
(:func:`distlab.comm.inject_network`, so the built-in collectives pay too), and the table
says what each method's loss cost in **bytes sent** and in **wall time** on that network.
The methods, each in its own module, with their messages per step (n parameters of 4
bytes, p ranks, alpha-beta model of :mod:`distlab.communication.alpha_beta`):

- ``ddp``: the gradients' ring all-reduce every step, 2(p-1)/p·4n
  (:func:`distlab.data_parallel.ddp.average_gradients`: PowerSGD's loop with compression
  never started);
- ``local_sgd``: the models' all-reduce every H steps, 2(p-1)/p·4n / H (Stich 2019);
- ``diloco``: the pseudo-gradients' all-reduce every H steps, 2(p-1)/p·4n / H (Douillard et
  al. 2023; :mod:`~distlab.communication_efficient.diloco`);
- ``streaming_diloco``: one of F fragments every H/F steps, 8-bit levels (as float16),
  overlapped, 2(p-1)/p·2n / H (Douillard et al. 2025);
- ``powersgd``: rank-r factors P and Q of every matrix, 2(p-1)/p·4r(rows + cols) plus the
  vectors (Vogels et al. 2019);
- ``topk``: 1% of the gradient, values and indices, all-gathered with error feedback,
  (p-1)·8k with k = n/100 (Karimireddy et al. 2019);
- ``onebit_adam``: 1-bit momenta after a full-precision warm-up, about n/8 after it (Tang et
  al. 2021; :mod:`~distlab.communication_efficient.optimizers`).

Each method keeps its own optimizer settings (DiLoCo's AdamW inner steps, SGD elsewhere);
what is matched is the model, the data, the seed, the inner steps and the network.

    df = compare(["ddp", "diloco", "powersgd"], bandwidth=[GBIT, GBIT / 10])  # 1, 0.1 Gbit/s
    df.groupby(["network", "method"]).wall_time.max()

Everything measured here is labelled **injected** (:meth:`Network.describe`); a bandwidth of
None runs the machine's own loopback beside it, labelled as such.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require_arg
from distlab.communication.netsim import Network
from distlab.communication_efficient import diloco, local_sgd, powersgd, streaming_diloco
from distlab.communication_efficient.local_sgd import LocalSGDConfig
from distlab.problems.workloads import Workload

METHODS = ("ddp", "local_sgd", "diloco", "streaming_diloco", "powersgd", "topk",
           "onebit_adam")
"""Every method :func:`compare` runs, in the order of the table above."""

WORKLOAD = Workload(model="mlp", hidden=512, depth=1, batch_size=32, lr=0.2, num_steps=40)
"""The digits MLP of lab 06, wider (38,410 parameters: 154 kB) so that its messages take
longer on the injected network than ``time.sleep`` oversleeps on a busy machine."""

GBIT = 1e9 / 8
"""Bytes per second of one Gbit/s."""

MACHINE = "machine's own (loopback, nothing injected)"
"""The ``network`` label of a run without an injected network."""


def compare(methods=METHODS, bandwidth=12.5e6, latency: float = 1e-4, world_size: int = 2,
            num_steps: int = 40, period: int = 10, workload: Workload = WORKLOAD,
            timeout: float = 300):
    """Run ``methods`` on one launch of ``world_size`` ranks at each ``bandwidth``; return
    the tidy table.

    Args:
        methods: names from :data:`METHODS`.
        bandwidth: bytes per second per link (``12.5e6`` is 100 Mbit/s), or a list of them;
            None in the list: the machine's own loopback, nothing injected.
        latency: injected seconds per message (alpha), 0 to 1.
        world_size: ranks, 1 to 16.
        num_steps: inner steps of every method, a multiple of ``period``.
        period: H, the steps between two synchronizations of local SGD and DiLoCo (and of
            each streaming fragment), even (streaming DiLoCo's two fragments split it).
        workload: the model, data, seed and batch ("mlp"); its lr is the SGD methods'.
        timeout: seconds for the whole launch.

    Returns:
        A DataFrame with one row per reported step and columns ``network`` (the label),
        ``bandwidth``, ``method``, ``step`` (inner steps done), ``loss`` (the training loss
        the method reports: the averaged model's on the whole training set, or for DDP and
        PowerSGD the global batch's; carried forward between evaluations), ``bytes_sent`` (rank 0's,
        cumulative, from the ledger), ``comm_time`` (its seconds in communication,
        injected sleeps included) and ``wall_time`` (rank 0's seconds since the method
        started).
    """
    import pandas as pd      # here: pandas is half a second of `import distlab`
    bandwidths = list(bandwidth) if isinstance(bandwidth, (list, tuple)) else [bandwidth]
    _check(methods, bandwidths, latency, world_size, num_steps, period, workload)
    base = replace(workload, num_steps=num_steps).loaded()   # the data travels once per config
    plan = [(None if b is None else Network(latency=latency, bandwidth=b), m,
             config(m, base, world_size, period)) for b in bandwidths for m in methods]
    per_rank = launcher.launch(_run_plan, world_size, plan, timeout=timeout)
    frames = []
    for i, (network, method, _) in enumerate(plan):
        ranks = pd.concat([pd.DataFrame(rows[i]).assign(rank=r)
                           for r, rows in enumerate(per_rank)])
        # Rank 0 evaluates the averaged model; DDP's and PowerSGD's ranks each report their
        # slice's loss, whose mean is the global batch's.
        loss = ranks.groupby("row")["loss"].mean()
        df = ranks[ranks["rank"] == 0].set_index("row").drop(columns="rank")
        df["loss"] = loss.ffill()
        df.insert(0, "method", method)
        df.insert(0, "bandwidth", math.inf if network is None else network.bandwidth)
        df.insert(0, "network", MACHINE if network is None else network.describe())
        frames.append(df.dropna(subset=["loss"]).drop_duplicates("step", keep="last"))
    return pd.concat(frames, ignore_index=True)[
        ["network", "bandwidth", "method", "step", "loss", "bytes_sent", "comm_time",
         "wall_time"]]


def config(method: str, workload: Workload, world_size: int, period: int):
    """The configuration :func:`compare` runs ``method`` with (see the module's table)."""
    adamw = replace(workload, optimizer_name="adamw", lr=0.01)   # DiLoCo's inner optimizer
    if method == "ddp":      # PowerSGD's plain all-reduce phase, for the whole run
        return powersgd.PowerSGDConfig(workload=workload, world_size=world_size,
                                       start_iter=workload.num_steps)
    if method == "local_sgd":
        return LocalSGDConfig(workload=workload, world_size=world_size, period=period)
    if method == "diloco":
        return diloco.DiLoCoConfig(workload=adamw, world_size=world_size, inner_steps=period)
    if method == "streaming_diloco":
        return streaming_diloco.StreamingDiLoCoConfig(
            workload=adamw, world_size=world_size, inner_steps=period, num_fragments=2,
            overlap_steps=1, bits=8)
    if method == "powersgd":
        return powersgd.PowerSGDConfig(workload=workload, world_size=world_size,
                                       matrix_rank=1, start_iter=workload.num_steps // 10)
    if method == "topk":
        return LocalSGDConfig(workload=workload, world_size=world_size, period=1,
                              compression="topk", ratio=0.01)
    if method == "onebit_adam":
        return LocalSGDConfig(workload=replace(workload, lr=0.01), world_size=world_size,
                              optimizer="onebit_adam",
                              warmup_steps=max(1, workload.num_steps // 10))
    raise ValueError(f"config: method={method!r} is unknown; allowed {METHODS}")


def timed(network: Network | None, config) -> list[dict]:
    """The worker of one method (call it on every rank): train ``config`` (one of
    :func:`config`'s) with ``network`` injected everywhere (None: nothing injected).

    Returns this rank's records, one per record the method makes and one when it returns:
    ``{"row", "step", "loss" (NaN where the rank reported none), "bytes_sent",
    "comm_time", "wall_time"}``, counted from this call's start.
    """
    train, offset = _TRAIN[type(config)], _STEP_OFFSET.get(type(config), 0)
    rows = []
    with comm.inject_network(network):
        comm.barrier()                      # every rank starts the clock together
        start, t0 = comm.ledger().totals(), time.perf_counter()

        def record(step=None, **values):
            now = comm.ledger().totals()
            rows.append({"row": len(rows), "step": step + offset,
                         "loss": values.get("loss", math.nan),
                         "bytes_sent": now["bytes_sent"] - start["bytes_sent"],
                         "comm_time": now["comm_time"] - start["comm_time"],
                         "wall_time": time.perf_counter() - t0})

        train(config, record=record)
        # The last in-flight messages (streaming DiLoCo's) are waited after the last record.
        record(step=config.workload.num_steps - offset)
    return rows


_TRAIN = {LocalSGDConfig: local_sgd.train, diloco.DiLoCoConfig: diloco.train,
          streaming_diloco.StreamingDiLoCoConfig: streaming_diloco.train,
          powersgd.PowerSGDConfig: powersgd.train}
# PowerSGD records step s before counting it (steps 0..n-1); the others after (1..n).
_STEP_OFFSET = {powersgd.PowerSGDConfig: 1}


def _run_plan(plan) -> list[list[dict]]:
    """The worker: each planned ``(network, method, config)`` in turn, on its network."""
    return [timed(network, config) for network, _, config in plan]




def _check(methods, bandwidths, latency, world_size, num_steps, period, workload):
    require_arg("compare: methods", methods, len(methods) > 0 and not isinstance(methods, str)
                and all(m in METHODS for m in methods), f"a list of names from {METHODS}")
    require_arg("compare: bandwidth", bandwidths, len(bandwidths) > 0 and all(
        b is None or (is_number(b) and b > 0) for b in bandwidths),
        "bytes per second > 0, None (the machine's own), or a list of them")
    require_arg("compare: latency", latency, is_number(latency) and 0 <= latency <= 1,
                "0 to 1 seconds")
    require_arg("compare: world_size", world_size, is_int(world_size) and 1 <= world_size <= 16,
                "integers 1..16")
    require_arg("compare: period", period, is_int(period) and period >= 2 and period % 2 == 0,
                "even integers >= 2")
    require_arg("compare: num_steps", num_steps, is_int(num_steps) and num_steps >= period
                and num_steps % period == 0, f"a multiple of period={period}")
    require_arg("compare: workload", workload, isinstance(workload, Workload)
                and workload.model == "mlp", "an 'mlp' Workload")
