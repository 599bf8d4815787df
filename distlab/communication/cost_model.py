"""The alpha-beta cost model of collectives: the textbook formulas, measured and fitted.

A message of n bytes between two ranks takes ``alpha + n·beta`` seconds: alpha is the
latency (start-up cost of any message), beta the time per byte (one over the bandwidth).
Thakur, Rabenseifner and Gropp ("Optimization of Collective Communication Operations in
MPICH", IJHPCA 2005, sections 2 and 4) give every collective algorithm's time as

    T(n, p) = a(p)·alpha + b(n, p)·beta

for p ranks. :func:`terms` returns ``(a, b)``; :func:`predict` the time. Reduction
arithmetic (their gamma term) grows with n exactly like b in every algorithm here, so a fit
of alpha and beta per algorithm absorbs it.

On your machine: :func:`measure` times the algorithms of :mod:`distlab.communication.collectives` on real
processes over a grid of message sizes and world sizes, and :func:`fit` finds the alpha and
beta that explain the measurements best (least squares on the *relative* error, so 4 KiB
and 16 MiB count alike), reporting how far the model is off.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from distlab import comm
from distlab.communication.collectives import ALL_REDUCES
from distlab.checks import is_int, require
from distlab.launcher import Run, launch, start
from distlab.metrics import report
from distlab.communication.netsim import Network

KIB, MIB = 1024, 1024 * 1024
ALGORITHMS = ("ring", "recursive_doubling", "naive", "gloo", "reduce_scatter", "all_gather")


def terms(algorithm: str, nbytes: int, world_size: int) -> tuple[float, float]:
    """``(a, b)`` with ``time = a·alpha + b·beta`` for one collective of ``nbytes`` on p ranks.

    ====================  ==================  ========================
    algorithm             a (messages)        b (bytes on the slowest link)
    ====================  ==================  ========================
    ring (and gloo)       2(p-1)              2(p-1)/p·n
    reduce_scatter        p-1                 (p-1)/p·n
    all_gather            p-1                 (p-1)/p·n
    recursive_doubling    lg p                lg p·n          (p a power of two)
                          floor(lg p)+2       (floor(lg p)+2)·n  (otherwise)
    naive                 2(p-1)              2(p-1)·n
    ====================  ==================  ========================
    """
    p, n = world_size, nbytes
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is unknown; allowed {ALGORITHMS}")
    if p == 1:
        return 0.0, 0.0
    if algorithm in ("ring", "gloo"):
        return 2 * (p - 1), 2 * (p - 1) / p * n
    if algorithm in ("reduce_scatter", "all_gather"):
        return p - 1, (p - 1) / p * n
    if algorithm == "recursive_doubling":
        rounds = math.log2(p) if p & (p - 1) == 0 else math.floor(math.log2(p)) + 2
        return rounds, rounds * n
    return 2 * (p - 1), 2 * (p - 1) * n


def predict(algorithm: str, nbytes: int, world_size: int, alpha: float, beta: float) -> float:
    """The model's time in seconds: ``a·alpha + b·beta`` (see :func:`terms`)."""
    a, b = terms(algorithm, nbytes, world_size)
    return a * alpha + b * beta


@dataclass(frozen=True)
class Fit:
    """alpha and beta fitted to one algorithm's measurements, and how well they fit."""
    algorithm: str
    alpha: float
    """Seconds per message."""
    beta: float
    """Seconds per byte."""
    median_error: float
    """Median over the measurements of |model - measured| / measured."""
    max_error: float
    """Largest relative error."""
    num_points: int

    @property
    def bandwidth(self) -> float:
        """Bytes per second, ``1 / beta``."""
        return 1.0 / self.beta if self.beta > 0 else math.inf

    def predict(self, nbytes, world_size: int):
        """Model time(s) for one size or an array of sizes."""
        a, b = np.vectorize(lambda n: terms(self.algorithm, n, world_size))(np.asarray(nbytes))
        return a * self.alpha + b * self.beta

    def __str__(self):
        return (f"{self.algorithm}: alpha = {1e6 * self.alpha:.1f} µs, "
                f"beta = {1e9 * self.beta:.3f} ns/B ({self.bandwidth / 1e9:.2f} GB/s), "
                f"median error {100 * self.median_error:.0f}% (max {100 * self.max_error:.0f}%)"
                f" over {self.num_points} points")


def fit(measurements: pd.DataFrame) -> dict[str, Fit]:
    """Fit alpha and beta per algorithm to ``measurements`` (columns ``algorithm``,
    ``world_size``, ``nbytes``, ``time`` as :func:`measure` returns them).

    Least squares on relative errors: each row ``a·alpha + b·beta ≈ t`` is divided by t.
    Both parameters are kept non-negative (a negative one is dropped and the other refitted).
    """
    fits = {}
    for algorithm, df in measurements.groupby("algorithm", sort=False):
        ab = np.array([terms(algorithm, n, p) for n, p in zip(df["nbytes"], df["world_size"])])
        t = df["time"].to_numpy(dtype=float)
        A = ab / t[:, None]                                   # rows scaled to relative error
        ones = np.ones_like(t)
        coef = np.linalg.lstsq(A, ones, rcond=None)[0]
        if coef.min() < 0:                                    # keep only the useful term
            single = [np.linalg.lstsq(A[:, [j]], ones, rcond=None)[0][0] for j in (0, 1)]
            errs = [np.abs(A[:, j] * max(c, 0) - 1).sum() for j, c in enumerate(single)]
            j = int(np.argmin(errs))
            coef = np.zeros(2)
            coef[j] = max(single[j], 0.0)
        rel = np.abs(ab @ coef - t) / t
        fits[algorithm] = Fit(algorithm, float(coef[0]), float(coef[1]),
                              float(np.median(rel)), float(rel.max()), len(t))
    return fits


def relative_errors(measurements: pd.DataFrame, fits: dict[str, Fit]) -> pd.Series:
    """|model - measured| / measured for every row of ``measurements``."""
    model = [predict(a, n, p, fits[a].alpha, fits[a].beta) for a, n, p in
             zip(measurements["algorithm"], measurements["nbytes"], measurements["world_size"])]
    return (np.asarray(model) - measurements["time"]).abs() / measurements["time"]


# ----------------------------------------------------------------------------------------
# Measuring on real processes.
# ----------------------------------------------------------------------------------------

def _time_one(fn, numel, group, network, repeats, iters) -> float:
    """Median over ``repeats`` blocks of the per-call time, the slowest rank's, in seconds."""
    x = torch.ones(numel)
    fn(x, group, check=False, network=network)                # warm up connections
    times = []
    for _ in range(repeats):
        comm.barrier(group)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x, group, check=False, network=network)
        dt = torch.tensor([(time.perf_counter() - t0) / iters])
        comm.all_reduce(dt, op=torch.distributed.ReduceOp.MAX, group=group)
        times.append(dt.item())
    return statistics.median(times)


def _iters(nbytes: int, network: Network | None) -> int:
    # Enough calls per timed block that small messages are not lost in the clock's noise.
    if network is not None and network.injects:
        return 1
    return max(1, min(10, MIB // max(nbytes, 1)))


def _measure_worker(algorithms, sizes, repeats, network):
    import torch.distributed as dist
    rows = []
    for algorithm in algorithms:
        for nbytes in sizes:
            t = _time_one(ALL_REDUCES[algorithm], max(nbytes // 4, 1), None, network, repeats,
                          _iters(nbytes, network))
            rows.append(dict(algorithm=algorithm, world_size=dist.get_world_size(),
                             nbytes=4 * max(nbytes // 4, 1), time=t))
    return rows


def measure(world_sizes=(2, 4), sizes=(4 * KIB, 64 * KIB, 1 * MIB),
            algorithms=("ring", "recursive_doubling", "naive"), repeats: int = 5,
            network: Network | None = None, timeout: float = 300) -> pd.DataFrame:
    """Time all-reduce ``algorithms`` on real processes for every world size and size.

    One launch per world size; float32 tensors of ``sizes`` bytes. ``time`` is the median
    over ``repeats`` timed blocks of the slowest rank's seconds per call. With a
    ``network`` the times include its **injected** delays.

    Returns a DataFrame with columns ``algorithm, world_size, nbytes, time``.
    """
    unknown = [a for a in algorithms if a not in ALL_REDUCES]
    if unknown:
        raise ValueError(f"algorithms {unknown} are unknown; allowed {list(ALL_REDUCES)}")
    if not (is_int(repeats) and 1 <= repeats <= 1000):
        raise ValueError(f"repeats={repeats!r} is out of range; allowed 1..1000")
    if any(not (is_int(n) and 4 <= n <= 1 << 30) for n in sizes):
        raise ValueError(f"sizes={sizes!r}: each must be an int number of bytes, 4 to 1 GiB")
    rows = []
    for p in world_sizes:
        rows += launch(_measure_worker, p, list(algorithms), list(sizes), repeats, network,
                       timeout=timeout)[0]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------
# The lab 01 panel: a sweep of message sizes on one algorithm, live.
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepConfig:
    """One run of the lab 01 panel: an all-reduce timed over growing message sizes."""
    algorithm: str = "ring"
    """One of ``distlab.communication.collectives.ALL_REDUCES``: ring, recursive_doubling, naive, gloo."""
    max_nbytes: int = MIB
    """The largest message, 4 KiB to 64 MiB; the sweep goes 4 KiB, 16 KiB, ... up to it."""
    repeats: int = 3
    """Timed blocks per size, 1 to 100 (the median is reported)."""
    network: Network | None = None
    """Injected latency and bandwidth, or None for the machine as it is."""

    def __post_init__(self):
        if self.algorithm not in ALL_REDUCES:
            raise ValueError(f"SweepConfig.algorithm={self.algorithm!r} is unknown; "
                             f"allowed {list(ALL_REDUCES)}")
        require(self, "max_nbytes",
                is_int(self.max_nbytes) and 4 * KIB <= self.max_nbytes <= 64 * MIB,
                "4096 to 67108864 bytes")
        require(self, "repeats", is_int(self.repeats) and 1 <= self.repeats <= 100, "1..100")

    @property
    def sizes(self) -> list[int]:
        sizes = [4 * KIB]
        while sizes[-1] * 4 <= self.max_nbytes:
            sizes.append(sizes[-1] * 4)
        return sizes


def sweep(config: SweepConfig, group=None) -> None:
    """The worker: time ``config.algorithm`` at each size and report it as it goes.

    Reports ``step``, ``algorithm``, ``world_size``, ``nbytes``, ``collective_time`` (the
    slowest rank's seconds for one all-reduce) and ``bytes_sent_per_call`` (this rank's).
    """
    import torch.distributed as dist
    fn = ALL_REDUCES[config.algorithm]
    for step, nbytes in enumerate(config.sizes):
        comm.ledger().reset()
        fn(torch.ones(nbytes // 4), group, check=False)        # one call, for its bytes
        sent = comm.ledger().by_op().get("send", {}).get("bytes_sent", 0)
        if config.algorithm == "gloo":
            sent = comm.ledger().totals()["bytes_sent"]
        t = _time_one(fn, nbytes // 4, group, config.network, config.repeats,
                      _iters(nbytes, config.network))
        report(step=step, algorithm=config.algorithm, world_size=dist.get_world_size(group),
               nbytes=nbytes, collective_time=t, bytes_sent_per_call=sent)


def start_sweep(world_size: int = 4, algorithm: str = "ring", max_nbytes: int = MIB,
                inject: bool = False, latency_us: float = 0.0, bandwidth_gbit: float = 10.0,
                on_metrics=None, on_output=None) -> Run:
    """Start :func:`sweep` on ``world_size`` processes without blocking (for a RunPanel).

    With ``inject``, every message pays an **injected** ``latency_us`` microseconds and a
    ``bandwidth_gbit`` Gbit/s link (:class:`distlab.communication.netsim.Network`). Bad values raise here.
    """
    network = (Network(latency=latency_us * 1e-6, bandwidth=bandwidth_gbit * 1e9 / 8)
               if inject else None)
    config = SweepConfig(algorithm=algorithm, max_nbytes=int(max_nbytes), network=network)
    return start(sweep, world_size, config, on_metrics=on_metrics, on_output=on_output,
                 timeout=300)


def sweep_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    """A RunPanel's metrics as :func:`fit` wants them: ``run, algorithm, world_size, nbytes,
    time`` (one row per run and size)."""
    df = metrics.dropna(subset=["collective_time"])
    df = df.groupby(["run", "algorithm", "world_size", "nbytes"], as_index=False)[
        "collective_time"].max()
    return df.rename(columns={"collective_time": "time"})


# ----------------------------------------------------------------------------------------
# Figures for lab 01.
# ----------------------------------------------------------------------------------------

def figure_time_vs_size(measurements: pd.DataFrame, fits: dict[str, Fit], title=None):
    """Measured time per all-reduce against message size (markers), one colour per
    algorithm and world size, with the fitted alpha-beta model drawn as a line."""
    import plotly.graph_objects as go
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
