"""Lab 10's glue: several runs in one launch, the budget panel's run, tables and figures.

The algorithms live in :mod:`distlab.communication_efficient` (``diloco``,
``streaming_diloco``, ``powersgd``, ``compressed_all_reduce``, ``budget``); this module only
runs them the way the notebook shows them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pandas as pd
import plotly.graph_objects as go
import torch

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require
from distlab.communication.netsim import Network
from distlab.communication_efficient import budget, compression, diloco
from distlab.communication_efficient import compressed_all_reduce as C
from distlab.communication_efficient.local_training import assign, evaluate, with_data
from distlab.course.lab06_communication_efficient import curves_figure
from distlab.metrics import report
from distlab.problems.workloads import Workload

NETWORKS = {"1 Gbit/s": budget.GBIT, "100 Mbit/s": budget.GBIT / 10,
            "machine's own": None}
"""The budget panel's networks: bytes per second per link (None: nothing injected)."""


def run_together(runs: dict, timeout: float = 600) -> dict:
    """Several runs one after the other in ONE launch (saves start-up time).

    Args:
        runs: ``{name: (train, config)}``: a worker function ``train(config)`` (e.g.
            ``diloco.train``, ``powersgd.train_torch_hook``, ``sync_sgd.train``) and its
            configuration; one ``world_size`` for all.

    Returns:
        ``{name: [every rank's result of train, in rank order]}``.
    """
    sizes = {config.world_size for _, config in runs.values()}
    if len(sizes) != 1:
        raise ValueError(f"run_together runs every configuration on the same processes; got "
                         f"world sizes {sorted(sizes)}: give them one world_size")
    runs = {name: (train, with_data(config)) for name, (train, config) in runs.items()}
    per_rank = launcher.launch(_run_all, sizes.pop(), runs, timeout=timeout)
    return {name: [results[name] for results in per_rank] for name in runs}


def training_loss(workload: Workload, params) -> float:
    """The loss of the flat ``params`` on the workload's whole training set (what DiLoCo
    reports for its global model)."""
    model = workload.build_model()
    with torch.no_grad():
        assign(list(model.parameters()), torch.as_tensor(params, dtype=torch.float32))
    return evaluate(model, workload.loaded().dataset, workload.loss)["loss"]


def diloco_table(results: dict) -> pd.DataFrame:
    """``{name: DiLoCo or streaming DiLoCo results}`` as one tidy frame, column ``run``."""
    return pd.concat([diloco.table(res[0], name).rename(columns={"method": "run"})
                      for name, res in results.items()], ignore_index=True)


def powersgd_table(results: dict) -> pd.DataFrame:
    """``{name: PowerSGD results}`` (ours, PyTorch's hook) as a tidy frame: ``run, step,
    loss`` (the mean over ranks of their slices' losses: the global batch's) and
    ``bytes_per_step`` (rank 0's)."""
    frames = []
    for name, res in results.items():
        loss = torch.tensor([r["loss"] for r in res]).mean(0)
        frames.append(pd.DataFrame({"run": name, "step": range(len(loss)),
                                    "loss": loss.tolist(), "bytes_per_step": res[0]["bytes_sent"]}))
    return pd.concat(frames, ignore_index=True)


def compressed_bytes(numel: int, world_sizes) -> pd.DataFrame:
    """Bytes per rank to average ``numel`` float32 coordinates by the formulas: the ring
    all-reduce of float32, the sign payloads all-gathered, and the two-phase compressed
    all-reduce (its busiest rank); columns ``world_size, method, bytes_per_rank``."""
    rows = []
    for p in world_sizes:
        rows.append((p, "float32 ring all-reduce",
                     compression.bytes_sent_per_call(compression.make_compressor("none"), numel, p)))
        rows.append((p, "sign, all-gather", C.bytes_per_rank("all_gather", numel, p)))
        rows.append((p, "sign, two-phase", max(C.bytes_per_rank("two_phase", numel, p, rank=r)
                                               for r in range(p))))
    return pd.DataFrame(rows, columns=["world_size", "method", "bytes_per_rank"])


def measured_compressed_bytes(numel: int, world_sizes) -> pd.DataFrame:
    """The same as :func:`compressed_bytes`, counted in the ledger on real ranks (the busiest
    rank's bytes of one call of each); column ``bytes_per_rank``."""
    rows = []
    for p in world_sizes:
        sent = launcher.launch(_sign_averages, p, numel, timeout=120)
        for method in sent[0]:
            rows.append((p, method, max(s[method] for s in sent)))
    return pd.DataFrame(rows, columns=["world_size", "method", "bytes_per_rank"])


def bytes_against_world_size_figure(model: pd.DataFrame, measured: pd.DataFrame,
                                    crossover: int | None) -> go.Figure:
    """Bytes per rank against N: formula lines, measured points, the crossover marked."""
    fig = go.Figure()
    for method, d in model.groupby("method", sort=False):
        fig.add_scatter(x=d["world_size"], y=d["bytes_per_rank"], mode="lines", name=method)
    for method, d in measured.groupby("method", sort=False):
        fig.add_scatter(x=d["world_size"], y=d["bytes_per_rank"], mode="markers",
                        name=f"{method} (measured)", marker=dict(size=10, symbol="x"))
    if crossover is not None:
        fig.add_vline(x=crossover, line_dash="dot",
                      annotation_text=f"two-phase wins from N = {crossover}")
    fig.update_layout(title="bytes per rank to average one vector, against the number of ranks N",
                      xaxis_title="ranks N", yaxis_title="bytes per rank", xaxis_type="log",
                      yaxis_type="log", template="plotly_white", height=380,
                      margin=dict(l=60, r=20, t=50, b=50))
    return fig


def budget_figure(table: pd.DataFrame, x: str, title: str) -> go.Figure:
    """:func:`budget.compare`'s table: loss against ``x``, one line per method and network."""
    df = table.assign(run=table["method"] + " · " + table["network"])
    return curves_figure(df, x=x, y="loss", title=title, log_x=x == "bytes_sent")


@dataclass(frozen=True)
class BudgetRun:
    """One method of :func:`distlab.communication_efficient.budget.compare` on one network:
    what the budget panel runs, its fields the panel's controls."""
    method: str = "diloco"
    """One of ``budget.METHODS``."""
    network: str = "100 Mbit/s"
    """A key of :data:`NETWORKS`: the injected bandwidth, or the machine's own."""
    latency: float = 1e-4
    """Injected seconds per message, 0 to 0.1."""
    world_size: int = 2
    """Ranks, 1 to 4."""
    num_steps: int = 40
    """Inner steps, a multiple of ``period``."""
    period: int = 10
    """H of local SGD and DiLoCo (even)."""
    workload: Workload = field(default_factory=lambda: budget.WORKLOAD)
    """The model, data and seed every method trains."""

    def __post_init__(self):
        require(self, "method", self.method in budget.METHODS, f"one of {budget.METHODS}")
        require(self, "network", self.network in NETWORKS, f"one of {tuple(NETWORKS)}")
        require(self, "latency", is_number(self.latency) and 0 <= self.latency <= 0.1,
                "0 to 0.1 seconds")
        require(self, "world_size", is_int(self.world_size) and 1 <= self.world_size <= 4,
                "integers 1..4")
        require(self, "period", is_int(self.period) and self.period >= 2
                and self.period % 2 == 0, "even integers >= 2")
        require(self, "num_steps", is_int(self.num_steps) and self.num_steps >= self.period
                and self.num_steps % self.period == 0, f"a multiple of period={self.period}")


def start_budget_run(config: BudgetRun, **launch) -> launcher.Run:
    """Start one :class:`BudgetRun`; it reports ``step, loss, bytes_sent, wall_time`` (the
    rows of :func:`budget.compare`, rank 0's loss) when the method is done."""
    config = replace(config, workload=replace(config.workload, num_steps=config.num_steps).loaded())
    return launcher.start(_budget_worker, config.world_size, config, **launch)


# -- what runs on each rank -----------------------------------------------------------------

def _run_all(runs: dict) -> dict:
    return {name: train(config) for name, (train, config) in runs.items()}


def _budget_worker(config: BudgetRun) -> None:
    bandwidth = NETWORKS[config.network]
    network = None if bandwidth is None else Network(latency=config.latency, bandwidth=bandwidth)
    algorithm = budget.config(config.method, config.workload, config.world_size,
                              config.period)
    # budget.compare's own timing of one method; its rows are reported once it is done.
    for row in budget.timed(network, algorithm):
        if not math.isnan(row["loss"]):
            report(step=row["step"], loss=row["loss"], bytes_sent=row["bytes_sent"],
                   wall_time=row["wall_time"])


def _sign_averages(numel: int) -> dict:
    """One average of a random vector by each sign scheme and by float32; bytes of each."""
    import torch.distributed as dist
    x = torch.randn(numel, generator=torch.Generator().manual_seed(dist.get_rank()))
    sent = {}
    for method, average in (
            ("float32 ring all-reduce", lambda: comm.all_reduce(x.clone())),
            ("sign, all-gather", lambda: compression.all_reduce_compressed(
                x, compression.Sign(), torch.zeros(numel))),
            ("sign, two-phase", lambda: C.compressed_all_reduce(
                x, compression.Sign(), torch.zeros(numel)))):
        before = comm.ledger().totals()["bytes_sent"]
        average()
        sent[method] = comm.ledger().totals()["bytes_sent"] - before
    return sent
