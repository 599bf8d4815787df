"""DiLoCo: many local AdamW steps, then one outer Nesterov step on the averaged change.

**DiLoCo** (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models", arXiv 2311.08105, algorithm 1). Every round, each of the p workers starts
from the shared global parameters θ, takes H *inner* steps on its own shard with its own
inner optimizer (AdamW in the paper: the workload's ``optimizer``), and the workers then
average their **pseudo-gradients** Δ_r = θ − θ_r; an *outer* optimizer (SGD with Nesterov
momentum, lr 0.7, momentum 0.9 in the paper) steps θ with that average as its gradient::

    θ_r <- θ;  θ_r <- InnerOpt(θ_r, grad f_r(θ_r))        (H times, no communication)
    Δ   <- (1/p) sum_r (θ − θ_r)                           (one all-reduce per round)
    θ   <- OuterOpt(θ, Δ)                                  (Nesterov SGD)

With outer lr 1 and no momentum, θ − Δ is the mean of the workers' models: DiLoCo is then
local SGD (:mod:`distlab.communication_efficient.local_sgd`, period H) with the same inner
optimizer. The inner optimizer's state (Adam's moments) stays on its worker and is **kept**
from round to round, as in the paper (only the parameters are reset to θ); the outer
optimizer's momentum is the same on every rank, since every rank steps the same θ with the
same Δ. Δ is put in the ``.grad`` of θ and averaged by
:func:`distlab.data_parallel.ddp.average_gradients`, the one averaging of distlab.

Shards and minibatches are local SGD's (:mod:`~distlab.communication_efficient.local_training`):
each rank draws ``batch_size / world_size`` examples of its own shard per inner step, so
``workload.num_steps`` inner steps consume as many examples as ``num_steps`` steps of DDP.

Communication (alpha-beta model, n parameters of 4 bytes, p ranks): one ring all-reduce of
4n bytes per H inner steps, ``2(p-1) alpha + 2(p-1)/p·4n beta``: H times fewer bytes than
DDP's all-reduce of the gradients at every step. The streaming variant, which spreads
that all-reduce over the round, is :mod:`distlab.communication_efficient.streaming_diloco`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require
from distlab.communication_efficient.local_training import (SHARDS, assign, check_batch,
                                                            check_split, check_workload,
                                                            evaluate, flat, one_thread,
                                                            problem, rank_and_size,
                                                            sample_batches, with_data)
from distlab.data_parallel.ddp import average_gradients
from distlab.metrics import report
from distlab.problems.workloads import Workload

WORKLOAD = Workload(model="mlp", hidden=32, depth=1, batch_size=32, lr=0.01,
                    optimizer_name="adamw", num_steps=200)
"""The digits MLP of lab 06, trained by AdamW at lr 0.01 (the paper's inner optimizer)."""


@dataclass(frozen=True)
class DiLoCoConfig:
    """DiLoCo of a workload: ``workload.num_steps`` inner steps per worker, in rounds of
    ``inner_steps`` (it must divide), one outer step per round."""
    workload: Workload = field(default_factory=lambda: WORKLOAD)
    """What is trained (an ``"mlp"`` workload) and its inner optimizer
    (``workload.optimizer``: AdamW by default, as in the paper)."""
    world_size: int = 2
    """Workers (ranks), each with its own shard, 1 to 64."""
    inner_steps: int = 20
    """H: inner steps per round, 1 to 10,000 (the paper: 500)."""
    outer_lr: float = 0.7
    """The outer SGD's learning rate, in (0, 10] (the paper: 0.7)."""
    outer_momentum: float = 0.9
    """The outer SGD's Nesterov momentum, in [0, 1) (the paper: 0.9; 0: plain SGD)."""
    shards: str = "iid"
    """``"iid"`` (random shards) or ``"label_skewed"`` (each rank sees few classes)."""
    classes_per_rank: int = 2
    """Labels per rank for ``"label_skewed"`` shards, 1 to 10."""

    def __post_init__(self):
        for name, lo, hi in (("world_size", 1, launcher.MAX_WORLD_SIZE),
                             ("inner_steps", 1, 10_000), ("classes_per_rank", 1, 10)):
            v = getattr(self, name)
            require(self, name, is_int(v) and lo <= v <= hi, f"integers {lo}..{hi}")
        require(self, "outer_lr", is_number(self.outer_lr) and 0 < self.outer_lr <= 10,
                "(0, 10]")
        m = self.outer_momentum
        require(self, "outer_momentum", is_number(m) and 0 <= m < 1, "a number in [0, 1)")
        require(self, "shards", self.shards in SHARDS, f"one of {SHARDS}")
        check_workload(self)
        check_split(self, "world_size", "classes_per_rank")
        check_batch(self, self.world_size, "world_size")
        steps = self.workload.num_steps
        require(self, "inner_steps", steps % self.inner_steps == 0,
                f"a divisor of workload.num_steps={steps} (whole rounds of H inner steps)")

    @property
    def num_rounds(self) -> int:
        """Outer steps: ``workload.num_steps / inner_steps``."""
        return self.workload.num_steps // self.inner_steps


def train(config: DiLoCoConfig, group=None, *, record=report) -> dict:
    """The worker: DiLoCo on this rank; call it on every rank of ``group``.

    Records, after every inner step, ``step``, ``bytes_sent`` (cumulative, from the ledger)
    and ``outer_step`` (outer steps so far); after each outer step also ``loss`` and
    ``accuracy`` of the global model θ (rank 0 only).

    Returns:
        ``{"loss", "accuracy"}`` of the final θ, ``"params"`` θ flattened (the same on every
        rank), ``"history"`` the rows ``{step, outer_step, loss, bytes_sent}`` at step 0 and
        after each outer step, and ``"bytes_per_step"`` this rank's bytes sent in each step.
    """
    rank, p = rank_and_size(config, group)
    workload = config.workload
    data, shards, model = problem(config, p, config.classes_per_rank, launcher.device())
    params = list(model.parameters())
    global_model = workload.build_model().to(data.X.device)     # θ, stepped by the outer SGD
    outer_params = list(global_model.parameters())
    inner, outer = workload.optimizer(params), outer_optimizer(config, outer_params)
    batches = sample_batches(shards[rank], workload.batch_size // p,
                             seed=workload.seed * 1000 + rank + 1)
    start = comm.ledger().totals()["bytes_sent"]     # the ledger belongs to the process
    history = [history_row(0, 0, evaluate(global_model, data, workload.loss), 0)]
    bytes_per_step, sent = [], 0
    for step in range(1, workload.num_steps + 1):
        inner_step(model, inner, data, next(batches), workload.loss)
        values = {}
        if step % config.inner_steps == 0:
            for theta, w in zip(outer_params, params):         # Δ_r = θ − θ_r
                theta.grad = theta.detach() - w.detach()
            average_gradients(outer_params, group)             # Δ: the one all-reduce
            outer.step()
            assign(params, flat(outer_params))                 # every worker restarts at θ
            values = evaluate(global_model, data, workload.loss)
        now = comm.ledger().totals()["bytes_sent"] - start
        bytes_per_step.append(now - sent)
        sent, outer_step = now, step // config.inner_steps
        if values:
            history.append(history_row(step, outer_step, values, sent))
        record(step=step, bytes_sent=sent, outer_step=outer_step,
               **(values if rank == 0 else {}))
    return {**evaluate(global_model, data, workload.loss), "params": flat(outer_params).tolist(),
            "history": history, "bytes_per_step": bytes_per_step}


def reference(config: DiLoCoConfig) -> dict:
    """One process plays every worker: the same shards, batches, inner and outer steps.

    Returns what :func:`train` returns on rank 0, ``bytes_per_step`` aside."""
    workload = config.workload
    with one_thread():
        data, shards, global_model = problem(config, config.world_size, config.classes_per_rank)
        outer_params = list(global_model.parameters())
        outer = outer_optimizer(config, outer_params)
        workers = [Worker.build(workload, shard, r, config.world_size)
                   for r, shard in enumerate(shards)]
        history = [history_row(0, 0, evaluate(global_model, data, workload.loss), 0)]
        for step in range(1, workload.num_steps + 1):
            for w in workers:
                w.step(data, workload.loss)
            if step % config.inner_steps == 0:
                deltas = torch.stack([flat(outer_params) - flat(w.params) for w in workers])
                assign_grads(outer_params, deltas.mean(0))     # (n,): the averaged Δ
                outer.step()
                for w in workers:
                    assign(w.params, flat(outer_params))
                history.append(history_row(step, step // config.inner_steps,
                                           evaluate(global_model, data, workload.loss),
                                           None))
        return {**evaluate(global_model, data, workload.loss),
                "params": flat(outer_params).tolist(), "history": history}


def start(config: DiLoCoConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes and return the
    :class:`~distlab.Run` at once; ``launch`` goes to :func:`distlab.launcher.start`."""
    return launcher.start(train, config.world_size, with_data(config), **launch)


def run(config: DiLoCoConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def table(result: dict, method: str):
    """A result's ``history`` as a tidy DataFrame with columns ``method, step, outer_step,
    loss, bytes_sent``: one row per outer step, to overlay methods at equal bytes.

    Example: ``table(run(DiLoCoConfig())[0], "DiLoCo")``."""
    import pandas as pd      # here: pandas is half a second of `import distlab`
    df = pd.DataFrame.from_records(result["history"])
    df.insert(0, "method", method)
    return df[["method", "step", "outer_step", "loss", "bytes_sent"]]


# -- helpers (shared with streaming DiLoCo) ------------------------------------------------

def outer_optimizer(config, params) -> torch.optim.SGD:
    """The outer optimizer: SGD at ``outer_lr`` with Nesterov momentum ``outer_momentum``
    (plain SGD when it is 0: torch's Nesterov needs a momentum)."""
    m = config.outer_momentum
    return torch.optim.SGD(params, lr=config.outer_lr, momentum=m, nesterov=m > 0)


def inner_step(model, optimizer, data, idx, loss_fn) -> None:
    """One inner step of a worker on the examples ``idx`` of its shard."""
    optimizer.zero_grad()
    loss_fn(model(data.X[idx]), data.y[idx]).backward()
    optimizer.step()


def assign_grads(params, vec: torch.Tensor) -> None:
    """Put the flat ``vec`` in the parameters' ``.grad`` (copies)."""
    for w, part in zip(params, vec.split([w.numel() for w in params])):
        w.grad = part.view_as(w).clone()


def history_row(step: int, outer_step: int, values: dict, bytes_sent) -> dict:
    return {"step": step, "outer_step": outer_step, "loss": values["loss"],
            "bytes_sent": bytes_sent}


@dataclass
class Worker:
    """One simulated worker of a single-process reference: its model, inner optimizer and
    minibatch stream (the stream :func:`train` draws on rank ``rank``)."""
    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    batches: object

    @classmethod
    def build(cls, workload: Workload, shard, rank: int, world_size: int) -> "Worker":
        model = workload.build_model()
        params = list(model.parameters())
        return cls(model, params, workload.optimizer(params),
                   sample_batches(shard, workload.batch_size // world_size,
                                  seed=workload.seed * 1000 + rank + 1))

    def step(self, data, loss_fn) -> None:
        inner_step(self.model, self.optimizer, data, next(self.batches), loss_fn)


__all__ = ["DiLoCoConfig", "WORKLOAD", "train", "reference", "start", "run", "table"]
