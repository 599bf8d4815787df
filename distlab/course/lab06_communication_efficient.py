"""Lab 06's runs: sweeps of several configurations in one launch, the bytes of one compressed
all-reduce against the number of ranks, and the static figures of finished runs.

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
import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require_arg
from distlab.communication_efficient import fedavg, local_sgd
from distlab.communication_efficient.compression import (Compressor, all_reduce_compressed,
                                                         bytes_sent_per_call)
from distlab.communication_efficient.local_training import with_data

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")

# The runs' collectives are the built-in ones, which the ledger books at their model bytes.
_NAMES = {"sim_time": "simulated wall time (s)", "divergence": "divergence ||x_r - x||^2",
          "bytes_sent": "model bytes per rank"}


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


def bytes_against_world_size(compressors: dict, numel: int, world_sizes=(2, 3, 4),
                             timeout: float = 120) -> pd.DataFrame:
    """Bytes per rank of one compressed all-reduce of ``numel`` coordinates, measured.

    One launch per world size; in it every compressor makes one call of
    :func:`~distlab.communication_efficient.compression.all_reduce_compressed` through
    distlab's own ring (``ring=True``), so the ledger counts the bytes each rank really
    sends.

    Returns:
        One row per compressor and world size: ``scheme, world_size, bytes_sent`` (mean
        over the ranks), ``bytes_sent_min`` and ``bytes_sent_max`` (a ring chunk is one
        element longer on some ranks when p does not divide the payload).
    """
    require_arg("compressors", compressors,
                isinstance(compressors, dict) and len(compressors) > 0
                and all(isinstance(c, Compressor) for c in compressors.values()),
                "a non-empty {name: Compressor}")
    require_arg("numel", numel, is_int(numel) and numel >= 1, "integers >= 1")
    require_arg("world_sizes", world_sizes, len(world_sizes) > 0 and all(
        is_int(p) and 2 <= p <= launcher.MAX_WORLD_SIZE for p in world_sizes),
        f"world sizes in 2..{launcher.MAX_WORLD_SIZE}, at least one")
    rows = []
    for p in world_sizes:
        ranks = launcher.launch(_bytes_of_one_call, p, compressors, numel, timeout=timeout)
        for name in compressors:
            sent = [r[name] for r in ranks]
            rows.append({"scheme": name, "world_size": p, "bytes_sent": sum(sent) / p,
                         "bytes_sent_min": min(sent), "bytes_sent_max": max(sent)})
    return pd.DataFrame(rows)


def model_bytes_against_world_size(compressors: dict, numel: int,
                                   world_sizes=(2, 4, 8, 16, 32, 64, 100, 128, 256)
                                   ) -> pd.DataFrame:
    """The same bytes from the formula, for world sizes too large to launch here.

    Returns:
        ``scheme, world_size, model_bytes``, from
        :func:`~distlab.communication_efficient.compression.bytes_sent_per_call`: a ring
        all-reduce, 2(p-1)/p·b, of a summable payload of b bytes; else a ring all-gather,
        (p-1)·b, which grows with p.
    """
    return pd.DataFrame([{"scheme": name, "world_size": p,
                          "model_bytes": bytes_sent_per_call(c, numel, p)}
                         for name, c in compressors.items() for p in world_sizes])


def bytes_against_world_size_figure(measured: pd.DataFrame, model: pd.DataFrame,
                                    title: str = "") -> go.Figure:
    """Bytes per rank of one compressed all-reduce against the number of ranks, log-log.

    Lines: the model bytes (formula) of each scheme; markers: the bytes really sent (the
    ledger, distlab's ring) at the world sizes that were launched.
    """
    fig = go.Figure()
    for i, (name, d) in enumerate(model.groupby("scheme", sort=False)):
        color = _COLORS[i % len(_COLORS)]
        fig.add_scatter(x=d["world_size"], y=d["model_bytes"], mode="lines", name=name,
                        line=dict(color=color), legendgroup=name)
        m = measured[measured["scheme"] == name]
        fig.add_scatter(x=m["world_size"], y=m["bytes_sent"], mode="markers",
                        name=f"{name}: bytes sent (measured)", legendgroup=name,
                        marker=dict(color=color, size=9, symbol="circle-open"),
                        showlegend=bool(len(m)))
    fig.update_layout(title=title or "bytes per rank of one all-reduce against the number of "
                                     "ranks N (lines: model bytes; markers: measured)",
                      xaxis_title="number of ranks N", yaxis_title="bytes per rank per call",
                      xaxis_type="log", yaxis_type="log", template="plotly_white",
                      height=420, margin=dict(l=60, r=20, t=50, b=50))
    return fig


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
                    title: str = "final accuracy against total model bytes per rank"
                    ) -> go.Figure:
    """A plotly scatter: each run's final held-out accuracy against its total model bytes
    per rank."""
    last = (df[(df["rank"] == 0) & df["accuracy"].notna()].sort_values("step")
            .groupby("run", sort=False).last())
    fig = go.Figure(go.Scatter(x=last["bytes_sent"], y=last["accuracy"], text=last.index,
                               mode="markers+text", textposition="top center"))
    fig.update_layout(title=title, xaxis_title=_title("bytes_sent"), yaxis_title="accuracy",
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


def _bytes_of_one_call(compressors: dict, numel: int) -> dict:
    """On each rank: ``{name: bytes this rank sent}`` in one call per compressor, through
    distlab's ring."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(dist.get_rank()))
    out = {}
    for name, compressor in compressors.items():
        before = comm.ledger().totals()["bytes_sent"]
        all_reduce_compressed(x, compressor, torch.zeros(numel), ring=True)
        out[name] = comm.ledger().totals()["bytes_sent"] - before
    return out


def _title(name: str) -> str:
    # Imported here: the workers run this module's _run_all, and distlab.ui costs seconds.
    from distlab.ui.figures import axis_title
    return _NAMES.get(name, axis_title(name))
