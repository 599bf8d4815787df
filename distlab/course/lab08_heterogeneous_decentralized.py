"""Lab 08's runs and figures: heterogeneous ranks, decentralized (gossip) and hybrid training.

The algorithms live in their topic folders (:mod:`distlab.heterogeneous`,
:mod:`distlab.planning`, :mod:`distlab.decentralized`, FedAvg in
:mod:`distlab.communication_efficient.fedavg`); the lab's panels need no adapter, their
controls are config fields. This module holds what the notebook needs beside them: the two
explorers (the mixing matrix of a graph, the planner's ranked plans) as widgets redrawn in
place, the sweeps the assertion cells start (consensus per topology, bytes per rank against
N with a parameter server's root counted for comparison, the slow-link race, FedAvg
settings), and the static figures.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import plotly.graph_objects as go
import torch

from distlab import comm, launcher
from distlab.checks import is_int, require_arg
from distlab.communication_efficient import fedavg
from distlab.decentralized import dpsgd, topology as graphs
from distlab.heterogeneous import backup_workers
from distlab.heterogeneous.backup_workers import BackupConfig
from distlab.planning import planner

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
# (distlab.ui is not imported here: a worker that unpickles this module's functions would
# import ipywidgets, which takes seconds in a fresh process)


# -- heterogeneous ranks -------------------------------------------------------------------

def balance_table(runs: dict) -> pd.DataFrame:
    """Per run and rank: the share ``batch``, total ``compute_time`` and ``wait_time`` (s).

    ``runs`` is ``{name: hetero_sgd.run(...) results}``.
    """
    return pd.DataFrame([{"run": name, "rank": rank, "batch": r["batch"],
                          "compute_time": sum(r["compute_times"]),
                          "wait_time": sum(r["wait_times"])}
                         for name, results in runs.items() for rank, r in enumerate(results)])


def balance_figure(table: pd.DataFrame) -> go.Figure:
    """Stacked bars per run and rank: seconds computing, then seconds waiting for the others."""
    labels = [f"{run}<br>rank {rank} (b = {b})"
              for run, rank, b in zip(table["run"], table["rank"], table["batch"])]
    fig = go.Figure([go.Bar(x=labels, y=table["compute_time"], name="computing (injected speed)"),
                     go.Bar(x=labels, y=table["wait_time"], name="waiting in the all-reduce")])
    fig.update_layout(barmode="stack", template="plotly_white", height=360,
                      title="where each rank's time goes", yaxis_title="seconds")
    return fig


# -- decentralized -------------------------------------------------------------------------

def mixing_figure(graph: graphs.Topology) -> go.Figure:
    """The mixing matrix ``W`` of ``graph`` as a heatmap, its spectral gap in the title."""
    W = graph.mixing_matrix()
    n = graph.world_size
    fig = go.Figure(go.Heatmap(z=W.tolist(), x=list(range(n)), y=list(range(n)),
                               colorscale="Blues", zmin=0, zmax=float(W.max()),
                               text=[[f"{w:.3g}" if w else "" for w in row] for row in W.tolist()],
                               texttemplate="%{text}" if n <= 12 else None,
                               colorbar=dict(title="W_ij")))
    fig.update_layout(title=f"{graph.name}, {n} ranks: mixing matrix W (Metropolis-Hastings), "
                            f"spectral gap {graph.spectral_gap():.3f}",
                      xaxis_title="j (sends x_j)", yaxis_title="i (mixes)", height=420,
                      yaxis_autorange="reversed", template="plotly_white")
    return fig


class MixingExplorer:
    """A topology picker and a ranks slider over the heatmap of the graph's mixing matrix,
    redrawn in place when either moves (no output captured in a callback)."""

    def __init__(self, topology: str = "ring", ranks: int = 8, max_ranks: int = 16):
        import ipywidgets as W
        from distlab.ui.figures import STATIC, PageFigureWidget
        self.topology = W.Dropdown(options=graphs.TOPOLOGIES, value=topology,
                                   description="topology")
        self.ranks = W.IntSlider(value=ranks, min=2, max=max_ranks, description="ranks")
        self.figure = (PageFigureWidget if STATIC else go.FigureWidget)(self._draw())
        self._static = STATIC
        self.topology.observe(self.redraw, "value")
        self.ranks.observe(self.redraw, "value")
        self.widget = W.VBox([W.HBox([self.topology, self.ranks]), self.figure])

    def _draw(self) -> go.Figure:
        return mixing_figure(graphs.build(self.topology.value, self.ranks.value))

    def redraw(self, _change=None) -> None:
        new = self._draw()
        with self.figure.batch_update():
            self.figure.data = []
            self.figure.add_trace(new.data[0])
            self.figure.layout.title = new.layout.title
        if self._static:
            self.figure.redraw_page()

    def _ipython_display_(self):
        from IPython.display import display
        display(self.figure if self._static else self.widget)


def consensus_sweep(config: dpsgd.DPSGDConfig, world_size: int,
                    topologies=graphs.TOPOLOGIES) -> pd.DataFrame:
    """The consensus distance per step on each topology at ``world_size`` ranks, simulated
    on one process (:func:`distlab.decentralized.dpsgd.reference`, which the real runs
    equal): columns ``topology``, ``spectral_gap``, ``step``, ``consensus_distance``."""
    rows = []
    for name in topologies:
        cfg = replace(config, world_size=world_size, topology=name)
        gap = cfg.graph().spectral_gap()
        for step, value in dpsgd.reference(cfg)["consensus_distance"].items():
            rows.append({"topology": f"{cfg.graph().name} (gap {gap:.2f})",
                         "spectral_gap": gap, "step": step, "consensus_distance": value})
    return pd.DataFrame(rows)


def bytes_against_world_size(config: dpsgd.DPSGDConfig, server: BackupConfig,
                             world_sizes=(2, 3, 4)) -> pd.DataFrame:
    """Bytes sent per step, measured on real processes: each D-PSGD rank's on a ring, and
    the root's of a synchronous parameter server (``backups=0``) with as many workers.

    Columns ``world_size``, ``who`` ("D-PSGD rank (ring)", "parameter server root"),
    ``bytes_per_step`` (the mean over D-PSGD's ranks; the server's own)."""
    require_arg("world_sizes", world_sizes, all(is_int(n) and 2 <= n <= 8 for n in world_sizes),
                "ints in 2..8")
    rows = []
    for n in world_sizes:
        cfg = replace(config, world_size=n, topology="ring")
        per_rank = [r["bytes_per_step"] for r in dpsgd.run(cfg)]
        rows.append({"world_size": n, "who": "D-PSGD rank (ring)",
                     "bytes_per_step": sum(per_rank) / n})
        ps = replace(server, num_workers=n, backups=0, workload=server.workload.loaded())
        root = launcher.launch(_counted_backup, ps.world_size, ps)[0]
        rows.append({"world_size": n, "who": "parameter server root",
                     "bytes_per_step": root / ps.workload.num_steps})
    return pd.DataFrame(rows)


def _counted_backup(config: BackupConfig) -> int:
    """On each rank: the backup-workers run, then the bytes this rank sent (the ledger)."""
    comm.ledger().reset()
    backup_workers.train(config)
    return comm.ledger().totals()["bytes_sent"]


def race(configs: dict, target: float) -> pd.DataFrame:
    """Run each D-PSGD / all-reduce configuration; per run the ``train_time`` (injected
    network included) to reach held-out loss ``target``, the final held-out loss and the
    slowest rank's training time. ``configs`` is ``{name: DPSGDConfig}``."""
    rows, curves = [], []
    for name, cfg in configs.items():
        handle = dpsgd.start(cfg)
        results = handle.result()
        metrics = handle.metrics()
        zero = metrics[(metrics["rank"] == 0) & metrics["val_loss"].notna()]
        curves.append(zero.assign(run=name))
        rows.append({"run": name, "time_to_target": dpsgd.time_to_target(zero, target),
                     "final_val_loss": zero["val_loss"].iloc[-1],
                     "train_time": max(r["train_time"] for r in results)})
    table = pd.DataFrame(rows).set_index("run")
    table.attrs["curves"] = pd.concat(curves, ignore_index=True)
    return table


# -- shared figures -------------------------------------------------------------------------

def curves_figure(df: pd.DataFrame, x: str, y: str, by: str = "run", title: str = "",
                  log_x: bool = False, log_y: bool = False, markers: bool = False) -> go.Figure:
    """One line of ``y`` against ``x`` per value of ``by`` (a finished sweep's frame)."""
    fig = go.Figure()
    for i, (name, d) in enumerate(df.groupby(by, sort=False)):
        d = d.sort_values(x)
        fig.add_scatter(x=d[x], y=d[y], name=str(name), mode="lines+markers" if markers else "lines",
                        line=dict(color=COLORS[i % len(COLORS)]))
    fig.update_layout(title=title or f"{_label(y)} against {_label(x)}",
                      xaxis_title=_label(x), yaxis_title=_label(y), height=380,
                      template="plotly_white", xaxis_type="log" if log_x else "linear",
                      yaxis_type="log" if log_y else "linear")
    return fig


def stacked(results: list[dict], key: str = "params") -> torch.Tensor:
    """Every rank's ``key`` stacked, ``(N, n)``: a run to compare with a reference."""
    return torch.stack([r[key] for r in results])


def _label(name: str) -> str:
    return name.replace("_", " ")


# -- federated ------------------------------------------------------------------------------

def federated_sweep(configs: dict) -> pd.DataFrame:
    """Run each FedAvg configuration (``{name: FedAvgConfig}``) on real processes; rank 0's
    records per round, tidy: ``run, step, loss, accuracy, dropped, bytes_sent, ...``."""
    frames = []
    for name, config in configs.items():
        handle = fedavg.start(config)
        handle.result()
        metrics = handle.metrics()
        frames.append(metrics[metrics["rank"] == 0].assign(run=name))
    return pd.concat(frames, ignore_index=True)


# -- the planner ----------------------------------------------------------------------------

class PlanExplorer:
    """The planner's inputs as controls (a model of ``models``, the cluster's size, memory,
    network and a heterogeneous half) over the table of the fastest plans that fit, redrawn
    as HTML when a control moves (no output captured in a callback)."""

    def __init__(self, models: dict, model: str, devices: int = 16):
        import ipywidgets as W
        from distlab.ui.figures import STATIC
        self.models, self._static = models, STATIC
        self.controls = {
            "model": W.Dropdown(options=list(models), value=model, description="model"),
            "devices": W.Dropdown(options=[8, 16, 64], value=devices, description="devices"),
            "memory_gb": W.Dropdown(options=[24, 40, 80], value=80, description="memory GB"),
            "network_gb_s": W.Dropdown(options=[12.5, 25.0, 50.0], value=25.0,
                                       description="network GB/s"),
            "heterogeneous": W.Checkbox(value=False, description="second half at half speed")}
        self.table = W.HTML()
        for control in self.controls.values():
            control.observe(self.redraw, "value")
        self.widget = W.VBox([W.HBox(list(self.controls.values()),
                                     layout=W.Layout(flex_flow="row wrap")), self.table])
        self.redraw()

    def redraw(self, _change=None) -> None:
        v = {k: c.value for k, c in self.controls.items()}
        spec = self.models[v["model"]]
        cluster = cluster_of(v["devices"], v["memory_gb"], v["network_gb_s"], v["heterogeneous"])
        table = plan_table(spec, cluster, heterogeneous=v["heterogeneous"])
        dropped, why = table.attrs["dropped"]
        if not v["heterogeneous"] and len(table):
            table = table.drop(columns="batch_shares")
        self.table.value = (f"<p>{spec.num_params / 1e9:.2f}B parameters on {v['devices']} "
                            f"devices: the {len(table)} fastest plans that fit; {dropped} "
                            f"dropped (the closest {why})</p>"
                            + table.to_html(float_format=lambda x: f"{x:.4g}", index=False))

    def _ipython_display_(self):
        from IPython.display import HTML, display
        display(HTML(self.table.value) if self._static else self.widget)


def cluster_of(devices: int, memory_gb: float, network_gb_s: float,
               heterogeneous: bool = False):
    """``devices`` accelerators of ``memory_gb`` and 300 TFLOP/s sustained, 8 to a node
    (NVLink-like links inside, ``network_gb_s`` across); with ``heterogeneous`` the second
    half of them (whole nodes) at half speed."""
    from distlab.planning.cluster import Cluster, Device
    kinds = [Device(memory_gb * 1e9, 150e12 if heterogeneous and r >= devices // 2 else 300e12)
             for r in range(devices)]
    return Cluster(tuple(kinds), devices_per_node=8, intra=(5e-6, 1 / 150e9),
                   inter=(20e-6, 1 / (network_gb_s * 1e9)))


def plan_table(model, cluster, heterogeneous: bool = False, top: int = 10) -> pd.DataFrame:
    """The ``top`` fastest plans of :func:`distlab.planning.planner.rank_plans` that fit, one
    row each: the plan, memory per rank (GB) and step time (s) with their parts; the frame's
    ``attrs["dropped"]`` counts the plans that do not fit and says why the closest failed."""
    require_arg("top", top, is_int(top) and top >= 1, "an int >= 1")
    ranking = planner.rank_plans(model, cluster, heterogeneous)
    rows = [{"plan": str(p.plan), "memory_gb": p.memory_bytes / 1e9, "step_s": p.seconds,
             **{f"{k}_s": v for k, v in p.step_time.items()},
             "batch_shares": p.batch_shares} for p in ranking.fit[:top]]
    table = pd.DataFrame(rows)
    table.attrs["dropped"] = (len(ranking.dropped), ranking.dropped[0].why if ranking.dropped else "")
    return table


def predicted_measured_figure(rows: list[dict], rho: float) -> go.Figure:
    """Predicted against measured seconds per step, one marker per configuration (log-log)."""
    labels = [f"dp={r['dp']} tp={r['tp']} batch {r['batch_size']}" for r in rows]
    fig = go.Figure(go.Scatter(x=[r["predicted"] for r in rows], y=[r["measured"] for r in rows],
                               mode="markers+text", text=labels, textposition="top center"))
    low = min(min(r["predicted"], r["measured"]) for r in rows)
    high = max(max(r["predicted"], r["measured"]) for r in rows)
    fig.add_scatter(x=[low, high], y=[low, high], mode="lines", name="measured = predicted",
                    line=dict(dash="dot", color="#888"))
    fig.update_layout(title=f"the planner on real processes: Spearman rho = {rho:.2f}",
                      xaxis_title="predicted seconds per step", yaxis_title="measured seconds per step",
                      xaxis_type="log", yaxis_type="log", height=420, template="plotly_white",
                      showlegend=False)
    return fig
