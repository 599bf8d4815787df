"""Lab 01's runs: the live sweep of message sizes behind the panel, and the lab's figures.

:func:`sweep` times one all-reduce algorithm of :mod:`distlab.communication.collectives` over
growing message sizes and reports each as it goes; :func:`start_sweep` starts it from the
panel's controls without blocking; :func:`sweep_frame` turns the panel's records into what
:func:`distlab.communication.cost_model.fit` wants. The figures draw measured times against
the fitted α-β model, the bytes each rank sent, and a traced ring step by step.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication.collectives import ALL_REDUCES
from distlab.communication.cost_model import KIB, MIB, Fit, time_collective
from distlab.communication.netsim import Network
from distlab.launcher import Run, start
from distlab.metrics import report


@dataclass(frozen=True)
class SweepConfig:
    """One run of the lab 01 panel: an all-reduce timed over growing message sizes."""
    algorithm: str = "ring"
    """One of ``collectives.ALL_REDUCES``: ring, recursive_doubling, naive, gloo."""
    max_nbytes: int = MIB
    """The largest message, 4 KiB to 64 MiB; the sweep goes 4 KiB, 16 KiB, ... up to it."""
    repeats: int = 3
    """Timed blocks per size, 1 to 100 (the median is reported)."""
    network: Network | None = None
    """Injected latency and bandwidth, or None for the machine as it is."""

    def __post_init__(self):
        require(self, "algorithm", self.algorithm in ALL_REDUCES, f"one of {list(ALL_REDUCES)}")
        require(self, "max_nbytes",
                is_int(self.max_nbytes) and 4 * KIB <= self.max_nbytes <= 64 * MIB,
                "4096 to 67108864 bytes")
        require(self, "repeats", is_int(self.repeats) and 1 <= self.repeats <= 100, "1..100")
        require(self, "network", self.network is None or isinstance(self.network, Network),
                "None or a distlab.communication.netsim.Network")

    @property
    def sizes(self) -> list[int]:
        """4 KiB, 16 KiB, 64 KiB, ... up to ``max_nbytes``."""
        sizes = [4 * KIB]
        while sizes[-1] * 4 <= self.max_nbytes:
            sizes.append(sizes[-1] * 4)
        return sizes


def sweep(config: SweepConfig, group=None) -> None:
    """The worker: time ``config.algorithm`` at each size and report it as it goes.

    Reports ``step``, ``algorithm``, ``world_size``, ``nbytes``, ``collective_time`` (the
    slowest rank's seconds for one all-reduce) and this rank's ``bytes_sent_per_call``,
    counted from its real sends, or for gloo's built-in all-reduce (whose sends nobody sees)
    ``model_bytes_per_call``, the ring formula the ledger books.
    """
    fn = ALL_REDUCES[config.algorithm]
    for step, nbytes in enumerate(config.sizes):
        comm.ledger().reset()
        fn(torch.ones(nbytes // 4), group, check=False)        # (nbytes/4,) float32: its bytes
        if config.algorithm == "gloo":                         # booked by the ledger's model
            traffic = {"model_bytes_per_call": comm.ledger().totals()["bytes_sent"]}
        else:
            traffic = {"bytes_sent_per_call":
                       comm.ledger().by_op().get("send", {}).get("bytes_sent", 0)}
        t = time_collective(fn, nbytes // 4, group, config.network, config.repeats)
        report(step=step, algorithm=config.algorithm, world_size=dist.get_world_size(group),
               nbytes=nbytes, collective_time=t, **traffic)


def start_sweep(world_size: int = 4, algorithm: str = "ring", max_nbytes: int = MIB,
                inject: bool = False, latency_us: float = 0.0, bandwidth_gbit: float = 10.0,
                on_metrics=None, on_output=None) -> Run:
    """Start :func:`sweep` on ``world_size`` processes without blocking (for a RunPanel).

    With ``inject``, every message pays an **injected** ``latency_us`` microseconds and a
    ``bandwidth_gbit`` Gbit/s link (:class:`distlab.communication.netsim.Network`). Bad
    values raise here, before any process starts, whether ``inject`` is ticked or not.
    """
    require_arg("start_sweep: inject", inject, isinstance(inject, bool), "True or False")
    for name, value in (("latency_us", latency_us), ("bandwidth_gbit", bandwidth_gbit)):
        if not (is_number(value) or value == math.inf):
            raise ValueError(f"start_sweep: {name}={value!r} is not a number")
    network = Network(latency=latency_us * 1e-6, bandwidth=bandwidth_gbit * 1e9 / 8)
    config = SweepConfig(algorithm=algorithm, max_nbytes=max_nbytes,
                         network=network if inject else None)
    return start(sweep, world_size, config, on_metrics=on_metrics, on_output=on_output,
                 timeout=300)


def idle_cores(seconds: float = 0.5) -> float:
    """How many of the machine's cores sat idle during the next ``seconds`` (Linux's
    ``/proc/stat``; elsewhere the cores minus the 1-minute load average).

    The α-β fit holds where every rank has a core to itself: on a machine that other
    programs keep busy that is not so, whatever p is.
    """
    require_arg("seconds", seconds, is_number(seconds) and 0 < seconds <= 10,
                "a number in (0, 10]")
    cores = os.cpu_count() or 1
    if not os.path.exists("/proc/stat"):
        return max(0.0, cores - os.getloadavg()[0])

    def idle_and_total():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]   # the "cpu" line: all cores
        return values[3] + values[4], sum(values)                 # idle + iowait, all

    idle0, total0 = idle_and_total()
    time.sleep(seconds)
    idle1, total1 = idle_and_total()
    return cores * (idle1 - idle0) / max(1, total1 - total0)


def sweep_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """A RunPanel's metrics as :func:`~distlab.communication.cost_model.fit` wants them:
    ``run, algorithm, world_size, nbytes, time`` (one row per run and size)."""
    df = metrics.dropna(subset=["collective_time"])
    df = df.groupby(["run", "algorithm", "world_size", "nbytes"], as_index=False)[
        "collective_time"].max()
    return df.rename(columns={"collective_time": "time"})


# ----------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------

def figure_time_vs_size(measurements: pd.DataFrame, fits: dict[str, Fit], title=None):
    """Measured time per all-reduce against message size (markers), one colour per
    algorithm and world size, with the fitted alpha-beta model drawn as a line."""
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    keys = measurements[["algorithm", "world_size"]].drop_duplicates().itertuples(index=False)
    for i, (algorithm, p) in enumerate(keys):
        df = measurements[(measurements.algorithm == algorithm)
                          & (measurements.world_size == p)].sort_values("nbytes")
        color = palette[i % len(palette)]
        name = f"{algorithm}, {p} ranks"
        fig.add_scatter(x=df.nbytes, y=df.time, mode="markers", name=f"{name} (measured)",
                        marker=dict(color=color, size=8), legendgroup=name)
        if algorithm in fits:
            sizes = np.geomspace(df.nbytes.min(), df.nbytes.max(), 50)
            fig.add_scatter(x=sizes, y=fits[algorithm].predict(sizes, int(p)), mode="lines",
                            name=f"{name} (α-β model)", line=dict(color=color, dash="dot"),
                            legendgroup=name)
    fig.update_layout(title=title or "time of one all-reduce: measured and α-β model",
                      xaxis=dict(type="log", title="nbytes (message size, bytes)"),
                      yaxis=dict(type="log", title="collective_time (s)"),
                      template="plotly_white", height=420)
    return fig


def figure_bytes_per_rank(bytes_sent: dict[str, list[int]], nbytes: int):
    """Bar chart: bytes each rank sent, one group of bars per algorithm.

    Args:
        bytes_sent: ``{algorithm: [bytes sent by rank 0, rank 1, ...]}``.
        nbytes: the size of the tensor that was all-reduced (drawn as a dashed line).
    """
    fig = go.Figure()
    for algorithm, per_rank in bytes_sent.items():
        fig.add_bar(x=[f"rank {r}" for r in range(len(per_rank))], y=per_rank, name=algorithm)
    fig.add_hline(y=nbytes, line_dash="dash", annotation_text="n (the tensor's bytes)")
    fig.update_layout(barmode="group", title="bytes sent per rank in one all-reduce",
                      yaxis_title="bytes_sent", template="plotly_white", height=360)
    return fig


def figure_timeline(trace: list[dict]):
    """Per-rank timeline of one traced collective: which rank sends which chunk, when.

    ``trace`` is the concatenation of every rank's ``trace`` list. Each bar is one step of
    one rank (from posting its send and receive to both finishing), coloured by the chunk
    it sent and labelled with the receiver.
    """
    t0 = min(e["start"] for e in trace)
    num_ranks = len({e["rank"] for e in trace})
    fig = go.Figure()
    for chunk in sorted({e["chunk"] for e in trace}):
        evs = [e for e in trace if e["chunk"] == chunk]
        fig.add_bar(
            y=[f"rank {e['rank']}" for e in evs], x=[1e3 * (e["end"] - e["start"]) for e in evs],
            base=[1e3 * (e["start"] - t0) for e in evs], orientation="h", name=f"chunk {chunk}",
            text=[f"{e['phase']}: chunk {e['chunk']} → rank {e['dst']}" if e["dst"] is not None
                  else e["phase"] for e in evs],
            hovertemplate="%{text}<br>%{base:.2f} ms + %{x:.2f} ms<extra></extra>")
    fig.update_layout(barmode="overlay", title="one ring all-reduce, step by step",
                      xaxis_title="time since the first send (ms)", template="plotly_white",
                      yaxis=dict(autorange="reversed"), height=80 + 50 * num_ranks)
    return fig
