"""Decentralized parallel SGD (D-PSGD): no server, no all-reduce, only neighbours.

Lian et al. 2017, "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case
Study for Decentralized Parallel Stochastic Gradient Descent" (arXiv 1705.09056), Algorithm
1. Each of the ``N`` ranks keeps its **own** model ``x_i``. Every step, rank ``i``

1. computes the gradient ``g_i(x_i)`` of the mean loss of its own batch (from its own shard),
2. gossips its parameters with its neighbours: ``x_i <- sum_j W_ij x_j``
   (:func:`distlab.decentralized.topology.gossip_average`, ``W`` the mixing matrix),
3. steps from the mixed point with the gradient of step 1.

Stacked over ranks that is the paper's update, implemented in exactly this order:

    X_{k+1} = W X_k - lr * G(X_k)          (X: one row per rank)

The ranks' models differ; their mean ``x_bar`` follows SGD with the averaged gradient, and the
**consensus distance** ``(1/N) sum_i ||x_i - x_bar||^2`` shrinks by about ``|lambda_2(W)|^2``
per step (grows back with the gradients' disagreement), so a graph with a larger spectral gap
keeps the models closer (Lian et al., Theorem 1).

Communication per rank and step: ``d`` messages of the ``n`` parameter bytes to ``d``
neighbours, ``d·(alpha + n·beta)``: **independent of N** for a fixed graph (2 neighbours on a
ring), where a parameter server's root moves ``2·N·n`` bytes and a ring all-reduce pays
``2(N-1)·alpha`` and waits for its slowest link. ``algorithm="all_reduce"`` runs the
centralized baseline on the same data and network: all-reduce SGD (one all-reduce of the
gradients by :func:`distlab.data_parallel.ddp.average_gradients`), with the injected delay
of a ring all-reduce, slowed down whenever the slow rank takes part.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm, launcher
from distlab.checks import is_int, require
from distlab.communication.netsim import Network
from distlab.data_parallel import ddp
from distlab.data_parallel.sync_sgd import SyncSGDConfig, batch_indices, evaluate
from distlab.decentralized import topology as topo
from distlab.launcher import MAX_WORLD_SIZE, Run
from distlab.metrics import report
from distlab.problems.workloads import Workload

ALGORITHMS = ("dpsgd", "all_reduce")
"""``"dpsgd"``: gossip with the neighbours; ``"all_reduce"``: all-reduce SGD (the baseline)."""


@dataclass(frozen=True)
class DPSGDConfig:
    """D-PSGD (or its all-reduce baseline): what to train, on which graph, over which network."""

    workload: Workload = field(default_factory=lambda: Workload(
        model="linear", batch_size=64, lr=0.1, num_steps=50))
    """What is trained (``model`` "linear" or "mlp"); the global ``batch_size`` is split
    equally, each rank taking ``batch_size / world_size`` examples from its own shard."""
    world_size: int = 4
    """Number of ranks; it divides ``workload.batch_size``."""
    topology: str = "ring"
    """The graph: one of :data:`distlab.decentralized.topology.TOPOLOGIES`."""
    algorithm: str = "dpsgd"
    """One of :data:`ALGORITHMS`."""
    network: Network | None = None
    """An injected network (latency, bandwidth, a slow rank's link), or None."""
    same_init: bool = True
    """Every rank starts from the model of ``workload.seed``; False: rank ``r`` from seed
    ``workload.seed + r``, so the consensus distance starts large and its decay shows."""
    eval_every: int = 10
    """Steps between measurements of the consensus distance and of ``x_bar``'s held-out loss
    (two extra all-reduces, kept out of ``bytes_sent`` and ``train_time``)."""

    def __post_init__(self):
        w = self.workload
        require(self, "workload", isinstance(w, Workload) and w.model in ("linear", "mlp"),
                "a distlab.problems.workloads.Workload with model 'linear' or 'mlp'")
        require(self, "world_size",
                is_int(self.world_size) and 1 <= self.world_size <= MAX_WORLD_SIZE,
                f"an int in 1..{MAX_WORLD_SIZE}")
        self.sharding()   # the batch must split equally and fit in the shards
        require(self, "topology", self.topology in topo.TOPOLOGIES,
                f"one of {topo.TOPOLOGIES}")
        require(self, "algorithm", self.algorithm in ALGORITHMS, f"one of {ALGORITHMS}")
        require(self, "network", self.network is None or isinstance(self.network, Network),
                "None or a distlab.communication.netsim.Network")
        require(self, "same_init", isinstance(self.same_init, bool)
                and (self.same_init or self.algorithm == "dpsgd"),
                "True or False (True for all-reduce SGD, whose replicas stay identical)")
        require(self, "eval_every", is_int(self.eval_every) and self.eval_every >= 1,
                "an int >= 1")

    def graph(self) -> topo.Topology:
        """The communication graph on ``world_size`` ranks."""
        return topo.build(self.topology, self.world_size)

    def sharding(self) -> SyncSGDConfig:
        """Each rank's batches are those of synchronous SGD on the same workload and ranks."""
        return SyncSGDConfig(workload=self.workload.loaded(), world_size=self.world_size)


def train(config: DPSGDConfig, group=None) -> dict:
    """D-PSGD (or all-reduce SGD) on this rank; call it on every rank of ``group``.

    Reports each step ``loss`` (this rank's batch at its own ``x_i``), ``bytes_sent`` (this
    rank's training traffic from the comm ledger, cumulative) and ``train_time`` (seconds in
    the loop without the measurements); every ``eval_every`` steps and at the last,
    ``consensus_distance`` (every rank) and ``val_loss`` of ``x_bar`` (rank 0).

    Returns:
        ``{"params"}`` this rank's final ``x_i`` as one vector, ``"losses"``, ``"train_time"``,
        ``"bytes_per_step"`` (training bytes sent per step) and ``"final"`` (the last report).
    """
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    if p != config.world_size:
        raise ValueError(f"config.world_size={config.world_size} but the group has {p} ranks")
    workload, graph, net = config.workload.loaded(), config.graph(), config.network
    ds, sharding = workload.dataset, config.sharding()
    model = _initial_model(config, rank)
    params = list(model.parameters())
    opt = workload.optimizer(params)
    probe = workload.build_model()   # holds x_bar for the held-out loss
    comm.ledger().reset()
    eval_bytes, eval_time, losses = 0, 0.0, []
    t_start = time.perf_counter()
    for step in range(workload.num_steps):
        idx = batch_indices(sharding, rank, step, len(ds.y))
        opt.zero_grad()
        loss = workload.loss(model(ds.X[idx]), ds.y[idx])   # mean over this rank's batch
        loss.backward()                                     # g_i(x_i), at the old x_i
        if config.algorithm == "dpsgd":
            x = nn.utils.parameters_to_vector(params).detach()
            topo.gossip_average(x, graph, rank, group=group, network=net)   # W x
            nn.utils.vector_to_parameters(x, params)
        else:
            if net is not None:   # a ring all-reduce waits for its slowest link
                net.sleep(net.all_reduce_delay(_nbytes(params), p))
            ddp.average_gradients(params, group=group)
        opt.step()                                          # W x - lr g(x)
        losses.append(loss.item())
        values = {"loss": losses[-1],
                  "bytes_sent": comm.ledger().totals()["bytes_sent"] - eval_bytes,
                  "train_time": time.perf_counter() - t_start - eval_time}
        if step % config.eval_every == 0 or step == workload.num_steps - 1:
            t0, b0 = time.perf_counter(), comm.ledger().totals()["bytes_sent"]
            values.update(_measure(params, probe, workload, rank, group))
            eval_bytes += comm.ledger().totals()["bytes_sent"] - b0
            eval_time += time.perf_counter() - t0
        report(step=step, **values)
    return {"params": nn.utils.parameters_to_vector(params).detach(), "losses": losses,
            "train_time": values["train_time"],
            "bytes_per_step": values["bytes_sent"] / workload.num_steps, "final": values}


def reference(config: DPSGDConfig) -> dict:
    """All ``N`` models on one process, mixed with the matrix: what :func:`train` must equal.

    Returns:
        ``{"params"}`` ``(N, n)``, row ``i`` rank ``i``'s final ``x_i``; ``"losses"`` ``(steps,
        N)``; ``"consensus_distance"`` ``{step: value}`` at the steps :func:`train` measures.
    """
    workload, graph, p = config.workload.loaded(), config.graph(), config.world_size
    ds, sharding = workload.dataset, config.sharding()
    models = [_initial_model(config, r) for r in range(p)]
    params = [list(m.parameters()) for m in models]
    opts = [workload.optimizer(ps) for ps in params]
    losses, consensus = [], {}
    for step in range(workload.num_steps):
        row = []
        for r in range(p):
            idx = batch_indices(sharding, r, step, len(ds.y))
            opts[r].zero_grad()
            loss = workload.loss(models[r](ds.X[idx]), ds.y[idx])
            loss.backward()
            row.append(loss.item())
        if config.algorithm == "dpsgd":
            xs = {r: nn.utils.parameters_to_vector(params[r]).detach().clone()
                  for r in range(p)}
            for r in range(p):
                x = topo.mix(torch.empty_like(xs[r]), graph, r, xs)   # row r of W X
                nn.utils.vector_to_parameters(x, params[r])
        else:
            for group_of_p in zip(*params):   # the same parameter on every rank
                mean = torch.stack([q.grad for q in group_of_p]).mean(0)
                for q in group_of_p:
                    q.grad.copy_(mean)
        for o in opts:
            o.step()
        losses.append(row)
        if step % config.eval_every == 0 or step == workload.num_steps - 1:
            X = torch.stack([nn.utils.parameters_to_vector(ps).detach() for ps in params])
            consensus[step] = (X - X.mean(0)).pow(2).sum(1).mean().item()   # X: (N, n)
    return {"params": torch.stack([nn.utils.parameters_to_vector(ps).detach()
                                   for ps in params]),
            "losses": torch.tensor(losses), "consensus_distance": consensus}


def start(config: DPSGDConfig, **launch) -> Run:
    """Start :func:`train` on ``config.world_size`` processes; return the :class:`Run` at once
    (``launch`` goes to :func:`distlab.start`)."""
    if not isinstance(config, DPSGDConfig):
        raise TypeError(f"config must be a DPSGDConfig, got {type(config).__name__}")
    config = replace(config, workload=config.workload.loaded())
    return launcher.start(train, config.world_size, config, **launch)


def run(config: DPSGDConfig, **launch) -> list[dict]:
    """:func:`start` and wait: the per-rank results of :func:`train`, in rank order."""
    return start(config, **launch).result()


def time_to_target(records, target: float, loss: str = "val_loss",
                   clock: str = "train_time") -> float:
    """The first ``clock`` at which a record's ``loss`` is at most ``target`` (inf: never).

    ``records`` is a run's metrics, a DataFrame (``Run.metrics()``) or a list of dicts.
    """
    rows = records.to_dict("records") if hasattr(records, "to_dict") else records
    times = [r[clock] for r in rows
             if r.get(loss) is not None and r[loss] == r[loss] and r[loss] <= target]
    return min(times, default=float("inf"))


def _initial_model(config: DPSGDConfig, rank: int) -> nn.Module:
    """The model of ``workload.seed`` (``same_init``) or of ``workload.seed + rank``; the data
    stays the run's own, so every rank shares one data set."""
    workload = config.workload.loaded()
    if not config.same_init:
        seed = workload.seed + rank
        workload = replace(workload, seed=seed, loaded_for=(workload.model, seed))
    return workload.build_model()


def _measure(params, probe: nn.Module, workload: Workload, rank: int, group) -> dict:
    """``consensus_distance`` = (1/N) sum_i ||x_i - x_bar||^2 (two all-reduces), and on rank 0
    the held-out loss of ``x_bar``."""
    p = dist.get_world_size(group)
    x = nn.utils.parameters_to_vector(params).detach()
    x_bar = x.clone()
    comm.all_reduce(x_bar, group=group)
    x_bar /= p
    distance = (x - x_bar).pow(2).sum().reshape(1)
    comm.all_reduce(distance, group=group)
    values = {"consensus_distance": distance.item() / p}
    if rank == 0:
        nn.utils.vector_to_parameters(x_bar, probe.parameters())
        values.update(evaluate(probe, workload, workload.dataset))
    return values


def _nbytes(params) -> int:
    return sum(comm.nbytes(q) for q in params)
