"""Lab 06's runs: sweeps of several configurations in one launch, and the static figures of
finished runs.

The algorithms are in :mod:`distlab.communication_efficient` (``local_sgd``, ``fedavg``,
``compression``, ``optimizers``); this module only starts and draws them. The lab's panel
needs no adapter here: its controls are
:class:`~distlab.communication_efficient.local_sgd.LocalSGDConfig` fields, so it calls
``local_sgd.start`` itself.
"""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from distlab import launcher
from distlab.checks import is_number, require_arg
from distlab.communication_efficient import fedavg, local_sgd
from distlab.communication_efficient.local_training import with_data
from distlab.ui.figures import axis_title as _axis_title

_NAMES = {"sim_time": "simulated wall time (s)", "divergence": "divergence ||x_r - x||^2"}


def compare(configs: dict, timeout: float = 600) -> pd.DataFrame:
    """Run several configurations one after the other in ONE launch (saves start-up time).

    Args:
        configs: ``{run name: LocalSGDConfig or FedAvgConfig}``, all with one ``world_size``.
        timeout: seconds for the whole sweep.

    Returns:
        The tidy frame of every record: ``run, rank, step, ...``.
    """
    sizes = {c.world_size for c in configs.values()}
    if len(sizes) != 1:
        raise ValueError(f"compare runs every configuration on the same processes; got "
                         f"world sizes {sorted(sizes)}: give them one world_size")
    configs = {name: with_data(c) for name, c in configs.items()}   # loaded once, here
    results = launcher.launch(_run_all, sizes.pop(), configs, timeout=timeout)
    rows = [{"run": name, "rank": rank, **r} for rank, res in enumerate(results)
            for name, recs in res.items() for r in recs]
    return pd.DataFrame(rows)


def bytes_to_reach(df: pd.DataFrame, target_loss: float) -> dict:
    """``{run: bytes_sent per rank when rank 0's loss first reached target_loss}`` (inf if
    never)."""
    require_arg("target_loss", target_loss, is_number(target_loss) and target_loss > 0,
                "a loss > 0")
    out = {}
    for run, d in df[(df["rank"] == 0) & df["loss"].notna()].groupby("run", sort=False):
        hit = d[d["loss"] <= target_loss].sort_values("step")
        out[run] = float(hit["bytes_sent"].iloc[0]) if len(hit) else math.inf
    return out


def curves_figure(df: pd.DataFrame, x: str = "bytes_sent", y: str = "loss", title: str = "",
                  log_x: bool = False, log_y: bool = True) -> go.Figure:
    """A static plotly figure of finished runs: ``y`` against ``x``, one line per run.

    Ranks are averaged at each ``x`` (as :class:`distlab.ui.figures.LiveFigure` does); ``loss``
    and ``accuracy`` come from rank 0 only. Static figures keep a saved notebook small:
    each live ``FigureWidget`` carries its own copy of plotly.js.
    """
    fig = go.Figure()
    for run, d in df.dropna(subset=[x, y]).groupby("run", sort=False):
        line = d.groupby(x, sort=True)[y].mean()
        fig.add_scatter(x=line.index, y=line.values, mode="lines", name=run)
    fig.update_layout(title=title or f"{_title(y)} against {_title(x)}",
                      xaxis_title=_title(x), yaxis_title=_title(y),
                      xaxis_type="log" if log_x else "linear",
                      yaxis_type="log" if log_y else "linear",
                      template="plotly_white", height=360, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def frontier_figure(df: pd.DataFrame,
                    title: str = "final accuracy against total bytes sent") -> go.Figure:
    """A plotly scatter: each run's final held-out accuracy against its total bytes per rank."""
    last = (df[(df["rank"] == 0) & df["accuracy"].notna()].sort_values("step")
            .groupby("run", sort=False).last())
    fig = go.Figure(go.Scatter(x=last["bytes_sent"], y=last["accuracy"], text=last.index,
                               mode="markers+text", textposition="top center"))
    fig.update_layout(title=title, xaxis_title="bytes sent per rank", yaxis_title="accuracy",
                      xaxis_type="log", template="plotly_white", height=380)
    return fig


def _run_all(configs: dict) -> dict:
    """On each rank: every configuration in turn, ``{run name: its records}``."""
    out = {}
    for name, config in configs.items():
        records = []
        algorithm = fedavg if isinstance(config, fedavg.FedAvgConfig) else local_sgd
        algorithm.train(config, record=lambda **r: records.append(r))
        out[name] = records
    return out


def _title(name: str) -> str:
    return _NAMES.get(name, _axis_title(name))
