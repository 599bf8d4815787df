"""Lab 11's glue: the figures and the few launches the notebook needs beside the modules.

The algorithms live in :mod:`distlab.model_parallel` (``expert_parallel``,
``sequence_parallel``, ``ring_attention``, ``ulysses``, ``context_parallel``, ``schedules``,
``three_d``, ``dtensor_tp``, ``crossover``) and :mod:`distlab.communication.all_to_all`;
this module only runs them the way the notebook shows them:

* :func:`expert_histogram`, :func:`expert_figure`: tokens per expert, kept and dropped;
* :func:`attention_errors`: ring and Ulysses against full attention, outputs and gradients,
  in one launch; :func:`memory_figure`: peak memory per rank against sequence length;
* :func:`start_schedule` and :class:`LiveGantt`: the schedule panel's run and its Gantt
  chart (drawn from every stage's timeline of the last step, as the run ends);
  :func:`gantt_figure`: the same chart from a finished run;
* :func:`mesh_figure`: the 3-D grid of ranks and its groups;
* :func:`volume_table`: every method's bytes per layer and step, from the modules' formulas;
  :func:`run_together`: several runs in one launch.
"""
from __future__ import annotations

import threading
from dataclasses import replace

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.distributed as dist

from distlab import launcher
from distlab.communication.all_to_all import model_bytes
from distlab.metrics import report
from distlab.model_parallel import context_parallel, crossover, pipeline
from distlab.model_parallel.experts import capacity
from distlab.model_parallel.ring_attention import full_attention, ring_attention, shard_sequence
from distlab.model_parallel.ulysses import ulysses_attention
from distlab.problems.workloads import Workload

OPS = {"F": "#4c78a8", "B": "#f58518", "W": "#54a24b", "send": "#b7b7b7", "recv": "#72b7b2",
       "idle": "#e45756"}
"""Colours of the Gantt chart: forward, backward (input gradient under zb-h1), weight
gradient, and the communication and idle spans."""


def run_together(runs: dict, world_size: int, timeout: float = 300) -> dict:
    """``{name: (train, config)}`` run one after the other in ONE launch of ``world_size``
    ranks (a config's workload, if it has one, loaded once, here): ``{name: every rank's
    result}``."""
    runs = {name: (train, replace(config, workload=config.workload.loaded())
                   if hasattr(config, "workload") else config)
            for name, (train, config) in runs.items()}
    per_rank = launcher.launch(_run_all, world_size, runs, timeout=timeout)
    return {name: [results[name] for results in per_rank] for name in runs}


def _run_all(runs: dict) -> dict:
    return {name: train(config) for name, (train, config) in runs.items()}


# -- 1 · experts -----------------------------------------------------------------------------

def expert_histogram(results: list[dict]) -> pd.DataFrame:
    """Tokens per expert over the whole run, every rank's summed: one row per expert with
    ``kept`` and ``dropped`` choices (each rank's result of ``expert_parallel.train``)."""
    kept = [sum(r["kept"][e] for r in results) for e in range(len(results[0]["kept"]))]
    dropped = [sum(r["dropped"][e] for r in results) for e in range(len(kept))]
    return pd.DataFrame({"expert": range(len(kept)), "kept": kept, "dropped": dropped})


def expert_figure(histogram: pd.DataFrame, title: str) -> go.Figure:
    """A stacked bar per expert: the choices it kept and those past its capacity."""
    fig = go.Figure(layout=dict(title=title, barmode="stack", template="plotly_white",
                                xaxis_title="expert", yaxis_title="token choices",
                                height=320, margin=dict(l=60, r=20, t=50, b=50)))
    fig.add_bar(x=histogram["expert"], y=histogram["kept"], name="kept", marker_color=OPS["F"])
    fig.add_bar(x=histogram["expert"], y=histogram["dropped"], name="dropped (over capacity)",
                marker_color=OPS["idle"])
    return fig


# -- 3 · context parallelism ---------------------------------------------------------------

def attention_errors(world_size: int = 2, seq_len: int = 16, heads: int = 4,
                     head_dim: int = 8, timeout: float = 120) -> pd.DataFrame:
    """Ring attention (both layouts) and Ulysses against full attention on one process's
    whole sequence, causal and not: the largest absolute difference of the outputs and of
    the gradients of q, k and v over every rank, in float64. One launch."""
    per_rank = launcher.launch(_attention_errors, world_size, seq_len, heads, head_dim,
                               timeout=timeout)
    rows = [dict(method=m, causal=c, output=max(r[(m, c)][0] for r in per_rank),
                 gradients=max(r[(m, c)][1] for r in per_rank))
            for (m, c) in per_rank[0]]
    return pd.DataFrame(rows)


def _attention_errors(seq_len, heads, head_dim) -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    q, k, v, r = (torch.randn(2, heads, seq_len, head_dim, generator=g, dtype=torch.float64)
                  for _ in range(4))                                  # (B, H, T, d)
    methods = {"ring": lambda *a, causal: ring_attention(*a, None, causal, "contiguous"),
               "ring, zigzag": lambda *a, causal: ring_attention(*a, None, causal, "zigzag"),
               "ulysses": lambda *a, causal: ulysses_attention(*a, None, causal)}
    out = {}
    for causal in (True, False):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        want = full_attention(*full, causal)
        (want * r).sum().backward()
        for name, attend in methods.items():
            layout = "zigzag" if "zigzag" in name else "contiguous"
            mine = [_shard(t, rank, p, layout).detach().requires_grad_() for t in (q, k, v)]
            got = attend(*mine, causal=causal)
            (got * _shard(r, rank, p, layout)).sum().backward()
            errors = [(got - _shard(want, rank, p, layout)).abs().max().item()]
            errors += [(m.grad - _shard(f.grad, rank, p, layout)).abs().max().item()
                       for m, f in zip(mine, full)]
            out[(name, causal)] = (errors[0], max(errors[1:]))
    return out


def _shard(x, rank, p, layout):
    return shard_sequence(x, rank, p, layout, dim=2)              # (B, H, T/p, d)


def memory_figure(rows) -> go.Figure:
    """Peak memory per rank of one training step against the sequence length, one line
    per method (rows of ``context_parallel.memory_sweep``), the scores' share dotted."""
    df = pd.DataFrame(rows)
    fig = go.Figure(layout=dict(
        title=f"peak memory per rank, one attention layer's step, p={df['world_size'].iloc[0]}",
        xaxis=dict(title="sequence length T", type="log"), template="plotly_white",
        yaxis=dict(title="bytes", type="log"), height=380,
        margin=dict(l=60, r=20, t=50, b=50)))
    for method, part in df.groupby("method", sort=False):
        fig.add_scatter(x=part["seq_len"], y=part["peak_bytes"], mode="lines+markers",
                        name=f"{method}: measured peak")
        fig.add_scatter(x=part["seq_len"], y=part["scores_bytes"], mode="lines",
                        line=dict(dash="dot"), name=f"{method}: scores held at once")
    return fig


# -- 4 · pipeline schedules ----------------------------------------------------------------

def start_schedule(config: pipeline.PipelineConfig, **launch_kwargs) -> launcher.Run:
    """``pipeline.start``, whose stages also report their timeline's last step when they are
    done, for :class:`LiveGantt`: the schedule panel's ``start``."""
    config = replace(config, workload=config.workload.loaded())
    return launcher.start(_train_and_report, config.world_size, config, **launch_kwargs)


def _train_and_report(config):
    result = pipeline.train(config)
    last = max(e["step"] for e in result["events"])
    for e in result["events"]:
        if e["step"] == last:
            report(step=last, gantt_kind=e["kind"], gantt_op=e.get("op", e["kind"]),
                   gantt_microbatch=e["microbatch"], gantt_chunk=e.get("chunk", 0),
                   gantt_start=e["start"], gantt_end=e["end"])
    return result


class LiveGantt:
    """The schedule panel's figure: the last run's timeline, one row per stage, drawn when
    its stages report it (:func:`start_schedule`). Plays the part of a
    :class:`~distlab.ui.figures.LiveFigure` in a :class:`~distlab.ui.panel.RunPanel`."""

    def __init__(self, title: str = "the last run's step, per stage"):
        from distlab.ui import figures    # here, not above: workers import this module, and
        # distlab.ui (ipywidgets, plotly's renderers) would cost each of them seconds
        self.title, self.events, self.run, self._static = title, [], None, figures.STATIC
        self.figure = (figures.PageFigureWidget if self._static else go.FigureWidget)(
            gantt_figure([], title))
        self._lock = threading.RLock()

    def _ipython_display_(self):
        from IPython.display import display
        display(self.figure)

    def callback(self, run: str):
        with self._lock:
            self.run, self.events = run, []

        def on_metrics(records):
            with self._lock:
                if self.run == run:
                    self.events += [{k.removeprefix("gantt_"): v for k, v in r.items()}
                                    for r in records if "gantt_kind" in r]
        return on_metrics

    def lines(self) -> dict:
        """``{stage: number of spans drawn}``: what a test can check."""
        with self._lock:
            return pd.Series([e["rank"] for e in self.events], dtype=int).value_counts(
                ).sort_index().to_dict()

    def draw(self) -> None:
        with self._lock:        # the panel's watcher and wait() may both draw at once
            fig = gantt_figure(self.events, f"{self.title}: {self.run}" if self.run else
                               self.title)
            new = {t.name: t.to_plotly_json() for t in fig.data}
            self.figure.data = [t for t in self.figure.data if t.name in new]   # a subset
            drawn = {t.name: t for t in self.figure.data}
            with self.figure.batch_update():    # in place: never an empty figure between
                for name, trace in new.items():
                    if name in drawn:
                        drawn[name].update({k: v for k, v in trace.items() if k != "type"})
                    else:
                        self.figure.add_bar(**{k: v for k, v in trace.items() if k != "type"})
                self.figure.update_layout(title=fig.layout.title, height=fig.layout.height,
                                          yaxis=fig.layout.yaxis)
        if self._static:
            self.figure.redraw_page()

    def clear(self) -> None:
        with self._lock:
            self.events, self.run = [], None
        self.draw()


def gantt_figure(events, title: str) -> go.Figure:
    """One step of a pipeline, one row per stage: F, B and W of each microbatch (numbered;
    a second chunk's lighter), sends, receives and idle time, in milliseconds. ``events``:
    the step's timeline events (dicts with ``rank``, ``kind``, ``op``, ``microbatch``,
    ``chunk``, ``start``, ``end``), or every rank's result of ``pipeline.train``."""
    if events and "events" in events[0]:
        everything = [e for r in events for e in r["events"]]
        last = max(e["step"] for e in everything)
        events = [e for e in everything if e["step"] == last]
    df = pd.DataFrame(list(events), columns=["rank", "kind", "op", "microbatch", "chunk",
                                             "start", "end"])
    df["op"] = df["op"].fillna(df["kind"])
    t0 = df["start"].min() if len(df) else 0.0
    df["start_ms"], df["ms"] = (df["start"] - t0) * 1e3, (df["end"] - df["start"]) * 1e3
    df["row"] = [f"stage {r}" for r in df["rank"]]
    stages = sorted(df["rank"].unique(), reverse=True)
    fig = go.Figure(layout=dict(
        title=title, barmode="overlay", template="plotly_white", xaxis_title="time (ms)",
        height=140 + 45 * max(len(stages), 2), margin=dict(l=70, r=20, t=50, b=50),
        yaxis=dict(categoryorder="array", categoryarray=[f"stage {r}" for r in stages])))
    for op, color in OPS.items():
        part = df[df["op"] == op]
        if part.empty:
            continue
        compute = op in ("F", "B", "W")
        fig.add_bar(y=part["row"], x=part["ms"], base=part["start_ms"], orientation="h",
                    name=op, marker_color=color, width=0.8 if compute else 0.35,
                    marker_opacity=[1.0 if c == 0 else 0.55 for c in part["chunk"].fillna(0)],
                    text=[str(m) if compute else "" for m in part["microbatch"]],
                    textposition="inside", insidetextanchor="middle",
                    hovertemplate=f"{op} microbatch %{{text}}<br>%{{base:.1f}} ms + "
                                  f"%{{x:.2f}} ms<extra></extra>")
    return fig


# -- 5 · 3-D parallelism -------------------------------------------------------------------

def mesh_figure(table, title: str = "the 3-D grid: tp rows, dp columns, pp lines") -> go.Figure:
    """Every rank of a ``three_d.mesh_table`` at (dp, tp) in its pipeline stage's panel,
    its tensor-parallel rows and data-parallel columns drawn as lines."""
    rows = pd.DataFrame(table.rows)
    tp, dp = rows["tp"].max() + 1, rows["dp"].max() + 1
    rows["x"] = rows["pp"] * (tp + 1) + rows["tp"]               # stages side by side
    fig = go.Figure(layout=dict(
        title=title, template="plotly_white", height=140 + 90 * dp, showlegend=True,
        xaxis=dict(visible=False), yaxis=dict(visible=False, autorange="reversed"),
        margin=dict(l=20, r=20, t=50, b=20)))
    at = rows.set_index("rank")
    for axis, style in (("tp", dict(color=OPS["F"], width=6)),
                        ("dp", dict(color=OPS["B"], width=3, dash="dot")),
                        ("pp", dict(color=OPS["W"], width=2, dash="dash", shape="spline"))):
        for i, group in enumerate(table.groups[axis]):
            if len(group) < 2:
                continue
            x, y = at.loc[group, "x"].tolist(), at.loc[group, "dp"].tolist()
            if axis == "pp":       # arcs over the tp rows they would otherwise run along
                x = [v for a, b in zip(x, x[1:]) for v in (a, (a + b) / 2)] + x[-1:]
                y = [v for a in y[:-1] for v in (a, a - 0.4)] + y[-1:]
            fig.add_scatter(x=x, y=y, mode="lines", line=style, name=f"{axis} groups",
                            legendgroup=axis, showlegend=i == 0, hoverinfo="skip")
    fig.add_scatter(x=rows["x"], y=rows["dp"], mode="markers+text", showlegend=False,
                    marker=dict(size=34, color="white", line=dict(width=2, color="#333")),
                    text=[str(r) for r in rows["rank"]], textposition="middle center",
                    hovertext=[f"rank {r.rank}: dp {r.dp}, tp {r.tp}, pp {r.pp}"
                               for r in rows.itertuples()], hoverinfo="text")
    for s in range(rows["pp"].max() + 1):
        fig.add_annotation(x=s * (tp + 1) + (tp - 1) / 2, y=dp - 0.4, showarrow=False,
                           text=f"pipeline stage {s}")
    return fig


# -- 7 · what each method sends ------------------------------------------------------------

def volume_table(B: int, T: int, C: int, H: int, p: int, E: int, top_k: int = 2,
                 capacity_factor: float = 1.25, itemsize: int = 4) -> pd.DataFrame:
    """Bytes each rank sends per transformer layer and training step under every method, for
    ``B`` sequences of ``T`` tokens of width ``C`` (``H`` heads) over ``p`` ranks, from the
    modules' own formulas (:func:`distlab.model_parallel.crossover.volumes`,
    :func:`distlab.model_parallel.context_parallel.predicted_bytes`, the all-to-all's
    :func:`~distlab.communication.all_to_all.model_bytes`); ``E`` experts for EP."""
    layer = crossover.volumes(Workload("transformer", hidden=C, num_heads=H, depth=1,
                                       block_size=T, batch_size=B), p, itemsize)
    attention = {m: sum(context_parallel.predicted_bytes(context_parallel.ContextParallelConfig(
        method=m, world_size=p, seq_len=T, heads=H, head_dim=C // H, batch_size=B)).values())
        for m in context_parallel.METHODS}
    places = capacity(B * T // p, E, top_k, capacity_factor)
    rows = [("DP", "the layer's gradients: one all-reduce", layer["dp_per_block"]),
            ("TP", "activations: 2 all-reduces forward, 2 backward", layer["tp_per_block"]),
            ("SP", "4 reduce-scatters + 4 all-gathers; LayerNorm gradients",
             layer["sp_per_block"]),
            ("CP, ring", "K, V blocks: p-1 hops forward; K, V, dK, dV backward",
             attention["ring"]),
            ("CP, Ulysses", "Q, K, V and the output by all-to-all, each way",
             attention["ulysses"]),
            ("EP", f"token buffers (E={E}, top-{top_k}, {places} places): 4 all-to-alls",
             4 * model_bytes(E * places * C * itemsize, p)),
            ("PP", "per stage boundary: an activation forward, its gradient back",
             2 * B * T * C * itemsize)]
    return pd.DataFrame(rows, columns=["method", "what moves", "bytes per rank"]).set_index(
        "method")
