"""Lab 02's runs: counted runs, the timeline runs, the scaling sweep and the ring's traffic.

The algorithms are in :mod:`distlab.data_parallel` (``ddp``: naive to bucketed DDP;
``sync_sgd``: the training loop and its single-process reference); this module only runs
them, measures them and draws them. The lab's panel needs no adapter here: it is
``RunPanel(controls, sync_sgd.start, figures, config=base)``, its controls the config's
fields (``world_size``, ``variant``, ``warmup_steps``, ...) and its workload's (``lr``,
``batch_size``).

Bytes: gloo's built-in all-reduce moves bytes the ledger cannot see, so it books its
**model bytes** (the ring formula, :mod:`distlab.comm`); :func:`ring_traffic` averages the
gradients over distlab's own ring instead, whose messages are real sends, counted as sent.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import plotly.express as px
import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, require_arg
from distlab.communication import collectives
from distlab.data_parallel import sync_sgd
from distlab.data_parallel.sync_sgd import SyncSGDConfig
from distlab.launcher import MAX_WORLD_SIZE


def run_counted(config: SyncSGDConfig, **launch) -> list[dict]:
    """:func:`~distlab.data_parallel.sync_sgd.run`, each rank's result with ``"ops"`` added:
    its ledger by operation (``{"all_reduce": {"calls", ...}, "broadcast": ...}``)."""
    return launcher.launch(_train_counted, config.world_size,
                           replace(config, workload=config.workload.loaded()), **launch)


def _train_counted(config: SyncSGDConfig) -> dict:
    out = sync_sgd.train(config)   # it resets the ledger first: what follows is this run's
    return {**out, "ops": comm.ledger().by_op()}


def timeline(config: SyncSGDConfig, steps: int = 3, **fields) -> list[dict]:
    """Every rank's compute and communication intervals of steps 1..``steps`` of one run.

    ``fields`` change the config first (``variant="flat"``, say). The events are those of
    :func:`~distlab.data_parallel.sync_sgd.train`'s ``"timeline"``, for
    :func:`distlab.ui.figures.timeline_figure`.
    """
    require_arg("timeline: steps", steps, is_int(steps) and steps >= 1, "an int >= 1")
    out = sync_sgd.run(replace(config, timeline_steps=steps, **fields))
    return [event for rank_out in out for event in rank_out["timeline"]]


def all_reduces_during_backward(events: list[dict]) -> int:
    """How many all-reduces started before their rank's backward of the same step ended."""
    backward_end = {(e["rank"], e["step"]): e["end"] for e in events if e["kind"] == "backward"}
    return sum(e["start"] < backward_end[e["rank"], e["step"]]
               for e in events if e["kind"] == "all_reduce")


def scaling_sweep(config: SyncSGDConfig, nodes=(1, 2, 4), figure=None) -> pd.DataFrame:
    """Weak scaling at equal epochs: ``config`` on each number of ``nodes``, with and without
    the linear scaling rule.

    The per-node batch stays ``config``'s share, ``B = workload.batch_size / world_size``, so
    the run on ``n`` nodes has a global batch of ``n * B``; it takes ``workload.num_steps / n``
    steps (and ``warmup_steps / n`` of warmup), so every run sees the same examples: the same
    epochs, as Goyal et al. (2017, section 2) compare them. With ``figure`` (a
    :class:`~distlab.ui.figures.LiveFigure` with ``x="epoch"``), each run's held-out loss is
    added to it.

    Returns:
        One row per run: ``nodes, lr_scaling, num_steps, epochs, step_time_ms,
        examples_per_s, val_loss, accuracy, model_bytes_per_step`` (rank 1's, or rank 0's
        alone; rank 0 also sent the first broadcast; gloo's bytes, booked by the ring
        formula) and ``efficiency`` = T(1)/T(N), the one-node step time over this one's.
    """
    nodes = tuple(nodes)
    steps = config.workload.num_steps
    require_arg("scaling_sweep: nodes", nodes,
                nodes and all(is_int(n) and 1 <= n <= MAX_WORLD_SIZE and steps % n == 0
                              for n in nodes),
                f"ints in 1..{MAX_WORLD_SIZE} dividing workload.num_steps={steps}, at least one")
    per_node = config.workload.batch_size // config.world_size
    size = len(config.workload.loaded().dataset.y)
    rows = []
    for n in nodes:
        workload = replace(config.workload, batch_size=n * per_node, num_steps=steps // n)
        for lr_scaling in ((False,) if n == 1 else (False, True)):
            run = sync_sgd.start(replace(config, workload=workload, world_size=n,
                                         lr_scaling=lr_scaling,
                                         warmup_steps=config.warmup_steps // n,
                                         eval_every=max(1, config.eval_every // n)), timeout=120)
            out = run.result()
            if figure is not None:
                curve = run.metrics().dropna(subset=["val_loss"])
                epoch = (curve["step"] + 1) * workload.batch_size / size
                figure.add_frame(curve.assign(epoch=epoch),
                                 f"{n} nodes" + (", LR scaling" if lr_scaling else ""))
            step_time = max(o["wall_time"] for o in out) / workload.num_steps
            rows.append({"nodes": n, "lr_scaling": lr_scaling, "num_steps": workload.num_steps,
                         "epochs": workload.num_steps * workload.batch_size / size,
                         "step_time_ms": 1e3 * step_time,
                         "examples_per_s": workload.batch_size / step_time,
                         "val_loss": out[0]["final"]["val_loss"],
                         "accuracy": out[0]["final"].get("accuracy"),
                         "model_bytes_per_step":
                             out[1 % n]["final"]["bytes_sent"] / workload.num_steps})
    sweep = pd.DataFrame(rows)
    one_node = sweep.loc[sweep.nodes == min(nodes), "step_time_ms"].iloc[0]
    sweep["efficiency"] = one_node / sweep["step_time_ms"]
    return sweep


def ring_traffic(config: SyncSGDConfig, nodes=(2, 4)) -> pd.DataFrame:
    """The bytes one data-parallel step sends when its gradients are averaged over distlab's
    own ring all-reduce (:func:`distlab.communication.collectives.ring_all_reduce`), counted
    from its real sends, on each number of ``nodes`` (the per-node batch of ``config``).

    Each rank computes the gradient of its share of step 0's global batch, flattens it, sums
    it around the ring and divides by the number of nodes; the result is checked against
    :func:`distlab.data_parallel.ddp.average_gradients` (gloo's all-reduce) on every rank.

    Returns:
        One row per rank: ``nodes, rank, gradient_bytes`` (n), ``bytes_sent`` (counted from
        the ring's sends) and ``model_bytes`` (what the ledger books gloo's all-reduce of n
        bytes at: ``2(p-1)/p·n``).
    """
    nodes = tuple(nodes)
    require_arg("ring_traffic: nodes", nodes,
                nodes and all(is_int(n) and 1 <= n <= MAX_WORLD_SIZE for n in nodes),
                f"ints in 1..{MAX_WORLD_SIZE}, at least one")
    per_node = config.workload.batch_size // config.world_size
    rows = []
    for n in nodes:
        workload = replace(config.workload, batch_size=n * per_node).loaded()
        rows += launcher.launch(_ring_step, n, replace(config, workload=workload, world_size=n),
                                timeout=120)
    return pd.DataFrame(rows)


def _ring_step(config: SyncSGDConfig) -> dict:
    from distlab.communication import alpha_beta
    from distlab.data_parallel import ddp
    rank, p = dist.get_rank(), dist.get_world_size()
    workload = config.workload.loaded()
    ds, model = workload.dataset, workload.build_model()
    idx = sync_sgd.batch_indices(config, rank, 0, len(ds.y))
    workload.loss(model(ds.X[idx]), ds.y[idx]).backward()
    params = [q for q in model.parameters() if q.requires_grad]
    flat = torch.cat([q.grad.reshape(-1) for q in params])   # (n,): every gradient, end to end
    comm.ledger().reset()
    collectives.ring_all_reduce(flat)
    sent = comm.ledger().by_op()["send"]["bytes_sent"] if p > 1 else 0
    flat /= p
    ddp.average_gradients(params)                            # gloo's, to compare with
    torch.testing.assert_close(flat, torch.cat([q.grad.reshape(-1) for q in params]))
    n = comm.nbytes(flat)
    return {"nodes": p, "rank": rank, "gradient_bytes": n, "bytes_sent": sent,
            "model_bytes": alpha_beta.ring_all_reduce_bytes(n, p)}


def efficiency_figure(sweep: pd.DataFrame):
    """Weak-scaling efficiency T(1)/T(N) against the number of nodes (runs without LR scaling)."""
    weak = sweep[~sweep.lr_scaling]
    return px.line(weak, x="nodes", y="efficiency", markers=True, range_y=[0, 1.2],
                   title="weak scaling efficiency T(1)/T(N), fixed batch per node (this machine)")
