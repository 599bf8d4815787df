"""Lab 03's runs: every mode behind one start function, the simulated sweep, and the figures.

:func:`start_mode` starts one run of the panel (the parameter server in BSP, SSP or async
mode, Hogwild!, or the simulated mode) and :func:`run_name` names it in the legend.
:func:`sweep` is the simulated grid of staleness x learning rate, :func:`sweep_heatmap` its
figure; :func:`staleness_histogram` and :func:`throughput_figure` read the measured
``staleness`` rows that the parameter server reports, one per gradient it applies.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from distlab.asynchronous import hogwild
from distlab.asynchronous import parameter_server as ps
from distlab.asynchronous import simulated_staleness as simulated
from distlab.checks import is_int, is_number

MODES = ("sync", "SSP", "async", "Hogwild", "simulated")


def start_mode(mode: str, workers: int = 3, staleness: int = 2, lr: float = 0.1,
               staleness_aware: bool = False, straggler: float = 1.0, num_steps: int = 200,
               target_loss: float | None = None, step_time: float = 0.01, on_metrics=None,
               on_output=None, timeout: float | None = 300):
    """Start one run of lab 03 (non-blocking) and return its :class:`distlab.Run`.

    ``mode``: ``"sync"`` (parameter server, BSP), ``"SSP"`` (bound ``staleness``),
    ``"async"`` (no bound), ``"Hogwild"`` (shared memory, sparse logistic regression) or
    ``"simulated"`` (one process, delay ``staleness``:
    :func:`~distlab.asynchronous.simulated_staleness.simulate`). The last of the ``workers``
    is slowed down ``straggler`` times; ``step_time`` is each gradient's simulated compute,
    so that a straggler is visible on a 2-core machine.
    """
    _check_mode_arguments(mode, workers, staleness, lr, staleness_aware, straggler,
                          num_steps, target_loss, step_time)
    launch = dict(on_metrics=on_metrics, on_output=on_output, timeout=timeout)
    if mode == "simulated":
        return simulated.start(simulated.SimulatedStalenessConfig(
            staleness=staleness, lr=lr, num_steps=num_steps, staleness_aware=staleness_aware),
            **launch)
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
    else:
        parts.append(f"{values['workers']} workers")
    parts.append(f"lr={values['lr']:g}")
    if values.get("staleness_aware") and mode not in ("sync", "Hogwild"):
        parts.append("lr/τ")
    if values.get("straggler", 1) > 1 and mode in ("sync", "SSP", "async"):
        parts.append(f"straggler ×{values['straggler']:g}")
    return " · ".join(parts)


def sweep(staleness_values, lrs, **config_kwargs) -> pd.DataFrame:
    """Final loss over a grid of ``staleness x lr`` (simulated): a tidy frame for a heatmap.

    Diverged runs get ``loss = inf``. Columns: ``staleness, lr, loss, diverged``.
    """
    rows = []
    for s in staleness_values:
        for lr in lrs:
            r = simulated.simulate(simulated.SimulatedStalenessConfig(staleness=s, lr=lr,
                                                                      **config_kwargs))
            rows.append({"staleness": s, "lr": lr, "diverged": r.diverged is not None,
                         "loss": math.inf if r.diverged else r.final_loss})
    return pd.DataFrame(rows, columns=["staleness", "lr", "diverged", "loss"])


def throughput(df: pd.DataFrame) -> pd.DataFrame:
    """Gradients per second the server applied from each worker, per run.

    Read from the server's per-gradient rows (those with a ``worker``); the simulated mode
    and Hogwild! have none.
    """
    rows = []
    if "worker" in df:
        for (run, worker), part in df.dropna(subset=["worker"]).groupby(["run", "worker"]):
            span = part["time"].max() - part["time"].min()
            if len(part) > 1 and span > 0:
                rows.append({"run": run, "worker": int(worker),
                             "updates_per_s": (len(part) - 1) / span})
    return pd.DataFrame(rows, columns=["run", "worker", "updates_per_s"])


def staleness_histogram(df: pd.DataFrame) -> go.Figure:
    """Overlaid histograms of the measured ``staleness`` of each run's gradients."""
    fig = go.Figure(layout=dict(title="measured staleness of the applied gradients",
                                xaxis_title="staleness (updates)", yaxis_title="gradients",
                                barmode="overlay", template="plotly_white", height=340))
    for run, part in df.dropna(subset=["staleness"]).groupby("run"):
        fig.add_histogram(x=part["staleness"], name=run, opacity=0.6, xbins=dict(size=1))
    return fig


def throughput_figure(df: pd.DataFrame) -> go.Figure:
    """Bars of :func:`throughput`: each worker's gradients per second, runs side by side."""
    fig = go.Figure(layout=dict(title="throughput per worker", xaxis_title="worker",
                                yaxis_title="gradients per second", barmode="group",
                                template="plotly_white", height=340))
    for run, part in throughput(df).groupby("run"):
        fig.add_bar(x=part["worker"], y=part["updates_per_s"], name=run)
    return fig


def sweep_heatmap(df: pd.DataFrame) -> go.Figure:
    """Heatmap of :func:`sweep`: log10 of the final loss over staleness x lr (simulated)."""
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


def _check_mode_arguments(mode, workers, staleness, lr, staleness_aware, straggler,
                          num_steps, target_loss, step_time) -> None:
    """Refuse bad panel values by their own names, before any process starts."""
    checks = [
        ("mode", mode, mode in MODES, f"one of {MODES}"),
        ("workers", workers, is_int(workers) and 1 <= workers <= 16, "1..16"),
        ("staleness", staleness, is_int(staleness) and 0 <= staleness <= 1000, "0..1000"),
        ("lr", lr, is_number(lr) and lr > 0, "a number > 0"),
        ("staleness_aware", staleness_aware, isinstance(staleness_aware, bool),
         "True or False"),
        ("straggler", straggler, is_number(straggler) and 1 <= straggler <= 100, "1..100"),
        ("num_steps", num_steps, is_int(num_steps) and 1 <= num_steps <= 10**5, "1..1e5"),
        ("target_loss", target_loss, target_loss is None or is_number(target_loss),
         "a number or None"),
        ("step_time", step_time, is_number(step_time) and 0 <= step_time <= 1, "0..1 s"),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"start_mode: {name}={value!r} is out of range; allowed {allowed}")
