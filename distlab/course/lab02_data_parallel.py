"""Lab 02's runs: the timeline runs and the weak-scaling sweep.

The algorithms are in :mod:`distlab.data_parallel` (``ddp``: naive to bucketed DDP;
``sync_sgd``: the training loop and its single-process reference); this module only runs
them, measures them and draws them. The lab's panel needs no adapter here: it is
``RunPanel(controls, sync_sgd.start, figures, config=base)``, its controls the config's
fields (``world_size``, ``variant``, ...) and its workload's (``lr``, ``batch_size``).
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import plotly.express as px

from distlab.data_parallel import sync_sgd
from distlab.data_parallel.sync_sgd import SyncSGDConfig
from distlab.checks import is_int, require_arg
from distlab.launcher import MAX_WORLD_SIZE


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
    """Weak scaling: ``config`` on each number of ``nodes``, with and without LR scaling.

    The per-node batch stays ``config``'s share, ``B = workload.batch_size / world_size``, so
    the run on ``n`` nodes has a global batch of ``n * B``. With ``figure`` (a
    :class:`~distlab.ui.figures.LiveFigure`), each run's held-out loss is added to it.

    Returns:
        One row per run: ``nodes, lr_scaling, step_time_ms, examples_per_s, val_loss,
        accuracy, bytes_per_step`` (rank 1's, or rank 0's alone; rank 0 also sent the first
        broadcast) and ``efficiency`` = T(1)/T(N), the one-node step time over this one's.
    """
    nodes = tuple(nodes)
    require_arg("scaling_sweep: nodes", nodes,
                nodes and all(is_int(n) and 1 <= n <= MAX_WORLD_SIZE for n in nodes),
                f"ints in 1..{MAX_WORLD_SIZE}, at least one")
    per_node = config.workload.batch_size // config.world_size
    rows = []
    for n in nodes:
        workload = replace(config.workload, batch_size=n * per_node)
        for lr_scaling in ((False,) if n == 1 else (False, True)):
            run = sync_sgd.start(replace(config, workload=workload, world_size=n,
                                         lr_scaling=lr_scaling), timeout=120)
            out = run.result()
            if figure is not None:
                figure.add_frame(run.metrics().dropna(subset=["val_loss"]),
                                 f"{n} nodes" + (", LR scaling" if lr_scaling else ""))
            step_time = max(o["wall_time"] for o in out) / workload.num_steps
            rows.append({"nodes": n, "lr_scaling": lr_scaling, "step_time_ms": 1e3 * step_time,
                         "examples_per_s": workload.batch_size / step_time,
                         "val_loss": out[0]["final"]["val_loss"],
                         "accuracy": out[0]["final"].get("accuracy"),
                         "bytes_per_step": out[1 % n]["final"]["bytes_sent"] / workload.num_steps})
    sweep = pd.DataFrame(rows)
    one_node = sweep.loc[sweep.nodes == min(nodes), "step_time_ms"].iloc[0]
    sweep["efficiency"] = one_node / sweep["step_time_ms"]
    return sweep


def efficiency_figure(sweep: pd.DataFrame):
    """Weak-scaling efficiency T(1)/T(N) against the number of nodes (runs without LR scaling)."""
    weak = sweep[~sweep.lr_scaling]
    return px.line(weak, x="nodes", y="efficiency", markers=True, range_y=[0, 1.2],
                   title="weak scaling efficiency T(1)/T(N), fixed batch per node (this machine)")
