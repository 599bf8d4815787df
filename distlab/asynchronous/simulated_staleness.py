"""Simulated staleness: asynchronous SGD's delays, made deterministic (one process).

**Simulated**, and labelled so everywhere: this module runs no parallel processes. It
reproduces the *mathematics* of asynchronous SGD exactly as the analyses state it
(Lian et al. 2015, "Asynchronous parallel stochastic gradient for nonconvex optimization",
equation (2); Zhang et al. 2016, section 3): the gradient applied at step t was computed on
the parameters of step ``t - tau_t``,

    x_{t+1} = x_t - lr_t * grad f(x_{t - tau_t}; batch_t),

with ``tau_t`` fixed or drawn from a seeded distribution. Everything is seeded, so a figure
made with it is bit-for-bit the same on every machine and every run: what the real
:mod:`distlab.asynchronous.parameter_server` cannot give, since there the delays come from
the operating system's scheduling. The lab always shows it beside a real run.

The staleness-aware rule (Zhang et al. 2016, section 3.2) divides the step by the delay,
``lr_t = lr / max(tau_t, 1)``; clipping bounds each gradient's norm. Communication cost:
none (one process); it models W workers through the distribution of ``tau``.

:func:`simulate` is the computation. The verbs, as everywhere: :func:`train` runs it on the
one launched rank (reporting every step, so a panel can watch it), :func:`start` returns
that :class:`distlab.Run`, :func:`run` waits for it, and :func:`reference` is the same
simulation in this process, which the launched one equals bit for bit.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator

import pandas as pd
import torch
from torch.nn.utils import parameters_to_vector

from distlab.checks import is_int, is_number, require
from distlab.launcher import start as _start
from distlab.metrics import report
from distlab.problems import convex
from distlab.problems.convex import WORKLOAD, require_flat_workload
from distlab.problems.workloads import Workload

DISTRIBUTIONS = ("fixed", "uniform", "geometric")


@dataclass(frozen=True)
class SimulatedStalenessConfig:
    """A simulated asynchronous SGD run; validated when it is made.

    What is trained comes from ``workload``, as in the parameter server: its model and data,
    ``lr``, ``num_steps`` (updates), ``seed`` (the model, the minibatches, the delays) and
    ``batch_size``: one gradient per update, each on ``batch_size`` examples drawn from all
    the data (:func:`minibatches`, a seeded stream of the simulation's own: which examples a
    step sees decides how far the first, stalest steps overshoot, and so the figures).
    """

    workload: Workload = field(default_factory=lambda: WORKLOAD)
    """What is trained: ``"linear"`` (regression) or ``"mlp"`` (digits)."""
    staleness: int = 4
    """tau when ``distribution="fixed"``; its maximum for ``"uniform"``; its mean for ``"geometric"``."""
    distribution: str = "fixed"
    """``"fixed"``, ``"uniform"`` (0..staleness) or ``"geometric"`` (mean staleness, unbounded)."""
    staleness_aware: bool = False
    """Use ``lr / max(tau, 1)`` (Zhang et al. 2016)."""
    clip: float | None = None
    """Clip each gradient's norm to this value; None = no clipping."""
    divergence_factor: float = 1e4
    """Stop when the loss exceeds this many times the first loss (or is not finite)."""

    def __post_init__(self):
        require_flat_workload(self)
        require(self, "staleness", is_int(self.staleness) and 0 <= self.staleness <= 1000,
                "0..1000")
        require(self, "distribution", self.distribution in DISTRIBUTIONS,
                f"one of {DISTRIBUTIONS}")
        require(self, "staleness_aware", isinstance(self.staleness_aware, bool),
                "True or False")
        require(self, "clip", self.clip is None or (is_number(self.clip) and self.clip > 0),
                "> 0 or None")
        require(self, "divergence_factor",
                is_number(self.divergence_factor) and self.divergence_factor > 1, "> 1")


@dataclass
class SimulatedResult:
    """The outcome of :func:`simulate`."""
    params: torch.Tensor
    """The final flat parameter vector."""
    metrics: pd.DataFrame
    """One row per step: ``run, rank, step, time, loss, staleness, lr``."""
    diverged: str | None
    """Why the run stopped early, or None."""

    @property
    def final_loss(self) -> float:
        return float(self.metrics["loss"].iloc[-1])


def draw_delays(config: SimulatedStalenessConfig) -> torch.Tensor:
    """The delay ``tau_t`` of every step (int64, shape ``(num_steps,)``), from the seed."""
    n, s = config.workload.num_steps, config.staleness
    if config.distribution == "fixed":
        return torch.full((n,), s, dtype=torch.int64)
    g = torch.Generator().manual_seed(config.workload.seed + 12345)
    if config.distribution == "uniform":
        return torch.randint(0, s + 1, (n,), generator=g)
    # geometric on {0, 1, ...} with mean s: P(tau = k) = p (1 - p)^k, p = 1 / (s + 1)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    p = 1.0 / (s + 1)
    return torch.floor(torch.log1p(-u) / math.log1p(-p)).to(torch.int64) if s > 0 \
        else torch.zeros(n, dtype=torch.int64)


def minibatches(config: SimulatedStalenessConfig) -> Iterator[torch.Tensor]:
    """The row indices of every step's minibatch, ``(batch_size,)`` each, from the seed."""
    workload = config.workload
    g = torch.Generator().manual_seed(workload.seed + 777)
    n = len(workload.loaded().dataset.y)
    for _ in range(workload.num_steps):
        yield torch.randint(n, (workload.batch_size,), generator=g)


def simulate(config: SimulatedStalenessConfig, run: str = "simulated",
             on_step=None) -> SimulatedResult:
    """Run simulated asynchronous SGD in this process; bit-reproducible for a given config.

    Args:
        config: the run.
        run: the name in the ``run`` column of the metrics.
        on_step: optional ``callback(record)`` called with each step's record.
    """
    if not isinstance(config, SimulatedStalenessConfig):
        raise TypeError(f"config must be a SimulatedStalenessConfig, got "
                        f"{type(config).__name__}")
    if not isinstance(run, str):
        raise TypeError(f"run must be a str (the run's name), got {type(run).__name__}")
    workload = config.workload.loaded()
    model, ds, loss_fn = workload.build_model(), workload.dataset, workload.loss
    x = parameters_to_vector(model.parameters()).detach().clone()   # (P,)
    optimizer = workload.optimizer([x])
    taus = draw_delays(config)
    history = deque([x.clone()], maxlen=int(taus.max()) + 1)   # x_t, x_{t-1}, ..., newest last
    rows, diverged, first, t0 = [], None, None, time.time()
    for t, idx in enumerate(minibatches(config)):
        loss = convex.loss_at(model, loss_fn, ds.X, ds.y, x)
        first = loss if first is None else first
        tau = min(int(taus[t]), t)                   # no parameters before step 0
        lr = workload.lr / max(tau, 1) if config.staleness_aware else workload.lr
        rec = {"rank": 0, "step": t, "time": time.time() - t0, "loss": loss,
               "staleness": tau, "lr": lr}
        rows.append(rec)
        if on_step is not None:
            on_step(rec)
        if not math.isfinite(loss) or loss > config.divergence_factor * first:
            diverged = (f"diverged at step {t}: loss {loss:.3g} (first loss {first:.3g}); "
                        f"try a smaller lr, staleness_aware=True or clip")
            break
        _, x.grad = convex.flat_gradient(model, loss_fn, ds.X[idx], ds.y[idx],
                                         history[-1 - tau], config.clip)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()                             # x_{t+1} = x_t - lr_t g(x_{t - tau})
        history.append(x.clone())
    df = pd.DataFrame(rows)
    df.insert(0, "run", run)
    return SimulatedResult(x.detach(), df, diverged)


def train(config: SimulatedStalenessConfig, group=None) -> dict:
    """The body of the one launched rank: :func:`simulate`, reporting every step's record.

    ``group`` is accepted for the common verb set; the simulation talks to no other rank.
    """
    result = simulate(config, on_step=lambda rec: report(
        step=rec["step"], loss=rec["loss"], staleness=rec["staleness"], lr=rec["lr"]))
    if result.diverged:
        print(f"simulated run {result.diverged}", flush=True)
    return {"params": result.params, "diverged": result.diverged,
            "loss": result.final_loss}


def start(config: SimulatedStalenessConfig, **launch_kwargs):
    """Run :func:`train` in one launched process (non-blocking) and return the Run.

    One process, so that a widget can start it, stream its records and stop it like a real
    run; it is still a simulation.
    """
    if not isinstance(config, SimulatedStalenessConfig):
        raise TypeError(f"config must be a SimulatedStalenessConfig, got "
                        f"{type(config).__name__}")
    config = replace(config, workload=config.workload.loaded())   # the data travels with it
    return _start(train, 1, config, **launch_kwargs)


def run(config: SimulatedStalenessConfig, **launch_kwargs) -> dict:
    """:func:`start` and wait: the launched rank's result (``params``, ``diverged``, ``loss``)."""
    return start(config, **launch_kwargs).result()[0]


def reference(config: SimulatedStalenessConfig) -> torch.Tensor:
    """The final parameters :func:`train` must reproduce: :func:`simulate` in this process."""
    return simulate(config).params
