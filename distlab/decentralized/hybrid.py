"""Hybrid training: synchronous inside groups, asynchronous across them.

The multi-datacenter shape (Dean et al. 2012's Downpour SGD with data-parallel model
replicas; Gupta et al. 2016, "Model accuracy and runtime tradeoff in distributed deep
learning", section 3): the ``N`` workers form ``N / group_size`` groups of ``group_size``
consecutive ranks. Inside a group the workers are synchronous data parallelism: each
computes the gradient of its share of the group's batch and the group all-reduces
(:func:`distlab.data_parallel.ddp.average_gradients` on a ``dist.new_group`` sub-group).
Across groups there is an **asynchronous parameter server**, one extra rank (rank ``N``,
after the workers): each group's leader (its first rank) sends the group's averaged
gradient, the server applies it as it arrives (``workload.optimizer``), replies with the
fresh parameters, and the leader broadcasts them inside its group.

* ``group_size = N``: one group, so every update is one synchronous step on the global batch:
  exactly synchronous SGD (:func:`reference` equals :func:`distlab.data_parallel.sync_sgd.reference`);
* ``group_size = 1``: every worker is its own group: a fully asynchronous parameter server.

A straggler (``slowdown``) slows only its own group: the other groups keep pushing, at the
price of staleness (the versions between the parameters a group read and the update).
``workload.batch_size`` is the examples of **one push** (one server update), split equally
over the group, as in :class:`~distlab.asynchronous.ps_config.ParameterServerConfig`.

Communication per update (alpha-beta, n parameter bytes, g = ``group_size``): the group's
all-reduce ``2(g-1)·alpha + 2(g-1)/g·n·beta``, a push and a reply ``2(alpha + n·beta)``
through the server's one link (which carries all ``N/g`` groups' traffic), and a broadcast
in the group.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require
from distlab.data_parallel import ddp
from distlab.data_parallel.sync_sgd import SyncSGDConfig, batch_indices, evaluate
from distlab.launcher import MAX_WORLD_SIZE, Run
from distlab.metrics import report
from distlab.problems.workloads import Workload

GO, STOP = 1.0, 0.0   # the first number of a server's reply
REPLY_HEAD = 2        # a reply: [GO or STOP, version] + parameters
PUSH_HEAD = 1         # a push:  [version read] + the group's averaged gradient


@dataclass(frozen=True)
class HybridConfig:
    """Groups of synchronous workers around an asynchronous parameter server."""

    workload: Workload = field(default_factory=lambda: Workload(
        model="linear", batch_size=32, lr=0.05, num_steps=60))
    """What is trained (``"linear"`` or ``"mlp"``); ``batch_size`` examples per push, split
    over the group; ``num_steps`` server updates."""
    world_size: int = 4
    """Workers (the server is one more process)."""
    group_size: int = 2
    """Workers per synchronous group; it divides ``world_size`` and ``workload.batch_size``."""
    step_time: float = 0.0
    """Seconds of injected compute per gradient (stands in for a bigger model)."""
    slowdown: tuple = ()
    """Per-worker slowdown factors of ``step_time`` (a straggler); missing = 1."""
    eval_every: int = 5
    """Server updates between held-out evaluations (the server reports ``val_loss``)."""

    def __post_init__(self):
        w, n = self.workload, self.world_size
        require(self, "workload", isinstance(w, Workload) and w.model in ("linear", "mlp"),
                "a distlab.problems.workloads.Workload with model 'linear' or 'mlp'")
        require(self, "world_size", is_int(n) and 1 <= n < MAX_WORLD_SIZE,
                f"an int in 1..{MAX_WORLD_SIZE - 1} (one more process serves)")
        require(self, "group_size", is_int(self.group_size) and self.group_size >= 1
                and n % self.group_size == 0 and w.batch_size % self.group_size == 0,
                f"an int >= 1 dividing world_size={n} and workload.batch_size={w.batch_size}")
        self.sharding()   # every worker's share must fit in its shard
        require(self, "step_time", is_number(self.step_time) and 0 <= self.step_time <= 10,
                "0 to 10 seconds")
        require(self, "slowdown", isinstance(self.slowdown, tuple) and len(self.slowdown) <= n
                and all(is_number(s) and 1 <= s <= 1000 for s in self.slowdown),
                f"a tuple of at most {n} factors in 1..1000")
        require(self, "eval_every", is_int(self.eval_every) and self.eval_every >= 1,
                "an int >= 1")

    @property
    def num_groups(self) -> int:
        return self.world_size // self.group_size

    def sharding(self) -> SyncSGDConfig:
        """Worker ``r``'s batches: its share of synchronous SGD's, with ``num_groups`` pushes'
        examples per step (one group's steps: the group's ranks' shares side by side)."""
        return SyncSGDConfig(replace(self.workload.loaded(),
                                     batch_size=self.workload.batch_size * self.num_groups),
                             world_size=self.world_size)


def train(config: HybridConfig, group=None) -> dict:
    """The body of every process: rank ``world_size`` serves, the others work in groups."""
    if group is not None:
        raise ValueError("hybrid.train builds its own sub-groups of the world; group=None")
    if dist.get_world_size() != config.world_size + 1:
        raise ValueError(f"hybrid.train needs world_size + 1 = {config.world_size + 1} "
                         f"processes, got {dist.get_world_size()}")
    gs = config.group_size
    # Every process creates every sub-group, in the same order (dist.new_group's rule).
    groups = [dist.new_group(list(range(g * gs, (g + 1) * gs))) for g in range(config.num_groups)]
    comm.ledger().reset()
    if dist.get_rank() == config.world_size:
        return _serve(config)
    return _work(config, groups[dist.get_rank() // gs])


def reference(config: HybridConfig) -> dict:
    """One process, the groups taking turns: update ``t`` is group ``t mod G``'s gradient at
    the parameters that group last received. One group (``group_size = world_size``) is
    always this schedule, and it is synchronous SGD; with several groups a real run follows
    it only when their pushes happen to arrive in turn.

    Returns ``{"params"}`` the server's final parameters as one vector, ``"staleness"``.
    """
    workload, gs = config.workload.loaded(), config.group_size
    ds, sharding = workload.dataset, config.sharding()
    server = workload.build_model()
    opt = workload.optimizer(server.parameters())
    model = workload.build_model()   # a worker's copy, loaded with what its group read
    read = [nn.utils.parameters_to_vector(server.parameters()).detach().clone()
            for _ in range(config.num_groups)]
    steps, versions, staleness = [0] * config.num_groups, [0] * config.num_groups, []
    for t in range(workload.num_steps):
        g = t % config.num_groups
        nn.utils.vector_to_parameters(read[g], model.parameters())
        grads = []
        for r in range(g * gs, (g + 1) * gs):
            model.zero_grad()
            idx = batch_indices(sharding, r, steps[g], len(ds.y))
            workload.loss(model(ds.X[idx]), ds.y[idx]).backward()
            grads.append(nn.utils.parameters_to_vector([q.grad for q in model.parameters()]))
        _apply(server, opt, torch.stack(grads).mean(0))
        staleness.append(t - versions[g])
        read[g] = nn.utils.parameters_to_vector(server.parameters()).detach().clone()
        steps[g], versions[g] = steps[g] + 1, t + 1
    return {"params": nn.utils.parameters_to_vector(server.parameters()).detach(),
            "staleness": staleness}


def start(config: HybridConfig, **launch) -> Run:
    """Start :func:`train` on ``world_size + 1`` processes; return the :class:`Run` at once."""
    if not isinstance(config, HybridConfig):
        raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
    config = replace(config, workload=config.workload.loaded())
    return launcher.start(train, config.world_size + 1, config, **launch)


def run(config: HybridConfig, **launch) -> list[dict]:
    """:func:`start` and wait: the workers' results, then the server's (the last)."""
    return start(config, **launch).result()


def _serve(config: HybridConfig) -> dict:
    """Apply each group's gradient as it arrives; reply with the fresh parameters.

    After ``num_steps`` updates each group's next push is answered STOP (not applied), so
    every group stops after exactly one more exchange.
    """
    workload = config.workload.loaded()
    model = workload.build_model()
    opt = workload.optimizer(model.parameters())
    n = sum(q.numel() for q in model.parameters())
    leaders = range(0, config.world_size, config.group_size)
    # One receiving thread per leader, all feeding one queue in order of arrival: gloo's
    # receive from any source promises no fairness (in one run it served two of four
    # leaders 62 times out of 64).
    inbox, go_on = queue.Queue(), {r: queue.Queue() for r in leaders}
    for r in leaders:
        threading.Thread(target=_receive, args=(r, PUSH_HEAD + n, inbox, go_on[r]),
                         daemon=True).start()
    version, staleness, pushes, running = 0, [], dict.fromkeys(leaders, 0), len(leaders)
    t_start = time.perf_counter()
    while running:
        leader, push = inbox.get()
        pushes[leader] += 1
        flag = GO if version < workload.num_steps else STOP
        if flag == GO:
            _apply(model, opt, push[PUSH_HEAD:])
            staleness.append(version - int(push[0]))
            version += 1
        x = nn.utils.parameters_to_vector(model.parameters()).detach()
        comm.send(torch.cat([torch.tensor([flag, float(version)]), x]), leader)
        go_on[leader].put(flag == GO)   # after STOP this leader sends nothing more
        running -= flag == STOP
        if flag == GO:
            values = {"staleness": staleness[-1], "train_time": time.perf_counter() - t_start,
                      "bytes_sent": comm.ledger().totals()["bytes_sent"]}
            if version % config.eval_every == 0 or version == workload.num_steps:
                values.update(evaluate(model, workload, workload.dataset))
            report(step=version, **values)
    return {"role": "server", "params": nn.utils.parameters_to_vector(model.parameters())
            .detach(), "staleness": staleness, "pushes": pushes,
            "train_time": time.perf_counter() - t_start,
            "bytes_sent": comm.ledger().totals()["bytes_sent"]}


def _work(config: HybridConfig, group) -> dict:
    """One worker: gradient, all-reduce in the group; the leader pushes and pulls; the group
    gets the reply by broadcast, and stops on STOP."""
    workload, me, gs = config.workload.loaded(), dist.get_rank(), config.group_size
    leader = me - me % gs
    ds, sharding = workload.dataset, config.sharding()
    model = workload.build_model()
    params = list(model.parameters())
    reply = torch.empty(REPLY_HEAD + sum(q.numel() for q in params))
    slow = config.slowdown[me] if me < len(config.slowdown) else 1.0
    version, losses = 0, []
    while True:
        model.zero_grad()
        idx = batch_indices(sharding, me, len(losses), len(ds.y))
        loss = workload.loss(model(ds.X[idx]), ds.y[idx])
        loss.backward()
        time.sleep(config.step_time * slow)      # injected compute; a straggler's is longer
        ddp.average_gradients(params, group=group)   # the group's synchronous step
        if me == leader:
            g = nn.utils.parameters_to_vector([q.grad for q in params])
            comm.send(torch.cat([torch.tensor([float(version)]), g]), config.world_size)
            comm.recv(reply, config.world_size)
        if gs > 1:
            comm.broadcast(reply, leader, group=group)
        losses.append(loss.item())
        report(step=len(losses) - 1, loss=losses[-1],
               bytes_sent=comm.ledger().totals()["bytes_sent"])
        if reply[0] == STOP:
            break
        version = int(reply[1])
        nn.utils.vector_to_parameters(reply[REPLY_HEAD:].clone(), params)   # reply is reused
    return {"role": "worker", "losses": losses}


def _receive(leader: int, size: int, inbox: queue.Queue, go_on: queue.Queue) -> None:
    """Receive ``leader``'s pushes into ``inbox``, one at a time, while the server says go on
    (so no receive is left posted at the end)."""
    while True:
        push = torch.empty(size)
        comm.recv(push, leader)
        inbox.put((leader, push))
        if not go_on.get():
            return


def _apply(model: nn.Module, opt: torch.optim.Optimizer, grad: torch.Tensor) -> None:
    """One optimizer step with ``grad`` (one vector) as the model's gradient."""
    for q, part in zip(model.parameters(), grad.split([q.numel() for q in model.parameters()])):
        q.grad = part.view_as(q).clone()
    opt.step()
