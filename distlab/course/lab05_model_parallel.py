"""The figures of lab 05 (model parallelism), built from what the workers returned.

* :func:`gantt_figure` - the pipeline timeline, one row per rank: forward and backward of
  each microbatch (numbered), sends, receives, and idle time (the bubble);
* :func:`bubble_figure` - measured bubble fraction against the ideal (p - 1)/(m + p - 1);
* :func:`memory_figure` - peak activation memory per rank, GPipe against 1F1B;
* :func:`comm_volume_figure` - model bytes of the all-reduces per rank and step, tensor
  against data parallel (built-in collectives: the ledger books the ring's volume);

and :func:`pipeline_summary`, the table the bubble and memory figures are drawn from.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from distlab.model_parallel.pipeline import bubble_fraction
from distlab.model_parallel.timeline import exposed_communication, measured_bubble, step_index

COLORS = {"forward": "#4c78a8", "backward": "#f58518", "send": "#54a24b", "recv": "#72b7b2",
          "idle": "#e45756"}


def pipeline_summary(runs: list[list[dict]]) -> pd.DataFrame:
    """One row per run and rank: schedule, m, measured and ideal bubble, the exposed
    communication (both read from the timeline of the last step), peak activations.

    ``runs``: for each pipeline run, every rank's result of
    :func:`distlab.model_parallel.pipeline.train`.
    """
    rows = []
    for results in runs:
        c = results[0]["config"]
        bubble, exposed = measured_bubble(results), exposed_communication(results)
        for r in results:
            rows.append(dict(schedule=c.schedule, num_stages=c.num_stages,
                             num_microbatches=c.num_microbatches, rank=r["rank"],
                             measured_bubble=bubble, exposed_communication=exposed,
                             ideal_bubble=bubble_fraction(c.num_stages, c.num_microbatches),
                             peak_activations=r["peak_activations"],
                             peak_activation_bytes=r["peak_activation_bytes"]))
    return pd.DataFrame(rows)


def gantt_figure(results: list[dict], step: int = -1, title: str | None = None) -> go.Figure:
    """Timeline of one training ``step`` of a pipeline run (every rank's result of
    :func:`distlab.model_parallel.pipeline.train`), in milliseconds from the step's start."""
    events = pd.DataFrame([e for r in results for e in r["events"]])
    step = step_index(step, int(events["step"].max()) + 1)
    df = events[events["step"] == step].copy()
    t0 = df["start"].min()
    df["start_ms"], df["ms"] = (df["start"] - t0) * 1e3, (df["end"] - df["start"]) * 1e3
    df["row"] = [f"stage {r}" for r in df["rank"]]
    c = results[0]["config"]
    rows = [f"stage {r}" for r in reversed(range(len(results)))]   # stage 0 on top
    fig = go.Figure(layout=dict(
        title=title or (f"{c.schedule}: p={c.num_stages} stages, m={c.num_microbatches} "
                        f"microbatches, step {step}"),
        barmode="overlay", height=140 + 45 * len(results), template="plotly_white",
        xaxis_title="time (ms)", yaxis=dict(categoryorder="array", categoryarray=rows),
        margin=dict(l=70, r=20, t=50, b=50)))
    for kind in COLORS:
        part = df[df["kind"] == kind]
        if part.empty:
            continue
        compute = kind in ("forward", "backward")
        fig.add_bar(y=part["row"], x=part["ms"], base=part["start_ms"], orientation="h",
                    name=kind, marker_color=COLORS[kind], width=0.8 if compute else 0.35,
                    text=[str(m) if compute else "" for m in part["microbatch"]],
                    textposition="inside", insidetextanchor="middle",
                    customdata=part["microbatch"],
                    hovertemplate=f"{kind} microbatch %{{customdata}}<br>%{{base:.1f}} ms"
                                  f" + %{{x:.2f}} ms<extra></extra>")
    return fig


def bubble_figure(summary: pd.DataFrame) -> go.Figure:
    """Measured bubble fraction (:func:`pipeline_summary`) against the formula."""
    fig = go.Figure(layout=dict(title="pipeline bubble: measured against (p-1)/(m+p-1)",
                                xaxis_title="microbatches m", yaxis_title="bubble fraction",
                                template="plotly_white", height=360, yaxis_range=[0, 1]))
    runs = summary.drop_duplicates(["schedule", "num_stages", "num_microbatches"])
    for (sched, p), part in runs.groupby(["schedule", "num_stages"]):
        part = part.sort_values("num_microbatches")
        fig.add_scatter(x=part["num_microbatches"], y=part["measured_bubble"],
                        mode="lines+markers", name=f"measured, {sched}, p={p}")
    for p, part in runs.groupby("num_stages"):
        ms = sorted(part["num_microbatches"].unique())
        fig.add_scatter(x=ms, y=[bubble_fraction(int(p), int(m)) for m in ms], mode="lines",
                        line=dict(dash="dash", color="black"), name=f"(p-1)/(m+p-1), p={p}")
    return fig


def memory_figure(summary: pd.DataFrame, num_microbatches: int | None = None) -> go.Figure:
    """Peak activation memory per rank (KiB), one bar group per schedule."""
    m = num_microbatches or summary["num_microbatches"].max()
    if m not in set(summary["num_microbatches"]):
        raise ValueError(f"num_microbatches={m!r} is not among the runs' "
                         f"{sorted(set(summary['num_microbatches']))}")
    df = summary[summary["num_microbatches"] == m]
    fig = go.Figure(layout=dict(
        title=f"peak activation memory per rank, m={m} microbatches", barmode="group",
        xaxis_title="pipeline stage (rank)", yaxis_title="activations kept for backward (KiB)",
        template="plotly_white", height=360))
    for sched, part in df.groupby("schedule"):
        fig.add_bar(x=part["rank"], y=part["peak_activation_bytes"] / 1024, name=sched,
                    text=[f"{n} mb" for n in part["peak_activations"]], textposition="outside")
    return fig


def comm_volume_figure(runs: dict[str, dict]) -> go.Figure:
    """Bytes sent per rank and step, by operation: ``runs`` maps a label to a rank's result
    of :func:`distlab.model_parallel.mesh.train`. Every operation there is a built-in
    collective, so these are model bytes: the ring's volume for the tensor handed over."""
    fig = go.Figure(layout=dict(title="communication per rank and step (model bytes)",
                                barmode="stack", yaxis_title="model bytes per step",
                                template="plotly_white",
                                height=360, showlegend=True))
    ops = sorted({op for r in runs.values() for op in r["by_op"]})
    for op in ops:
        fig.add_bar(x=list(runs), name=op,
                    y=[r["by_op"].get(op, {}).get("bytes_sent", 0) / len(r["losses"])
                       for r in runs.values()])
    return fig
