"""Communicate less often: local SGD and federated averaging (and compressed updates).

**Local SGD** (periodic model averaging; Stich 2019, "Local SGD converges fast and
communicates little", algorithm 1): every rank takes ``period`` = H plain SGD steps on its
own shard, then the ranks average their models::

    x_r <- x_r - lr * grad f_r(x_r)                  (H times, no communication)
    x   <- (1/p) sum_r x_r,   x_r <- x                (one all-reduce every H steps)

H = 1 is synchronous data-parallel SGD (averaging models after one step averages the
gradients); larger H divides the traffic by H, at the price of the local models drifting
apart in between ("divergence", reported as ``||x_r - x||^2`` just before each average).
Here the ranks average their *updates* ``x_r - x`` rather than the models, which is the
same thing uncompressed and lets the update be compressed with error feedback
(:mod:`distlab.communication_efficient.compression`; with H = 1 that is compressed SGD, Karimireddy et al. 2019).

**Federated averaging** (McMahan et al. 2017, algorithm 1, "FedAvg"): K clients each hold
their own data. Each round a fraction C of them is sampled; each runs E local steps from
the global model; the new global model is their average weighted by data size n_k. The p
processes host the clients (client k lives on rank k mod p); one all-reduce per round sums
``[sum n_k x_k, sum n_k]``. On label-skewed (non-IID) clients
(:func:`distlab.problems.data.label_skewed_shards`) local models pull towards their own classes and
FedAvg slows down (McMahan et al. 2017, section 3; Zhao et al. 2018).

Communication (alpha-beta model, n parameters, p ranks), per H local steps or per round:
``2(p-1) alpha + 2(p-1)/p·4n beta`` uncompressed, or the compressed cost of
:func:`distlab.communication_efficient.compression.all_reduce_compressed`. :func:`simulated_comm_time` turns the
ledger into time on a simulated network of a given latency and bandwidth (labelled
"simulated": nothing is slowed down for real).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from distlab import comm
from distlab.communication_efficient.compression import METHODS, Compressor, all_reduce_compressed, make_compressor
from distlab.checks import is_int, is_number, require
from distlab.problems.data import digits, label_skewed_shards, shard_indices
from distlab.launcher import Run, launch, start
from distlab.metrics import report
from distlab.problems.models import mlp
from distlab.communication_efficient.optimizers import LAMB, OneBitAdam

OPTIMIZERS = ("sgd", "adam", "lamb", "onebit_adam")
SHARDS = ("iid", "label_skewed")


def _validate(config, ints=(), floats=(), choices=()):
    """Check the fields named in tables: ``(name, lo, hi)`` ints in lo..hi, floats in (lo, hi]."""
    for name, lo, hi in ints:
        v = getattr(config, name)
        require(config, name, is_int(v) and lo <= v <= hi, f"integers {lo}..{hi}")
    for name, lo, hi in floats:
        v = getattr(config, name)
        require(config, name, is_number(v) and lo < v <= hi, f"({lo:g}, {hi:g}]")
    for name, allowed in choices:
        require(config, name, getattr(config, name) in allowed, f"one of {allowed}")


@dataclass(frozen=True)
class LocalSGDConfig:
    """Local SGD (or synchronous training when ``period`` = 1) on scikit-learn's digits."""
    num_steps: int = 200
    """Local steps per rank, 1 to 100,000."""
    period: int = 1
    """H: local steps between two averages, 1 to 10,000 (1: synchronous SGD)."""
    lr: float = 0.2
    """Learning rate, in (0, 10]."""
    batch_size: int = 16
    """Examples per rank per step, 1 to 4,096."""
    shards: str = "iid"
    """``"iid"`` (random shards) or ``"label_skewed"`` (each rank sees few classes)."""
    classes_per_rank: int = 2
    """Labels per rank for ``"label_skewed"`` shards, 1 to 10."""
    compression: str = "none"
    """How updates are compressed: one of :data:`distlab.communication_efficient.compression.METHODS`."""
    ratio: float = 0.01
    """Fraction of coordinates top-k and random-k keep, in (0, 1]."""
    error_feedback: bool = True
    """Keep a residual of what compression did not send (recommended)."""
    optimizer: str = "sgd"
    """``"sgd"`` (local SGD), or with ``period`` = 1: ``"adam"``, ``"lamb"``, ``"onebit_adam"``."""
    warmup_steps: int = 20
    """1-bit Adam's full-precision warm-up, 1 to 100,000 steps."""
    hidden: int = 32
    """Width of the MLP's hidden layer, 1 to 4,096."""
    bandwidth: float = 1e6
    """Simulated network bandwidth in bytes/s, in (0, 1e12]."""
    latency: float = 1e-4
    """Simulated per-message latency alpha in seconds, in [0, 10]."""
    seed: int = 0
    """Seed of the data split, the model and the minibatches."""

    def __post_init__(self):
        _validate(self, ints=[("num_steps", 1, 100_000), ("period", 1, 10_000),
                              ("batch_size", 1, 4096), ("classes_per_rank", 1, 10),
                              ("warmup_steps", 1, 100_000), ("hidden", 1, 4096),
                              ("seed", 0, 2 ** 31)],
                  floats=[("lr", 0, 10), ("ratio", 0, 1), ("bandwidth", 0, 1e12)],
                  choices=[("shards", SHARDS), ("compression", METHODS),
                           ("optimizer", OPTIMIZERS), ("error_feedback", (True, False))])
        require(self, "latency", is_number(self.latency) and 0 <= self.latency <= 10,
                "[0, 10] seconds")
        if self.optimizer != "sgd" and (self.period != 1 or self.compression != "none"):
            raise ValueError(f"LocalSGDConfig.optimizer={self.optimizer!r} averages gradients "
                             f"every step: it needs period=1 (got {self.period}) and "
                             f"compression='none' (got {self.compression!r})")


@dataclass(frozen=True)
class FedAvgConfig:
    """Federated averaging (McMahan et al. 2017) on scikit-learn's digits."""
    num_rounds: int = 30
    """Communication rounds, 1 to 10,000."""
    num_clients: int = 20
    """K: clients, each with its own shard, 1 to 1,000."""
    client_fraction: float = 0.25
    """C: fraction of clients sampled each round, in (0, 1]."""
    local_steps: int = 10
    """SGD steps each sampled client takes per round, 1 to 10,000."""
    batch_size: int = 16
    """Examples per local step, 1 to 4,096."""
    lr: float = 0.2
    """Learning rate, in (0, 10]."""
    shards: str = "iid"
    """``"iid"`` or ``"label_skewed"`` clients."""
    classes_per_client: int = 2
    """Labels per client for ``"label_skewed"``, 1 to 10."""
    hidden: int = 32
    """Width of the MLP's hidden layer, 1 to 4,096."""
    bandwidth: float = 1e6
    """Simulated network bandwidth in bytes/s, in (0, 1e12]."""
    latency: float = 1e-4
    """Simulated per-message latency in seconds, in [0, 10]."""
    seed: int = 0
    """Seed of the data split, the model, the sampling and the minibatches."""

    def __post_init__(self):
        _validate(self, ints=[("num_rounds", 1, 10_000), ("num_clients", 1, 1000),
                              ("local_steps", 1, 10_000), ("batch_size", 1, 4096),
                              ("classes_per_client", 1, 10), ("hidden", 1, 4096),
                              ("seed", 0, 2 ** 31)],
                  floats=[("client_fraction", 0, 1), ("lr", 0, 10), ("bandwidth", 0, 1e12)],
                  choices=[("shards", SHARDS)])
        require(self, "latency", is_number(self.latency) and 0 <= self.latency <= 10,
                "[0, 10] seconds")

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.client_fraction * self.num_clients))


# -- pieces every algorithm here shares ---------------------------------------------------

@contextlib.contextmanager
def _one_thread():
    """Run the single-process references on one thread: on tensors this small, more threads
    only add contention (50 times slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _flat(params) -> torch.Tensor:
    return torch.cat([w.detach().reshape(-1) for w in params])


def _assign(params, vec: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for w in params:
            w.copy_(vec[offset: offset + w.numel()].view_as(w))
            offset += w.numel()


def _shards(data, config, world_size: int) -> list[torch.Tensor]:
    n = len(data.y)
    per = (config.classes_per_rank if isinstance(config, LocalSGDConfig)
           else config.classes_per_client)
    if config.shards == "iid":
        return [shard_indices(n, r, world_size, seed=config.seed) for r in range(world_size)]
    return label_skewed_shards(data.y, world_size, per, config.seed)


def _batches(shard: torch.Tensor, batch_size: int, seed: int):
    """Minibatches of ``shard`` drawn with replacement, reproducibly from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield shard[torch.randint(len(shard), (batch_size,), generator=g)]


def _sgd_step(model, params, X, y, lr) -> None:
    grads = torch.autograd.grad(F.cross_entropy(model(X), y), params)
    with torch.no_grad():
        for w, g in zip(params, grads):
            w -= lr * g


@torch.no_grad()
def evaluate(model, data) -> dict:
    """``loss`` on the whole training set and ``accuracy`` on the held-out set."""
    loss = F.cross_entropy(model(data.X), data.y).item()
    accuracy = (model(data.X_val).argmax(1) == data.y_val).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def simulated_comm_time(by_op: dict, world_size: int, latency: float, bandwidth: float) -> float:
    """Seconds the ledger's traffic takes on a simulated network (alpha-beta model).

    Each call pays ``latency`` per sequential message of its ring algorithm (all-reduce
    2(p-1), all-gather and reduce-scatter p-1, broadcast and barrier log2 p, send 1) and
    each byte sent costs ``1 / bandwidth`` seconds.
    """
    p = world_size
    steps = {"all_reduce": 2 * (p - 1), "all_gather": p - 1, "reduce_scatter": p - 1,
             "broadcast": math.ceil(math.log2(max(p, 2))), "barrier": math.ceil(math.log2(max(p, 2))),
             "recv": 0}
    return sum(s["calls"] * steps.get(op, 1) * latency + s["bytes_sent"] / bandwidth
               for op, s in by_op.items())


class _Meter:
    """Traffic since construction (the ledger belongs to the process) and compute time."""

    def __init__(self, config, world_size):
        self.config, self.world_size = config, world_size
        self.start = comm.ledger().by_op()
        self.compute_time = 0.0

    def values(self) -> dict:
        now = {op: dict(s) for op, s in comm.ledger().by_op().items()}
        for op, s in self.start.items():
            for k in ("calls", "bytes_sent", "bytes_recv", "comm_time"):
                now[op][k] -= s[k]
        c = self.config
        sim = simulated_comm_time(now, self.world_size, c.latency, c.bandwidth)
        return {"bytes_sent": sum(s["bytes_sent"] for s in now.values()),
                "comm_time": sum(s["comm_time"] for s in now.values()),
                "compute_time": self.compute_time, "sim_time": self.compute_time + sim}


# -- local SGD ----------------------------------------------------------------------------

def _make_optimizer(config: LocalSGDConfig, params, group):
    return {"sgd": lambda: None,
            "adam": lambda: torch.optim.Adam(params, lr=config.lr),
            "lamb": lambda: LAMB(params, lr=config.lr),
            "onebit_adam": lambda: OneBitAdam(params, lr=config.lr, group=group,
                                              warmup_steps=config.warmup_steps)}[config.optimizer]()


def train(config: LocalSGDConfig, group=None, record=report, data=None) -> list[float]:
    """The worker: local SGD with period H (optionally compressed), or data-parallel Adam,
    LAMB or 1-bit Adam when ``config.optimizer`` says so.

    After every average it reports ``step``, ``bytes_sent``, ``comm_time``,
    ``compute_time``, ``sim_time`` (compute plus simulated communication), ``divergence``
    (``||x_r - x||^2``, every rank) and, on rank 0, ``loss`` and ``accuracy`` of the averaged
    model. ``data`` is the digits data set (None: load it here; the launchers below load it
    once in the caller, which spares every worker importing scikit-learn). Returns the final
    parameters, flattened.
    """
    import torch.distributed as dist
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    data = data if data is not None else digits(seed=config.seed)
    shard = _shards(data, config, p)[rank]
    model = mlp(data.num_features, config.hidden, data.num_classes, depth=1, seed=config.seed)
    params = list(model.parameters())
    optimizer = _make_optimizer(config, params, group)
    compressor = make_compressor(config.compression, config.ratio, config.seed)
    anchor = _flat(params)                                    # the last averaged model x
    residual = (torch.zeros_like(anchor) if config.error_feedback
                and config.compression != "none" else None)
    meter = _Meter(config, p)
    batches = _batches(shard, config.batch_size, seed=config.seed * 1000 + rank + 1)

    def log(step, divergence):
        values = {**meter.values(), "divergence": divergence}
        if rank == 0:
            values.update(evaluate(model, data))
        record(step=step, **values)

    log(0, 0.0)
    for step in range(1, config.num_steps + 1):
        t0, comm0 = time.perf_counter(), comm.ledger().totals()["comm_time"]
        idx = next(batches)
        if optimizer is None:
            _sgd_step(model, params, data.X[idx], data.y[idx], config.lr)
        else:
            loss = F.cross_entropy(model(data.X[idx]), data.y[idx])
            for w, g in zip(params, torch.autograd.grad(loss, params)):
                w.grad = g
            if config.optimizer != "onebit_adam":             # 1-bit Adam communicates itself
                g = all_reduce_compressed(_flat([w.grad for w in params]), Compressor(),
                                          group=group)
                _assign([w.grad for w in params], g)
            optimizer.step()
        # compute only: the optimizers' gradient all-reduce is communication
        meter.compute_time += (time.perf_counter() - t0
                               - (comm.ledger().totals()["comm_time"] - comm0))
        if optimizer is not None:
            log(step, 0.0)
        elif step % config.period == 0 or step == config.num_steps:
            x = _flat(params)
            anchor += all_reduce_compressed(x - anchor, compressor, residual, group)
            _assign(params, anchor)
            log(step, (x - anchor).pow(2).sum().item())
    return _flat(params).tolist()


def reference(config: LocalSGDConfig, world_size: int) -> tuple[list[float], list[float]]:
    """Single-process synchronous training on the union of the ranks' minibatches.

    One model; at every step the ``world_size`` minibatches the ranks would draw are
    concatenated and the optimizer steps on their mean loss. Local SGD with ``period`` = 1
    and no compression must match it. Returns (loss after each step, from step 0; final
    parameters).
    """
    with _one_thread():
        return _reference(config, world_size)


def _reference(config, world_size):
    data = digits(seed=config.seed)
    shards = _shards(data, config, world_size)
    model = mlp(data.num_features, config.hidden, data.num_classes, depth=1, seed=config.seed)
    params = list(model.parameters())
    optimizer = {"sgd": lambda: torch.optim.SGD(params, lr=config.lr),
                 "adam": lambda: torch.optim.Adam(params, lr=config.lr),
                 # its warm-up only, with OneBitAdam's eps
                 "onebit_adam": lambda: torch.optim.Adam(params, lr=config.lr, eps=1e-3),
                 "lamb": lambda: LAMB(params, lr=config.lr)}[config.optimizer]()
    streams = [_batches(s, config.batch_size, seed=config.seed * 1000 + r + 1)
               for r, s in enumerate(shards)]
    losses = [evaluate(model, data)["loss"]]
    for _ in range(config.num_steps):
        idx = torch.cat([next(s) for s in streams])
        optimizer.zero_grad()
        F.cross_entropy(model(data.X[idx]), data.y[idx]).backward()
        optimizer.step()
        losses.append(evaluate(model, data)["loss"])
    return losses, _flat(params).tolist()


def start_run(world_size: int = 4, on_metrics=None, on_output=None, **settings) -> Run:
    """Start :func:`train` on ``world_size`` processes without blocking (for a RunPanel).

    ``settings`` are :class:`LocalSGDConfig` fields; bad values raise here, before any
    process starts.
    """
    config = LocalSGDConfig(**settings)
    return start(train, world_size, config, data=digits(seed=config.seed),
                 on_metrics=on_metrics, on_output=on_output, timeout=300)


# -- federated averaging ------------------------------------------------------------------

def _client_data(config: FedAvgConfig, data=None):
    data = data if data is not None else digits(seed=config.seed)
    return data, _shards(data, config, config.num_clients)


def _sampled(config: FedAvgConfig, round_: int) -> list[int]:
    g = torch.Generator().manual_seed(config.seed * 7919 + round_)
    return sorted(torch.randperm(config.num_clients, generator=g)[: config.clients_per_round]
                  .tolist())


def _local_update(model, params, global_x, data, shard, config, round_, client):
    _assign(params, global_x)
    batches = _batches(shard, config.batch_size, seed=(config.seed * 1000 + round_) * 1000 + client)
    for _ in range(config.local_steps):
        idx = next(batches)
        _sgd_step(model, params, data.X[idx], data.y[idx], config.lr)
    return _flat(params)


def train_fedavg(config: FedAvgConfig, group=None, record=report, data=None) -> list[float]:
    """The worker: FedAvg rounds; this rank runs the sampled clients it hosts (k mod p).

    Reports per round ``step`` (the round), traffic and times as :func:`train`, the mean
    ``divergence`` of this rank's clients from the new global model, and on rank 0 the
    global model's ``loss`` and ``accuracy``. ``data`` as for :func:`train`. Returns the
    final global parameters.
    """
    import torch.distributed as dist
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    data, shards = _client_data(config, data)
    model = mlp(data.num_features, config.hidden, data.num_classes, depth=1, seed=config.seed)
    params = list(model.parameters())
    global_x = _flat(params)
    meter = _Meter(config, p)
    record(step=0, **meter.values(), **(evaluate(model, data) if rank == 0 else {}))
    for round_ in range(1, config.num_rounds + 1):
        t0 = time.perf_counter()
        locals_, total = [], torch.zeros(global_x.numel() + 1)  # [sum n_k x_k, sum n_k]
        for k in (c for c in _sampled(config, round_) if c % p == rank):
            x = _local_update(model, params, global_x, data, shards[k], config, round_, k)
            total[:-1] += len(shards[k]) * x
            total[-1] += len(shards[k])
            locals_.append(x)
        meter.compute_time += time.perf_counter() - t0
        comm.all_reduce(total, group=group)                   # every rank joins, sampled or not
        global_x = total[:-1] / total[-1]
        _assign(params, global_x)
        values = meter.values()
        if locals_:
            values["divergence"] = torch.stack([(x - global_x).pow(2).sum()
                                                for x in locals_]).mean().item()
        if rank == 0:
            values.update(evaluate(model, data))
        record(step=round_, **values)
    return global_x.tolist()


def fedavg_reference(config: FedAvgConfig) -> tuple[list[float], list[float]]:
    """Single-process FedAvg: (global training loss after each round, from round 0; final
    parameters)."""
    with _one_thread():
        return _fedavg_reference(config)


def _fedavg_reference(config):
    data, shards = _client_data(config)
    model = mlp(data.num_features, config.hidden, data.num_classes, depth=1, seed=config.seed)
    params = list(model.parameters())
    global_x = _flat(params)
    losses = [evaluate(model, data)["loss"]]
    for round_ in range(1, config.num_rounds + 1):
        clients = _sampled(config, round_)
        xs = [_local_update(model, params, global_x, data, shards[k], config, round_, k)
              for k in clients]
        weights = torch.tensor([float(len(shards[k])) for k in clients])
        global_x = (torch.stack(xs) * weights[:, None]).sum(0) / weights.sum()
        _assign(params, global_x)
        losses.append(evaluate(model, data)["loss"])
    return losses, global_x.tolist()


def start_fedavg(world_size: int = 4, on_metrics=None, on_output=None, **settings) -> Run:
    """Start :func:`train_fedavg` without blocking; ``settings`` are :class:`FedAvgConfig` fields."""
    config = FedAvgConfig(**settings)
    return start(train_fedavg, world_size, config, data=digits(seed=config.seed),
                 on_metrics=on_metrics, on_output=on_output, timeout=300)


# -- several runs in one launch (for sweeps and the lab's comparisons) --------------------

def _run_all(configs: dict, datasets: dict):
    out = {}
    for name, config in configs.items():
        records = []
        worker = train_fedavg if isinstance(config, FedAvgConfig) else train
        worker(config, record=lambda **r: records.append(r), data=datasets[config.seed])
        out[name] = records
    return out


def compare(configs: dict, world_size: int = 4, timeout: float = 600) -> pd.DataFrame:
    """Run several configurations one after the other in ONE launch (saves start-up time).

    Args:
        configs: ``{run name: LocalSGDConfig or FedAvgConfig}``.
        world_size: processes.
        timeout: seconds for the whole sweep.

    Returns:
        The tidy frame of every record: ``run, rank, step, ...``.
    """
    datasets = {c.seed: digits(seed=c.seed) for c in configs.values()}   # loaded once, here
    results = launch(_run_all, world_size, configs, datasets, timeout=timeout)
    rows = [{"run": name, "rank": rank, **r} for rank, res in enumerate(results)
            for name, recs in res.items() for r in recs]
    return pd.DataFrame(rows)


def bytes_to_reach(df: pd.DataFrame, target_loss: float) -> dict:
    """``{run: bytes_sent per rank when rank 0's loss first reached target_loss}`` (inf if never)."""
    out = {}
    for run, d in df[(df["rank"] == 0) & df["loss"].notna()].groupby("run", sort=False):
        hit = d[d["loss"] <= target_loss].sort_values("step")
        out[run] = float(hit["bytes_sent"].iloc[0]) if len(hit) else math.inf
    return out


def curves_figure(df: pd.DataFrame, x: str = "bytes_sent", y: str = "loss", title: str = "",
                  log_x: bool = False, log_y: bool = True):
    """A static plotly figure of finished runs: ``y`` against ``x``, one line per run.

    Ranks are averaged at each ``x`` (as :class:`distlab.ui.figures.LiveFigure` does); ``loss``
    and ``accuracy`` come from rank 0 only. Static figures keep a saved notebook small:
    each live ``FigureWidget`` carries its own copy of plotly.js.
    """
    import plotly.graph_objects as go
    from distlab.ui.figures import axis_title as _title
    names = {"sim_time": "simulated wall time (s)", "divergence": "divergence ||x_r - x||^2"}
    axis_title = lambda name: names.get(name, _title(name))  # noqa: E731
    fig = go.Figure()
    for run, d in df.dropna(subset=[x, y]).groupby("run", sort=False):
        line = d.groupby(x, sort=True)[y].mean()
        fig.add_scatter(x=line.index, y=line.values, mode="lines", name=run)
    fig.update_layout(title=title or f"{axis_title(y)} against {axis_title(x)}",
                      xaxis_title=axis_title(x), yaxis_title=axis_title(y),
                      xaxis_type="log" if log_x else "linear",
                      yaxis_type="log" if log_y else "linear",
                      template="plotly_white", height=360, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def frontier_figure(df: pd.DataFrame, title: str = "final accuracy against total bytes sent"):
    """A plotly scatter: each run's final held-out accuracy against its total bytes per rank."""
    import plotly.graph_objects as go
    last = (df[(df["rank"] == 0) & df["accuracy"].notna()].sort_values("step")
            .groupby("run", sort=False).last())
    fig = go.Figure(go.Scatter(x=last["bytes_sent"], y=last["accuracy"], text=last.index,
                               mode="markers+text", textposition="top center"))
    fig.update_layout(title=title, xaxis_title="bytes sent per rank", yaxis_title="accuracy",
                      xaxis_type="log", template="plotly_white", height=380)
    return fig


__all__ = [
    "LocalSGDConfig", "FedAvgConfig", "train", "reference", "start_run", "train_fedavg",
    "fedavg_reference", "start_fedavg", "compare", "bytes_to_reach", "curves_figure",
    "frontier_figure",
    "simulated_comm_time", "evaluate"]
