"""The alpha-beta cost model of collectives, fitted to measurements on real processes.

A message of n bytes between two ranks takes ``alpha + n·beta`` seconds. Thakur,
Rabenseifner and Gropp ("Optimization of Collective Communication Operations in MPICH",
IJHPCA 2005, sections 2 and 4) give every collective algorithm's time on p ranks as

    T(n, p) = a(p)·alpha + b(n, p)·beta

The formulas themselves live in :mod:`distlab.communication.alpha_beta`; :func:`terms`
returns ``(a, b)`` for an algorithm by name, :func:`predict` the time. Reduction arithmetic
(their gamma term) grows with n exactly like b in every algorithm here, so a fit of alpha
and beta per algorithm absorbs it.

On your machine: :func:`measure` times the algorithms of
:mod:`distlab.communication.collectives` on real processes over a grid of message sizes and
world sizes, and :func:`fit` finds the alpha and beta that explain the measurements best
(least squares on the *relative* error, so 4 KiB and 16 MiB count alike), reporting how far
the model is off. :func:`time_collective` is the timer that :func:`measure` runs on each rank.

A laptop has fewer cores than a lab's ranks. Then every message also waits for its receiver
to get a core, and the fit gets a third parameter, gamma: each message's latency becomes
``alpha + gamma·max(0, p/c - 1)`` for p ranks on c cores
(:func:`distlab.communication.alpha_beta.oversubscribed_alpha`), and a fourth, delta, for
the bytes, whose copies and adds share the cores too: ``beta + delta·max(0, p/c - 1)``
(:func:`~distlab.communication.alpha_beta.oversubscribed_beta`). With p <= c the model is
the paper's; :func:`errors_by_crowding` reports how well it holds on each side of c.
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
from distlab.worker import device
from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication import alpha_beta
from distlab.communication.collectives import ALL_REDUCES
from distlab.communication.netsim import Network
from distlab.launcher import MAX_WORLD_SIZE, launch

KIB, MIB = 1024, 1024 * 1024
ALGORITHMS = tuple(alpha_beta.COSTS)


def terms(algorithm: str, nbytes: float, world_size: int) -> alpha_beta.Cost:
    """``(a, b)`` with ``time = a·alpha + b·beta`` for one collective of ``nbytes`` on p ranks.

    ``algorithm`` is a name of :data:`distlab.communication.alpha_beta.COSTS`: ``ring`` (and
    ``gloo``, the built-in, booked as a ring) ``2(p-1)``, ``2(p-1)/p·n``; ``reduce_scatter``
    and ``all_gather`` ``p-1``, ``(p-1)/p·n``; ``recursive_doubling`` ``lg p``, ``lg p·n``
    (``floor(lg p)+2`` rounds when p is not a power of two); ``naive`` ``2(p-1)``,
    ``2(p-1)·n``.
    """
    if algorithm not in alpha_beta.COSTS:
        raise ValueError(f"algorithm={algorithm!r} is unknown; allowed {ALGORITHMS}")
    return alpha_beta.COSTS[algorithm](nbytes, world_size)


def predict(algorithm: str, nbytes: float, world_size: int, alpha: float, beta: float,
            gamma: float = 0.0, cores: int | None = None, delta: float = 0.0) -> float:
    """The model's time in seconds: ``a·alpha + b·beta`` (see :func:`terms`), and with
    ``gamma`` and ``delta`` the oversubscription terms ``(a·gamma + b·delta)·max(0, p/c - 1)``
    for ``cores`` c (None: this machine's,
    :func:`~distlab.communication.alpha_beta.machine_cores`)."""
    cores = alpha_beta.machine_cores() if cores is None else cores
    latency = alpha_beta.oversubscribed_alpha(alpha, gamma, world_size, cores)
    per_byte = alpha_beta.oversubscribed_beta(beta, delta, world_size, cores)
    return terms(algorithm, nbytes, world_size).time(latency, per_byte)


@dataclass(frozen=True)
class Fit:
    """alpha and beta fitted to one algorithm's measurements, and how well they fit."""
    algorithm: str
    alpha: float
    """Seconds per message."""
    beta: float
    """Seconds per byte."""
    median_error: float
    """Median over the measurements of ``|model - measured| / measured``."""
    max_error: float
    """Largest relative error."""
    num_points: int
    """Measurements the fit explains."""
    gamma: float = 0.0
    """Seconds added to every message per rank waiting for a core (0 when no measurement had
    more ranks than cores)."""
    cores: int | None = None
    """The machine's cores c of ``max(0, p/c - 1)``; None: this machine's."""
    delta: float = 0.0
    """Seconds added to every byte per rank waiting for a core (0 when no measurement had
    more ranks than cores)."""

    def __post_init__(self):
        require(self, "algorithm", self.algorithm in alpha_beta.COSTS, f"one of {ALGORITHMS}")
        for name in ("alpha", "beta", "median_error", "max_error", "gamma", "delta"):
            require(self, name, is_number(getattr(self, name)) and getattr(self, name) >= 0,
                    "a number >= 0")
        require(self, "num_points", is_int(self.num_points) and self.num_points >= 1, ">= 1")
        require(self, "cores", self.cores is None or (is_int(self.cores) and self.cores >= 1),
                "None or an int >= 1")

    @property
    def bandwidth(self) -> float:
        """Bytes per second, ``1 / beta``."""
        return 1.0 / self.beta if self.beta > 0 else math.inf

    def predict(self, nbytes, world_size: int):
        """Model time(s) for one size or an array of sizes."""
        a, b = np.vectorize(lambda n: terms(self.algorithm, n, world_size))(np.asarray(nbytes))
        cores = alpha_beta.machine_cores() if self.cores is None else self.cores
        return (a * alpha_beta.oversubscribed_alpha(self.alpha, self.gamma, world_size, cores)
                + b * alpha_beta.oversubscribed_beta(self.beta, self.delta, world_size, cores))

    def __str__(self):
        crowded = (f", gamma = {1e6 * self.gamma:.1f} µs" if self.gamma else "") + (
            f", delta = {1e9 * self.delta:.3f} ns/B" if self.delta else "")
        return (f"{self.algorithm}: alpha = {1e6 * self.alpha:.1f} µs, "
                f"beta = {1e9 * self.beta:.3f} ns/B ({self.bandwidth / 1e9:.2f} GB/s)"
                f"{crowded}, median error {100 * self.median_error:.0f}% "
                f"(max {100 * self.max_error:.0f}%) over {self.num_points} points")


def fit(measurements: pd.DataFrame, cores: int | None = None) -> dict[str, Fit]:
    """Fit alpha, beta, gamma and delta per algorithm to ``measurements`` (columns
    ``algorithm``, ``world_size``, ``nbytes``, ``time`` as :func:`measure` returns them),
    measured on a machine of ``cores`` cores (None: this one's).

    Least squares on relative errors: each row ``a·alpha + b·beta + (a·gamma + b·delta)·o
    ≈ t``, with ``o = max(0, p/c - 1)``
    (:func:`~distlab.communication.alpha_beta.oversubscription`), is divided by t. Every
    parameter is kept non-negative (the best fit over the subsets of parameters whose own
    fit is non-negative); gamma and delta are 0 when no row has p > c.
    """
    _require_positive_times(measurements, "fit")
    cores = alpha_beta.machine_cores() if cores is None else cores
    require_arg("fit: cores", cores, is_int(cores) and cores >= 1, "None or an int >= 1")
    fits = {}
    for algorithm, df in measurements.groupby("algorithm", sort=False):
        ab = np.array([terms(algorithm, n, p) for n, p in zip(df["nbytes"], df["world_size"])])
        crowding = np.array([alpha_beta.oversubscription(int(p), cores)
                             for p in df["world_size"]])
        X = np.column_stack([ab, ab * crowding[:, None]])    # alpha, beta, gamma, delta
        t = df["time"].to_numpy(dtype=float)
        coef = _non_negative_least_squares(X / t[:, None])    # rows scaled to relative error
        rel = np.abs(X @ coef - t) / t
        fits[algorithm] = Fit(algorithm, float(coef[0]), float(coef[1]),
                              float(np.median(rel)), float(rel.max()), len(t),
                              gamma=float(coef[2]), cores=cores, delta=float(coef[3]))
    return fits


def relative_errors(measurements: pd.DataFrame, fits: dict[str, Fit]) -> pd.Series:
    """``|model - measured| / measured`` for every row of ``measurements``."""
    _require_positive_times(measurements, "relative_errors")
    model = [fits[a].predict(n, int(p)) for a, n, p in
             zip(measurements["algorithm"], measurements["nbytes"], measurements["world_size"])]
    return (np.asarray(model, dtype=float) - measurements["time"]).abs() / measurements["time"]


def errors_by_crowding(measurements: pd.DataFrame, fits: dict[str, Fit],
                       cores: int | None = None) -> dict[str, float]:
    """The median relative error where every rank has a core (``"p <= cores"``) and where
    ranks outnumber the cores (``"p > cores"``); NaN for a side with no measurement.
    ``cores`` defaults to the one the fits were made for."""
    if cores is None:
        cores = next(iter(fits.values())).cores or alpha_beta.machine_cores()
    errors = relative_errors(measurements, fits)
    crowded = (measurements["world_size"] > cores).to_numpy()
    return {"p <= cores": float(errors[~crowded].median()) if (~crowded).any() else math.nan,
            "p > cores": float(errors[crowded].median()) if crowded.any() else math.nan}


def _non_negative_least_squares(A: np.ndarray) -> np.ndarray:
    """The ``x >= 0`` minimising ``|A x - 1|``: the best over every subset of columns whose
    own least-squares fit is non-negative (four columns: fifteen subsets, exactly)."""
    ones = np.ones(len(A))
    best, best_err = np.zeros(A.shape[1]), math.inf
    for mask in range(1, 1 << A.shape[1]):
        cols = [j for j in range(A.shape[1]) if mask >> j & 1]
        if not A[:, cols].any(axis=0).all():                  # a column of zeros: no data
            continue
        x = np.zeros(A.shape[1])
        x[cols] = np.linalg.lstsq(A[:, cols], ones, rcond=None)[0]
        err = float(np.square(A @ x - ones).sum())
        if x.min() >= 0 and err < best_err:
            best, best_err = x, err
    return best


# ----------------------------------------------------------------------------------------
# Measuring on real processes.
# ----------------------------------------------------------------------------------------

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
    require_arg("repeats", repeats, is_int(repeats) and 1 <= repeats <= 1000, "1..1000")
    if any(not (is_int(n) and 4 <= n <= 1 << 30) for n in sizes):
        raise ValueError(f"sizes={sizes!r}: each must be an int number of bytes, 4 to 1 GiB")
    if not world_sizes or any(not (is_int(p) and 1 <= p <= MAX_WORLD_SIZE) for p in world_sizes):
        raise ValueError(f"world_sizes={world_sizes!r}: each must be an int, 1 to "
                         f"{MAX_WORLD_SIZE}")
    require_arg("timeout", timeout, timeout is None or (is_number(timeout) and timeout > 0),
                "seconds > 0 or None")
    rows = []
    for p in world_sizes:
        rows += launch(_measure_worker, p, list(algorithms), list(sizes), repeats, network,
                       timeout=timeout)[0]
    return pd.DataFrame(rows)


def time_collective(fn, numel: int, group=None, network: Network | None = None,
                    repeats: int = 5) -> float:
    """Seconds one call of ``fn(x, group, check=False, network=network)`` takes on float32
    ``x`` of ``numel`` elements, on every rank of ``group`` (a collective: all must call).

    The median over ``repeats`` timed blocks of the slowest rank's time per call; a block
    repeats the call enough times that small messages are not lost in the clock's noise.
    """
    require_arg("time_collective: numel", numel, is_int(numel) and numel >= 1, "an int >= 1")
    if not (is_int(repeats) and 1 <= repeats <= 1000):
        raise ValueError(f"time_collective: repeats={repeats!r} is out of range; "
                         "allowed 1..1000")
    x = torch.ones(numel, device=device())    # this rank's GPU under NCCL
    iters = _iters(comm.nbytes(x), network)
    fn(x, group, check=False, network=network)                # warm up connections
    times = []
    for _ in range(repeats):
        comm.barrier(group)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x, group, check=False, network=network)
        dt = torch.tensor([(time.perf_counter() - t0) / iters], device=x.device)
        comm.all_reduce(dt, op=torch.distributed.ReduceOp.MAX, group=group)
        times.append(dt.item())
    return statistics.median(times)


def _iters(nbytes: int, network: Network | None) -> int:
    # Enough calls per timed block that small messages are not lost in the clock's noise;
    # with injected delays one call is already long enough.
    if network is not None and network.injects:
        return 1
    return max(1, min(10, MIB // max(nbytes, 1)))


def _measure_worker(algorithms, sizes, repeats, network):
    import torch.distributed as dist
    rows = []
    for algorithm in algorithms:
        for nbytes in sizes:
            numel = max(nbytes // 4, 1)
            t = time_collective(ALL_REDUCES[algorithm], numel, None, network, repeats)
            rows.append(dict(algorithm=algorithm, world_size=dist.get_world_size(),
                             nbytes=4 * numel, time=t))
    return rows


def _require_positive_times(measurements: pd.DataFrame, where: str) -> None:
    # Both the fit and the errors divide by the measured time.
    t = measurements["time"].to_numpy(dtype=float)
    bad = t[~(np.isfinite(t) & (t > 0))]
    if len(bad):
        raise ValueError(f"{where}: measurements.time={float(bad[0])!r} is out of range; "
                         "allowed seconds > 0 in every row")
