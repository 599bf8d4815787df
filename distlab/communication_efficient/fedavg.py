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

Federated training in depth (:mod:`distlab.communication_efficient.federated_clients`):
non-IID shards drawn from a Dirichlet prior (``dirichlet_alpha``, Hsu et al. 2019), clients
that drop out of a round (``dropout_prob``: the server averages those that arrived,
example-weighted) or are slow (``slow_clients`` sleep ``slow_delay`` seconds a local step),
and SCAFFOLD's control variates against client drift (``scaffold``, Karimireddy et al.
2020; why SCAFFOLD and not FedProx: that module's page). Each client starts every round
with a fresh optimizer (``workload.optimizer``): its momentum or Adam moments are its own,
never another client's.

Communication (alpha-beta model, :mod:`distlab.communication.alpha_beta`; n parameters, p
ranks), per round: one ring all-reduce of 4(n + 1) bytes,
``2(p-1) alpha + 2(p-1)/p·4(n+1) beta``, whatever the number of clients (a dropped client
adds zeros to its rank's sum); with ``scaffold`` the all-reduce also carries the control
variates' changes, 4(2n + 1) bytes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication_efficient.federated_clients import (add_correction, arrived,
                                                               dirichlet_shards, new_control)
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
    """``"iid"`` or ``"label_skewed"`` clients (``"iid"`` when ``dirichlet_alpha`` is set)."""
    dirichlet_alpha: float | None = None
    """None: the ``shards`` split; a number in (0, 1e6]: each label split over the clients in
    Dir(alpha) proportions (Hsu et al. 2019): 0.1 gives each client a few labels, 100 nearly
    IID."""
    dropout_prob: float = 0.0
    """Probability that a sampled client drops out of a round (seeded), in [0, 1): it sends
    nothing and the server averages the clients that arrived."""
    slow_clients: int = 0
    """Clients 0..slow_clients-1 are slow: each sleeps ``slow_delay`` per local step."""
    slow_delay: float = 0.0
    """Injected seconds per local step of a slow client, in [0, 1]."""
    scaffold: bool = False
    """SCAFFOLD (Karimireddy et al. 2020): correct every local step by the control variates
    ``c - c_k``; False is plain FedAvg."""
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
        self._check_clients()
        check_batch(self, self.clients_per_round, "clients_per_round")
        steps = self.workload.num_steps
        require_arg("FedAvgConfig.workload.num_steps", steps, steps % self.local_steps == 0,
                    f"a multiple of local_steps={self.local_steps} (E x rounds)")

    def _check_clients(self) -> None:
        alpha = self.dirichlet_alpha
        require(self, "dirichlet_alpha", alpha is None or (is_number(alpha) and 0 < alpha <= 1e6
                                                           and self.shards == "iid"),
                "None or a number in (0, 1e6] with shards='iid' (one split at a time)")
        require(self, "dropout_prob", is_number(self.dropout_prob)
                and 0 <= self.dropout_prob < 1, "[0, 1)")
        require(self, "slow_clients", is_int(self.slow_clients)
                and 0 <= self.slow_clients <= self.num_clients,
                f"integers 0..num_clients={self.num_clients}")
        require(self, "slow_delay", is_number(self.slow_delay) and 0 <= self.slow_delay <= 1,
                "[0, 1] seconds")
        require(self, "scaffold", isinstance(self.scaffold, bool), "True or False")
        if alpha is not None:
            try:
                dirichlet_shards(self.workload.loaded().dataset.y, self.num_clients, alpha,
                                 self.workload.seed)
            except ValueError as e:
                require(self, "num_clients", False, f"a Dirichlet split of the digits ({e})")

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
    ``clients`` (how many sampled clients arrived, over all ranks) and ``dropped``, the mean
    ``divergence`` ``||x_k - x||^2`` of this rank's clients from the new global model, and on
    rank 0 the global model's ``loss`` and ``accuracy``.

    Returns:
        ``{"loss", "accuracy", "params"}`` of the final global model, the same on every rank,
        and ``"rounds"``: for each round, ``{"round", "sampled", "arrived"}`` client lists.
    """
    rank, p = rank_and_size(config, group)
    loss = config.workload.loss
    data, shards, model = _problem(config, launcher.device())
    params = list(model.parameters())
    global_x = flat(params)
    n, rounds = global_x.numel(), []
    controls = Controls(config, global_x)
    meter = TrafficMeter(config.latency, config.bandwidth, p)
    record(step=0, **meter.values(), **(evaluate(model, data, loss) if rank == 0 else {}))
    for round_ in range(1, config.num_rounds + 1):
        t0 = time.perf_counter()
        locals_ = []
        # [sum n_k x_k, sum n_k] (n + 1,), then with SCAFFOLD [.., sum Δc_k] (2n + 1,)
        total = torch.zeros(n + 1 + controls.size, device=global_x.device)
        sampled = _sampled(config, round_)
        came = _arrived(config, sampled, round_)
        for k in (c for c in came if c % p == rank):
            x = _local_update(model, global_x, data, shards[k], config, round_, k, controls)
            total[:n] += len(shards[k]) * x
            total[n] += len(shards[k])
            total[n + 1:] += controls.update(k, global_x, x)
            locals_.append(x)
        meter.compute_time += time.perf_counter() - t0
        comm.all_reduce(total, group=group)                   # every rank joins, sampled or not
        if total[n] > 0:                                      # else all dropped: keep the model
            global_x = total[:n] / total[n]
        controls.step(total[n + 1:])
        assign(params, global_x)
        rounds.append({"round": round_, "sampled": sampled, "arrived": came})
        values = {**meter.values(), "clients": len(came), "dropped": len(sampled) - len(came)}
        if locals_:
            values["divergence"] = torch.stack([(x - global_x).pow(2).sum()
                                                for x in locals_]).mean().item()
        if rank == 0:
            values.update(evaluate(model, data, loss))
        record(step=round_, **values)
    return {**evaluate(model, data, loss), "params": global_x.tolist(), "rounds": rounds}


def reference(config: FedAvgConfig) -> tuple[list[float], list[float]]:
    """Single-process FedAvg, every client in turn: (global training loss after each round,
    from round 0; final parameters). :func:`train` must equal it on any world size."""
    loss = config.workload.loss
    with one_thread():
        data, shards, model = _problem(config)
        params = list(model.parameters())
        global_x = flat(params)
        controls = Controls(config, global_x)
        losses = [evaluate(model, data, loss)["loss"]]
        for round_ in range(1, config.num_rounds + 1):
            clients = _arrived(config, _sampled(config, round_), round_)
            changes = torch.zeros(controls.size)
            if clients:                                       # else all dropped: keep the model
                xs = torch.stack([_local_update(model, global_x, data, shards[k], config,
                                                round_, k, controls) for k in clients])  # (S, n)
                for k, x in zip(clients, xs):
                    changes += controls.update(k, global_x, x)
                weights = torch.tensor([float(len(shards[k])) for k in clients])  # (S,)
                global_x = (xs * weights[:, None]).sum(0) / weights.sum()
            controls.step(changes)
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


def _arrived(config: FedAvgConfig, sampled: list[int], round_: int) -> list[int]:
    """The sampled clients that do not drop out of this round."""
    return arrived(sampled, config.num_clients, config.dropout_prob, config.workload.seed,
                   round_)


def _problem(config: FedAvgConfig, device=None):
    """``(data, shards, model)``; the shards Dirichlet-drawn when ``dirichlet_alpha`` is set."""
    data, shards, model = problem(config, config.num_clients, config.classes_per_client,
                                  device)
    if config.dirichlet_alpha is not None:
        shards = [s.to(data.y.device) for s in dirichlet_shards(
            data.y, config.num_clients, config.dirichlet_alpha, config.workload.seed)]
    return data, shards, model


class Controls:
    """SCAFFOLD's control variates (Karimireddy et al. 2020, algorithm 1) as one process
    holds them: the server's ``c`` and the ``c_k`` of the clients it hosts (zeros at first,
    kept across rounds). Without ``config.scaffold`` it holds nothing and corrects nothing.
    """

    def __init__(self, config: FedAvgConfig, global_x: torch.Tensor):
        self.config, self.on = config, config.scaffold
        self.size = global_x.numel() if self.on else 0      # Δc travels beside the model
        self.c = torch.zeros(self.size, device=global_x.device)
        self.clients: dict[int, torch.Tensor] = {}

    def correction(self, k: int) -> torch.Tensor | None:
        """``c - c_k``, added to client k's every gradient (None: plain FedAvg)."""
        return self.c - self.clients.get(k, torch.zeros_like(self.c)) if self.on else None

    def update(self, k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Client k's new ``c_k`` after its steps from ``x`` to ``y``; returns ``Δc_k``."""
        if not self.on:
            return self.c
        old = self.clients.get(k, torch.zeros_like(self.c))
        self.clients[k] = new_control(old, self.c, x, y, self.config.local_steps,
                                      self.config.workload.lr)
        return self.clients[k] - old

    def step(self, changes: torch.Tensor) -> None:
        """The server's ``c += (1/K) Σ Δc_k`` over the clients that arrived."""
        if self.on:
            self.c += changes / self.config.num_clients


def _local_update(model, global_x, data, shard, config, round_, client, controls):
    """Client ``client``'s E steps from the global model: its new flat parameters.

    A fresh optimizer each time: a client's optimizer state is its own, and begins anew
    with every round's global model. With SCAFFOLD each gradient gets ``c - c_k``; a slow
    client sleeps ``slow_delay`` per step."""
    workload, params = config.workload, list(model.parameters())
    assign(params, global_x)
    correction = controls.correction(client)
    optimizer = workload.optimizer(params)
    batches = sample_batches(shard, workload.batch_size // config.clients_per_round,
                             seed=(workload.seed * 1000 + round_) * 1000 + client)
    for _ in range(config.local_steps):
        idx = next(batches)                           # (batch_size / clients_per_round,)
        optimizer.zero_grad()
        workload.loss(model(data.X[idx]), data.y[idx]).backward()
        if correction is not None:
            add_correction(params, correction)
        optimizer.step()
        if client < config.slow_clients and config.slow_delay:
            time.sleep(config.slow_delay)
    return flat(params)


__all__ = ["FedAvgConfig", "train", "reference", "start", "run"]
