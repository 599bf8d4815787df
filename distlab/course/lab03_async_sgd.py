"""Lab 03's glue: the panels' choices and legends, the simulated sweep, and the figures.

Each of the lab's panels is a :class:`~distlab.ui.panel.RunPanel` over one algorithm's own
``start`` and config (the parameter server, the simulated mode, Hogwild!); what is here is
only what a config cannot say itself. :class:`BoundChoice` offers the staleness bounds,
"async" (``staleness=None``) among them, :data:`BOUNDS` and :data:`STRAGGLERS` are its and the
straggler's choices, :func:`run_name` and :func:`simulated_name` name a run in the legend.
:func:`sweep` is the simulated grid of staleness x learning rate, :func:`sweep_heatmap` its
figure; :func:`staleness_histogram` and :func:`throughput_figure` read the measured
``staleness`` rows that the parameter server reports, one per gradient it applies.
"""
from __future__ import annotations

import math

import ipywidgets as W
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import traitlets

from distlab.asynchronous import simulated_staleness as simulated
from distlab.ui.panel import configure

BOUNDS = [("sync (BSP, s=0)", 0), ("SSP s=1", 1), ("SSP s=2", 2), ("SSP s=4", 4),
          ("async (no bound)", None)]
"""The parameter server's ``staleness`` choices: ``(label, bound)``."""
STRAGGLERS = [("none", ()), ("worker 0 ×2", (2.0,)), ("worker 0 ×3", (3.0,)),
              ("worker 0 ×5", (5.0,))]
"""The parameter server's ``slowdown`` choices: worker 0 that many times slower."""


class BoundChoice(W.Dropdown):
    """A dropdown of :data:`BOUNDS` whose "async" choice (``None``) stays selected.

    ipywidgets reads a value of None as "nothing selected" and would clear the choice; the
    parameter server's fully asynchronous mode is exactly ``staleness=None``.
    """

    def __init__(self, value=None, description="staleness", **kwargs):
        super().__init__(options=BOUNDS, value=value, description=description, **kwargs)

    @traitlets.observe("value")
    def _propagate_value(self, change):
        if change.new is None:
            self.index = self._options_values.index(None)
            return
        super()._propagate_value(change)


def run_name(values: dict) -> str:
    """A parameter-server run's legend entry: ``"async · 3 workers · lr=0.1 · straggler ×3"``."""
    s = values["staleness"]
    parts = ["sync" if s == 0 else "async" if s is None else f"SSP s={s}",
             f"{values['num_workers']} workers", f"lr={values['lr']:g}"]
    if values.get("staleness_aware") and s != 0:
        parts.append("lr/τ")
    slowest = max(values.get("slowdown", ()), default=1)
    if slowest > 1:
        parts.append(f"straggler ×{slowest:g}")
    return " · ".join(parts)


def simulated_name(values: dict) -> str:
    """A simulated run's legend entry: ``"simulated τ=8 · lr=0.5 · lr/τ"``."""
    parts = [f"simulated τ={values['staleness']}"]
    if values.get("distribution", "fixed") != "fixed":
        parts[0] += f" ({values['distribution']})"
    parts.append(f"lr={values['lr']:g}")
    if values.get("staleness_aware"):
        parts.append("lr/τ")
    return " · ".join(parts)


def sweep(staleness_values, lrs, **settings) -> pd.DataFrame:
    """Final loss over a grid of ``staleness x lr`` (simulated): a tidy frame for a heatmap.

    ``settings`` set fields of the :class:`~distlab.asynchronous.simulated_staleness.SimulatedStalenessConfig` or of its workload by
    name (``num_steps=60``). Diverged runs get ``loss = inf``. Columns: ``staleness, lr,
    diverged, loss``.
    """
    base = configure(simulated.SimulatedStalenessConfig(), settings)
    rows = []
    for s in staleness_values:
        for lr in lrs:
            r = simulated.simulate(configure(base, {"staleness": s, "lr": lr}))
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
