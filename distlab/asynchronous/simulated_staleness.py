"""Simulated staleness: asynchronous SGD's delays, made deterministic (one process).

**Simulated**, and labelled so everywhere: this module runs no parallel processes. It
reproduces the *mathematics* of asynchronous SGD exactly as the analyses state it
(Lian et al. 2015, "Asynchronous parallel stochastic gradient for nonconvex optimization",
equation (2); Zhang et al. 2016, section 3): the gradient applied at step t was computed on
the parameters of step ``t - tau_t``,

    x_{t+1} = x_t - lr_t * grad f(x_{t - tau_t}; batch_t),

with ``tau_t`` fixed or drawn from a seeded distribution. Everything is seeded, so a figure
made with it is bit-for-bit the same on every machine and every run: what the real
:mod:`distlab.asynchronous.parameter_server` cannot give, since there the delays come from the operating
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

from distlab.checks import is_int, is_number, require
from distlab.asynchronous.parameter_server import PROBLEMS, build_problem, gradient

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
        require(self, "staleness", is_int(self.staleness) and 0 <= self.staleness <= 1000,
                "0..1000")
        require(self, "distribution", self.distribution in DISTRIBUTIONS,
                f"one of {DISTRIBUTIONS}")
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
        require(self, "num_steps", is_int(self.num_steps) and 1 <= self.num_steps <= 10**6,
                "1..1e6")
        require(self, "batch_size",
                self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
                "an int >= 1 or None (full batch)")
        require(self, "problem", self.problem in PROBLEMS, f"one of {PROBLEMS}")
        require(self, "hidden", is_int(self.hidden) and 1 <= self.hidden <= 4096, "1..4096")
        require(self, "clip", self.clip is None or (is_number(self.clip) and self.clip > 0),
                "> 0 or None")
        require(self, "seed", is_int(self.seed), "an int")
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
    from distlab.metrics import report
    result = simulate(config, on_step=lambda rec: report(
        step=rec["step"], loss=rec["loss"], staleness=rec["staleness"], lr=rec["lr"]))
    if result.diverged:
        print(f"simulated run {result.diverged}", flush=True)
    return {"params": result.params, "diverged": result.diverged}


def start(config: SimulatedStalenessConfig, **launch_kwargs):
    """Run :func:`simulate` in one launched process (non-blocking), streaming its records."""
    from distlab.launcher import start as _start
    if not isinstance(config, SimulatedStalenessConfig):
        raise TypeError(f"config must be a SimulatedStalenessConfig, got "
                        f"{type(config).__name__}")
    return _start(_report_simulation, 1, config, **launch_kwargs)


# ----------------------------------------------------------------------------------------
# Lab 03's panel and figures: every mode behind one start function.
# ----------------------------------------------------------------------------------------

MODES = ("sync", "SSP", "async", "Hogwild", "simulated")


def start_mode(mode: str, workers: int = 3, staleness: int = 2, lr: float = 0.1,
               staleness_aware: bool = False, straggler: float = 1.0, num_steps: int = 200,
               target_loss: float | None = None, step_time: float = 0.01, on_metrics=None,
               on_output=None, timeout: float | None = 300):
    """Start one run of lab 03 (non-blocking) and return its :class:`distlab.Run`.

    ``mode``: ``"sync"`` (parameter server, BSP), ``"SSP"`` (bound ``staleness``),
    ``"async"`` (no bound), ``"Hogwild"`` (shared memory, sparse logistic regression) or
    ``"simulated"`` (one process, delay ``staleness``: :func:`simulate`). The last of the
    ``workers`` is slowed down ``straggler`` times; ``step_time`` is each gradient's
    simulated compute, so that a straggler is visible on a 2-core machine.
    """
    from distlab.asynchronous import hogwild
    from distlab.asynchronous import parameter_server as ps
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    launch = dict(on_metrics=on_metrics, on_output=on_output, timeout=timeout)
    if mode == "simulated":
        return start(SimulatedStalenessConfig(staleness=staleness, lr=lr, num_steps=num_steps,
                                              staleness_aware=staleness_aware), **launch)
    if mode == "Hogwild":
        return hogwild.start(hogwild.HogwildConfig(num_workers=workers, lr=lr,
                                                   num_steps=20 * num_steps,
                                                   eval_every=max(1, num_steps // 5)), **launch)
    bound = {"sync": 0, "SSP": staleness, "async": None}[mode]
    return ps.start(ps.ParameterServerConfig(
        num_workers=workers, staleness=bound, lr=lr, num_steps=num_steps,
        staleness_aware=staleness_aware, slowdown=(1.0,) * (workers - 1) + (straggler,),
        step_time=step_time, target_loss=target_loss), **launch)


def run_name(values: dict) -> str:
    """A short legend entry for the panel's values: ``"async · 3 workers · lr=0.1"``."""
    mode = values["mode"]
    parts = [mode if mode != "SSP" else f"SSP s={values['staleness']}"]
    if mode == "simulated":
        parts = [f"simulated τ={values['staleness']}"]
    if mode not in ("simulated",):
        parts.append(f"{values['workers']} workers")
    parts.append(f"lr={values['lr']:g}")
    if values.get("staleness_aware") and mode not in ("sync", "Hogwild"):
        parts.append("lr/τ")
    if values.get("straggler", 1) > 1 and mode in ("sync", "SSP", "async"):
        parts.append(f"straggler ×{values['straggler']:g}")
    return " · ".join(parts)


def staleness_histogram(df: pd.DataFrame):
    """Overlaid histograms of the measured ``staleness`` of each run's gradients."""
    import plotly.graph_objects as go
    fig = go.Figure(layout=dict(title="measured staleness of the applied gradients",
                                xaxis_title="staleness (updates)", yaxis_title="gradients",
                                barmode="overlay", template="plotly_white", height=340))
    for run, part in df.dropna(subset=["staleness"]).groupby("run"):
        fig.add_histogram(x=part["staleness"], name=run, opacity=0.6, xbins=dict(size=1))
    return fig


def throughput(df: pd.DataFrame) -> pd.DataFrame:
    """Gradients per second of every worker (ranks that report ``staleness``), per run."""
    rows = []
    for (run, rank), part in df.dropna(subset=["staleness"]).groupby(["run", "rank"]):
        span = part["time"].max() - part["time"].min()
        if len(part) > 1 and span > 0:
            rows.append({"run": run, "rank": rank, "updates_per_s": (len(part) - 1) / span})
    return pd.DataFrame(rows, columns=["run", "rank", "updates_per_s"])


def throughput_figure(df: pd.DataFrame):
    """Bars of :func:`throughput`: each worker's gradients per second, runs side by side."""
    import plotly.graph_objects as go
    fig = go.Figure(layout=dict(title="throughput per worker", xaxis_title="rank",
                                yaxis_title="gradients per second", barmode="group",
                                template="plotly_white", height=340))
    for run, part in throughput(df).groupby("run"):
        fig.add_bar(x=part["rank"], y=part["updates_per_s"], name=run)
    return fig


def sweep_heatmap(df: pd.DataFrame):
    """Heatmap of :func:`sweep`: log10 of the final loss over staleness x lr (simulated)."""
    import numpy as np
    import plotly.graph_objects as go
    table = df.pivot(index="staleness", columns="lr", values="loss")
    z = np.log10(table.to_numpy().clip(max=1e6))
    text = [["diverged" if not np.isfinite(v) else f"{v:.3g}" for v in row]
            for row in table.to_numpy()]
    return go.Figure(go.Heatmap(z=z, x=[f"{c:g}" for c in table.columns],
                                y=[str(i) for i in table.index], text=text,
                                texttemplate="%{text}", colorscale="Viridis",
                                colorbar=dict(title="log10 loss")),
                     layout=dict(title="final loss (simulated): staleness x learning rate",
                                 xaxis_title="lr", yaxis_title="staleness τ (updates)",
                                 template="plotly_white", height=380))
