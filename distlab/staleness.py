"""Simulated staleness: asynchronous SGD's delays, made deterministic (one process).

**Simulated**, and labelled so everywhere: this module runs no parallel processes. It
reproduces the *mathematics* of asynchronous SGD exactly as the analyses state it
(Lian et al. 2015, "Asynchronous parallel stochastic gradient for nonconvex optimization",
equation (2); Zhang et al. 2016, section 3): the gradient applied at step t was computed on
the parameters of step ``t - tau_t``,

    x_{t+1} = x_t - lr_t * grad f(x_{t - tau_t}; batch_t),

with ``tau_t`` fixed or drawn from a seeded distribution. Everything is seeded, so a figure
made with it is bit-for-bit the same on every machine and every run: what the real
:mod:`distlab.parameter_server` cannot give, since there the delays come from the operating
system's scheduling. The lab always shows it beside a real run.

The staleness-aware rule (Zhang et al. 2016, section 3.2) divides the step by the delay,
``lr_t = lr / max(tau_t, 1)``; clipping bounds each gradient's norm. Communication cost:
none (one process); it models W workers through the distribution of ``tau``.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import pandas as pd
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .parameter_server import PROBLEMS, build_problem, gradient

DISTRIBUTIONS = ("fixed", "uniform", "geometric")


@dataclass(frozen=True)
class SimulatedStalenessConfig:
    """A simulated asynchronous SGD run; validated when it is made."""

    staleness: int = 4
    """tau when ``distribution="fixed"``; its maximum for ``"uniform"``; its mean for ``"geometric"``."""
    distribution: str = "fixed"
    """``"fixed"``, ``"uniform"`` (0..staleness) or ``"geometric"`` (mean staleness, unbounded)."""
    lr: float = 0.05
    """Learning rate."""
    num_steps: int = 200
    """Updates to apply."""
    batch_size: int | None = 32
    """Minibatch per gradient, drawn from all the data; None = full batch."""
    problem: str = "linear_regression"
    """``"linear_regression"`` or ``"digits"``, as in the parameter server."""
    hidden: int = 32
    """Hidden width of the digits MLP."""
    staleness_aware: bool = False
    """Use ``lr / max(tau, 1)`` (Zhang et al. 2016)."""
    clip: float | None = None
    """Clip each gradient's norm to this value; None = no clipping."""
    seed: int = 0
    """Seeds the model, the minibatches and the delays."""
    divergence_factor: float = 1e4
    """Stop when the loss exceeds this many times the first loss (or is not finite)."""

    def __post_init__(self):
        def need(ok, name, allowed):
            if not ok:
                raise ValueError(f"SimulatedStalenessConfig.{name}={getattr(self, name)!r} "
                                 f"is out of range; allowed: {allowed}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.staleness) and 0 <= self.staleness <= 1000, "staleness", "0..1000")
        need(self.distribution in DISTRIBUTIONS, "distribution", DISTRIBUTIONS)
        need(is_num(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(is_int(self.num_steps) and 1 <= self.num_steps <= 10**6, "num_steps", "1..1e6")
        need(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
             "batch_size", "an int >= 1 or None (full batch)")
        need(self.problem in PROBLEMS, "problem", PROBLEMS)
        need(is_int(self.hidden) and 1 <= self.hidden <= 4096, "hidden", "1..4096")
        need(self.clip is None or (is_num(self.clip) and self.clip > 0), "clip", "> 0 or None")
        need(is_int(self.seed), "seed", "an int")
        need(is_num(self.divergence_factor) and self.divergence_factor > 1,
             "divergence_factor", "> 1")


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
    n, s = config.num_steps, config.staleness
    if config.distribution == "fixed":
        return torch.full((n,), s, dtype=torch.int64)
    g = torch.Generator().manual_seed(config.seed + 12345)
    if config.distribution == "uniform":
        return torch.randint(0, s + 1, (n,), generator=g)
    # geometric on {0, 1, ...} with mean s: P(tau = k) = p (1 - p)^k, p = 1 / (s + 1)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    p = 1.0 / (s + 1)
    return torch.floor(torch.log1p(-u) / math.log1p(-p)).to(torch.int64) if s > 0 \
        else torch.zeros(n, dtype=torch.int64)


def simulate(config: SimulatedStalenessConfig, run: str = "simulated",
             on_step=None) -> SimulatedResult:
    """Run simulated asynchronous SGD; bit-reproducible for a given config.

    Args:
        config: the run.
        run: the name in the ``run`` column of the metrics.
        on_step: optional ``callback(record)`` called with each step's record.
    """
    model, ds, loss_fn = build_problem(config)
    x = parameters_to_vector(model.parameters()).detach().clone()
    taus = draw_delays(config)
    history = deque([x], maxlen=int(taus.max()) + 1)   # x_t, x_{t-1}, ..., newest last
    g_batches = torch.Generator().manual_seed(config.seed + 777)
    rows, diverged, first, t0 = [], None, None, time.time()
    for t in range(config.num_steps):
        with torch.no_grad():
            vector_to_parameters(x, model.parameters())
            loss = float(loss_fn(model(ds.X), ds.y))
        first = loss if first is None else first
        tau = min(int(taus[t]), t)                   # no parameters before step 0
        lr = config.lr / max(tau, 1) if config.staleness_aware else config.lr
        rec = {"rank": 0, "step": t, "time": time.time() - t0, "loss": loss,
               "staleness": tau, "lr": lr}
        rows.append(rec)
        if on_step is not None:
            on_step(rec)
        if not math.isfinite(loss) or loss > config.divergence_factor * first:
            diverged = (f"diverged at step {t}: loss {loss:.3g} (first loss {first:.3g}); "
                        f"try a smaller lr, staleness_aware=True or clip")
            break
        idx = (torch.randint(len(ds.y), (config.batch_size,), generator=g_batches)
               if config.batch_size is not None else torch.arange(len(ds.y)))
        _, g = gradient(model, loss_fn, ds.X[idx], ds.y[idx], history[-1 - tau])
        if config.clip is not None:
            g = g * min(1.0, config.clip / (float(g.norm()) + 1e-12))
        x = x - lr * g
        history.append(x)
    df = pd.DataFrame(rows)
    df.insert(0, "run", run)
    return SimulatedResult(x, df, diverged)


def sweep(staleness_values, lrs, **config_kwargs) -> pd.DataFrame:
    """Final loss over a grid of ``staleness x lr`` (simulated): a tidy frame for a heatmap.

    Diverged runs get ``final_loss = inf``. Columns: ``staleness, lr, loss, diverged``.
    """
    rows = []
    for s in staleness_values:
        for lr in lrs:
            r = simulate(SimulatedStalenessConfig(staleness=s, lr=lr, **config_kwargs))
            rows.append({"staleness": s, "lr": lr, "diverged": r.diverged is not None,
                         "loss": math.inf if r.diverged else r.final_loss})
    return pd.DataFrame(rows)


def _report_simulation(config: SimulatedStalenessConfig) -> dict:
    # Runs inside a one-rank launch, so a widget can start it like a real run.
    from .metrics import report
    result = simulate(config, on_step=lambda rec: report(
        step=rec["step"], loss=rec["loss"], staleness=rec["staleness"], lr=rec["lr"]))
    if result.diverged:
        print(f"simulated run {result.diverged}", flush=True)
    return {"params": result.params, "diverged": result.diverged}


def start(config: SimulatedStalenessConfig, **launch_kwargs):
    """Run :func:`simulate` in one launched process (non-blocking), streaming its records."""
    from .launcher import start as _start
    if not isinstance(config, SimulatedStalenessConfig):
        raise TypeError(f"config must be a SimulatedStalenessConfig, got "
                        f"{type(config).__name__}")
    return _start(_report_simulation, 1, config, **launch_kwargs)
