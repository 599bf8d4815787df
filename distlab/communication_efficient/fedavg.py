"""Federated averaging (McMahan et al. 2017, "Communication-efficient learning of deep
networks from decentralized data", algorithm 1, "FedAvg").

K clients each hold their own data. Each round a fraction C of them is sampled; each runs
E local SGD steps from the global model x; the new global model is their average weighted
by data size n_k::

    x <- sum_{k in S} n_k x_k / sum_{k in S} n_k

The p processes host the clients (client k lives on rank k mod p); one all-reduce per round
sums ``[sum n_k x_k, sum n_k]`` over the ranks, every rank joining whether it hosts a
sampled client or not. On label-skewed (non-IID) clients
(:func:`distlab.problems.data.label_skewed_shards`) the local models pull towards their
own classes and FedAvg slows down (McMahan et al. 2017, section 3; Zhao et al. 2018).
Local SGD (:mod:`distlab.communication_efficient.local_sgd`) is the case C = 1, one client
per rank, equal weights.

What is trained is the config's :class:`~distlab.problems.workloads.Workload` (an ``"mlp"``
on the digits: model, data, loss, ``lr``, ``seed``). FedAvg counts rounds of E local steps,
not steps, so the workload's ``num_steps`` is each sampled client's local steps over the
whole run, E x rounds (local SGD's ``num_steps`` likewise counts local steps), and its
``batch_size``, the examples of one parallel local step, is split over the clients sampled
in a round: each draws ``batch_size / clients_per_round`` (McMahan et al.'s B).

Communication (alpha-beta model, :mod:`distlab.communication.alpha_beta`; n parameters, p
ranks), per round: one ring all-reduce of 4(n + 1) bytes,
``2(p-1) alpha + 2(p-1)/p·4(n+1) beta``, whatever the number of clients.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from distlab import comm, launcher
from distlab.checks import require_arg
from distlab.communication_efficient.local_training import (SHARDS, WORKLOAD, TrafficMeter,
                                                            assign, check_batch, check_split,
                                                            check_workload, evaluate, flat,
                                                            one_thread, problem,
                                                            rank_and_size, sample_batches,
                                                            validate, with_data)
from distlab.metrics import report
from distlab.problems.workloads import Workload


@dataclass(frozen=True)
class FedAvgConfig:
    """Federated averaging (McMahan et al. 2017) of a workload on the digits.

    ``workload.num_steps`` is E x rounds (each sampled client's local steps over the run:
    :attr:`num_rounds` rounds of ``local_steps``, it must divide); ``workload.batch_size`` is
    split over a round's sampled clients, ``batch_size / clients_per_round`` examples each per
    local step (it must divide).
    """
    workload: Workload = field(
        default_factory=lambda: replace(WORKLOAD, num_steps=300, batch_size=80))
    """What is trained: an ``"mlp"`` workload; by default 30 rounds of 10 local steps, with 16
    examples per local step for each of the 5 clients sampled per round."""
    world_size: int = 2
    """Processes hosting the clients (client k on rank k mod world_size), 1 to 64."""
    num_clients: int = 20
    """K: clients, each with its own shard, 1 to 1,000 (label-skewed: as many as the
    digits' labels can be split between, about 700 with 2 labels each)."""
    client_fraction: float = 0.25
    """C: fraction of clients sampled each round, in (0, 1]."""
    local_steps: int = 10
    """E: SGD steps each sampled client takes per round, 1 to 10,000."""
    shards: str = "iid"
    """``"iid"`` or ``"label_skewed"`` clients."""
    classes_per_client: int = 2
    """Labels per client for ``"label_skewed"``, 1 to 10."""
    bandwidth: float = 1e6
    """Simulated network bandwidth in bytes/s, in (0, 1e12]."""
    latency: float = 1e-4
    """Simulated per-message latency in seconds, in [0, 10]."""

    def __post_init__(self):
        validate(self, ints=[("world_size", 1, launcher.MAX_WORLD_SIZE),
                             ("num_clients", 1, 1000), ("local_steps", 1, 10_000),
                             ("classes_per_client", 1, 10)],
                 floats=[("client_fraction", 0, 1), ("bandwidth", 0, 1e12)],
                 choices=[("shards", SHARDS)])
        check_workload(self)
        check_split(self, "num_clients", "classes_per_client")
        check_batch(self, self.clients_per_round, "clients_per_round")
        steps = self.workload.num_steps
        require_arg("FedAvgConfig.workload.num_steps", steps, steps % self.local_steps == 0,
                    f"a multiple of local_steps={self.local_steps} (E x rounds)")

    @property
    def clients_per_round(self) -> int:
        """max(1, round(C·K)) clients are sampled each round."""
        return max(1, round(self.client_fraction * self.num_clients))

    @property
    def num_rounds(self) -> int:
        """Communication rounds: the workload's ``num_steps`` over E."""
        return self.workload.num_steps // self.local_steps


def train(config: FedAvgConfig, group=None, *, record=report) -> dict:
    """The worker: FedAvg rounds; this rank runs the sampled clients it hosts (k mod p).

    Records per round ``step`` (the round), ``bytes_sent``, ``comm_time``,
    ``compute_time``, ``sim_time`` as :func:`distlab.communication_efficient.local_sgd.train`,
    the mean ``divergence`` ``||x_k - x||^2`` of this rank's clients from the new global
    model, and on rank 0 the global model's ``loss`` and ``accuracy``.

    Returns:
        ``{"loss", "accuracy", "params"}`` of the final global model, the same on every rank.
    """
    rank, p = rank_and_size(config, group)
    loss = config.workload.loss
    data, shards, model = problem(config, config.num_clients, config.classes_per_client,
                                  launcher.device())
    params = list(model.parameters())
    optimizer = config.workload.optimizer(params)
    global_x = flat(params)
    meter = TrafficMeter(config.latency, config.bandwidth, p)
    record(step=0, **meter.values(), **(evaluate(model, data, loss) if rank == 0 else {}))
    for round_ in range(1, config.num_rounds + 1):
        t0 = time.perf_counter()
        locals_ = []
        total = torch.zeros(global_x.numel() + 1, device=global_x.device)  # [sum n_k x_k, sum n_k]
        for k in (c for c in _sampled(config, round_) if c % p == rank):
            x = _local_update(model, optimizer, global_x, data, shards[k], config, round_, k)
            total[:-1] += len(shards[k]) * x
            total[-1] += len(shards[k])
            locals_.append(x)
        meter.compute_time += time.perf_counter() - t0
        comm.all_reduce(total, group=group)                   # every rank joins, sampled or not
        global_x = total[:-1] / total[-1]
        assign(params, global_x)
        values = meter.values()
        if locals_:
            values["divergence"] = torch.stack([(x - global_x).pow(2).sum()
                                                for x in locals_]).mean().item()
        if rank == 0:
            values.update(evaluate(model, data, loss))
        record(step=round_, **values)
    return {**evaluate(model, data, loss), "params": global_x.tolist()}


def reference(config: FedAvgConfig) -> tuple[list[float], list[float]]:
    """Single-process FedAvg, every client in turn: (global training loss after each round,
    from round 0; final parameters). :func:`train` must equal it on any world size."""
    loss = config.workload.loss
    with one_thread():
        data, shards, model = problem(config, config.num_clients, config.classes_per_client)
        params = list(model.parameters())
        optimizer = config.workload.optimizer(params)
        global_x = flat(params)
        losses = [evaluate(model, data, loss)["loss"]]
        for round_ in range(1, config.num_rounds + 1):
            clients = _sampled(config, round_)
            xs = torch.stack([_local_update(model, optimizer, global_x, data, shards[k],
                                            config, round_, k) for k in clients])  # (S, n)
            weights = torch.tensor([float(len(shards[k])) for k in clients])       # (S,)
            global_x = (xs * weights[:, None]).sum(0) / weights.sum()
            assign(params, global_x)
            losses.append(evaluate(model, data, loss)["loss"])
        return losses, global_x.tolist()


def start(config: FedAvgConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes and return the
    :class:`~distlab.Run` at once; ``launch`` goes to :func:`distlab.launcher.start`."""
    return launcher.start(train, config.world_size, with_data(config), **launch)


def run(config: FedAvgConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def _sampled(config: FedAvgConfig, round_: int) -> list[int]:
    """The clients of this round, the same on every rank (seeded by the round)."""
    g = torch.Generator().manual_seed(config.workload.seed * 7919 + round_)
    return sorted(torch.randperm(config.num_clients, generator=g)[: config.clients_per_round]
                  .tolist())


def _local_update(model, optimizer, global_x, data, shard, config, round_, client):
    """Client ``client``'s E SGD steps from the global model: its new flat parameters."""
    workload, params = config.workload, list(model.parameters())
    assign(params, global_x)
    batches = sample_batches(shard, workload.batch_size // config.clients_per_round,
                             seed=(workload.seed * 1000 + round_) * 1000 + client)
    for _ in range(config.local_steps):
        idx = next(batches)                           # (batch_size / clients_per_round,)
        optimizer.zero_grad()
        workload.loss(model(data.X[idx]), data.y[idx]).backward()
        optimizer.step()
    return flat(params)


__all__ = ["FedAvgConfig", "train", "reference", "start", "run"]
