"""Elastic training: when a rank dies, restart from the last checkpoint with the survivors.

Synchronous data parallelism has no slack: every step's all-reduce needs every rank, so
one dead machine stops the whole job (the launcher turns that into a
:class:`~distlab.WorkerError` at once, never a hang). Recovery is therefore a restart:

1. **failure**: a rank dies (see :mod:`distlab.fault_tolerance.faults`);
2. **detection**: the agent notices (here: the launcher sees the process exit; across
   machines a heartbeat or a collective's timeout);
3. **restart**: the agent starts a new job on the ranks that are left, ``world_size - 1``
   (:mod:`distlab.fault_tolerance.agent`);
4. **resume**: every new rank loads the latest checkpoint
   (:mod:`distlab.fault_tolerance.checkpoint`) and continues from its step. The steps since
   that checkpoint are done again: *lost work*.

This is what torchrun's elastic agent does (``torchrun --nnodes=MIN:MAX --max-restarts=K``,
PyTorch's "Torch Distributed Elastic"): :func:`start` is the same loop around
:func:`distlab.start`. The worker, :func:`train`, is also what a restarted torchrun worker
runs: ``python -m distlab.fault_tolerance.elastic --help``.

What is trained is the config's :class:`~distlab.problems.workloads.Workload`. **How the
global batch is split:** step ``s`` trains on the workload's ``s``-th global batch of
``workload.batch_size`` examples (:meth:`~distlab.problems.workloads.Workload.batches`, a
pure function of the step, so a resumed run sees exactly the batches the uninterrupted one
would have); its examples are dealt to the ``p`` ranks in turn (rank ``r`` takes examples
``r, r + p, ...``: any batch size and any number of ranks, a rank dealt none contributing a
zero gradient), and the ranks average the gradients of ``p`` times their share of the
global batch's mean loss. The result therefore does not depend on the number of ranks (up
to float rounding), which is what makes shrinking the world harmless for the
optimization: :func:`reference` is the same training on one process.

Cost per step: one all-reduce of the gradients, ``2·alpha·log p + 2·(p-1)/p·n·beta``
(ring), as for :mod:`distlab.data_parallel.ddp`, plus one of the loss for the curve
(``2·alpha·log p``).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import random
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, is_number, require
from distlab.data_parallel.ddp import average_gradients
from distlab.fault_tolerance import checkpoint
from distlab.fault_tolerance.agent import ElasticConfig, ElasticRun
from distlab.fault_tolerance.faults import Fault
from distlab.metrics import report
from distlab.problems import data
from distlab.problems.workloads import Workload
from distlab.sharding.zero import ShardedOptimizer
from distlab.worker import device

ALGORITHMS = ("sync", "zero")
MODELS = ("linear", "mlp")
"""The workloads a job trains: rows of a data set."""
WORKLOAD = Workload(model="linear", lr=0.05, num_steps=40)
"""The default job: least squares, a global batch of 64, 40 steps of SGD at lr 0.05."""


@dataclass(frozen=True)
class TrainConfig:
    """A checkpointed synchronous training job that can be killed and resumed."""

    checkpoint_dir: str
    """Folder for the checkpoints, shared by the ranks (``""``: no checkpoints)."""
    algorithm: str = "sync"
    """``"sync"``: a replicated ``torch.optim.SGD``; ``"zero"``: one sharded over the ranks."""
    workload: Workload = WORKLOAD
    """What is trained (``model`` "linear" or "mlp"); ``num_steps`` counts the job's steps
    across restarts, ``batch_size`` is the global batch dealt to the ranks (so the result does
    not depend on their number), ``lr`` the rate of SGD with momentum, ``seed`` seeds the
    data, the model and every rank's RNGs."""
    momentum: float = 0.9
    """Momentum: optimizer state that a checkpoint must keep for an exact resume."""
    checkpoint_every: int = 10
    """Save every this many steps (0: never)."""
    keep: int = 2
    """How many checkpoints to keep (the newest and ``keep - 1`` older ones)."""
    noise: float = 0.0
    """Std of Gaussian input noise drawn from each rank's RNG (0: none): makes RNG state matter."""
    fault: Fault | None = None
    """The failure to inject, or None."""
    step_time: float = 0.0
    """Extra seconds of "compute" per step, so lost work is visible on a fast toy problem."""

    def __post_init__(self):
        require(self, "checkpoint_dir", isinstance(self.checkpoint_dir, str), "a folder name")
        require(self, "algorithm", self.algorithm in ALGORITHMS, f"one of {ALGORITHMS}")
        require(self, "workload", isinstance(self.workload, Workload)
                and self.workload.model in MODELS,
                f"a distlab.problems.workloads.Workload with model in {MODELS}")
        for name, low in (("checkpoint_every", 0), ("keep", 1)):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= low, f"an int >= {low}")
        for name in ("noise", "step_time"):
            v = getattr(self, name)
            require(self, name, is_number(v) and v >= 0, "a number >= 0")
        require(self, "momentum", is_number(self.momentum) and 0 <= self.momentum < 1,
                "a number in [0, 1)")
        require(self, "fault", self.fault is None or isinstance(self.fault, Fault),
                "a distlab.fault_tolerance.faults.Fault or None")
        require(self, "checkpoint_every", not (self.checkpoint_every and not self.checkpoint_dir),
                "0 when there is no checkpoint_dir (checkpoint_every > 0 needs a checkpoint_dir)")


def start(config: TrainConfig, elastic: ElasticConfig | None = None, *, on_metrics=None,
          on_output=None, name: str = "elastic") -> ElasticRun:
    """Start an elastic job of :func:`train` and return at once: an :class:`ElasticRun`,
    which restarts the job from its latest checkpoint after each failure."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config = replace(config, workload=config.workload.loaded())   # loaded once, for every attempt
    return ElasticRun(train, config, elastic or ElasticConfig(), on_metrics, on_output, name)


def run(config: TrainConfig, elastic: ElasticConfig | None = None, **launch) -> ElasticRun:
    """Like :func:`start`, but wait for the end; return the finished :class:`ElasticRun`
    (``.result()``, ``.metrics()``, ``.timeline()``, ``.summary()``).

    Raises :class:`~distlab.WorkerError` if the agent gives up.
    """
    job = start(config, elastic, **launch)
    job.result()
    return job


def train(config: TrainConfig, group=None, *, attempt: int = 0) -> dict:
    """Train ``config`` on this rank, resuming from the latest checkpoint if there is one.

    Reports ``loss`` every step, and ``event`` records (``"resume"``, ``"failure"``,
    ``"checkpoint"``) that the elastic agent turns into a timeline.

    Args:
        config: the job.
        group: the process group (None: the world).
        attempt: 0 for the first run, k for the k-th restart (a fault fires in one attempt).

    Returns:
        ``{"params": the final flat parameters, "history": [(step, loss)], "start_step"}``.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    workload = config.workload.loaded()
    dev = device()                       # the CPU on gloo, this rank's GPU on NCCL
    model = workload.build_model().to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config, group)
    seed = workload.seed + rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    start_step, history = _resume(config, model, optimizer, rank, world_size, attempt)

    batches = itertools.islice(workload.batches(), start_step, None)
    for step, (X_all, y_all) in zip(range(start_step, workload.num_steps), batches):
        _fail_if_due(config, rank, step, "step", attempt)
        t = time.perf_counter()
        mine = data.shard_indices(len(y_all), rank, world_size, shuffle=False)   # dealt in turn
        X, y = X_all[mine].to(dev), y_all[mine].to(dev)
        if config.noise:
            X = X + config.noise * torch.randn_like(X)
        optimizer.zero_grad()
        # My examples' share of the global batch's mean loss: the shares add up to it, so
        # world_size * share averaged over the ranks is the global mean, however the batch
        # was dealt (a rank with no example has no gradient, which counts as zeros).
        share = torch.zeros((), device=dev)
        if len(y):
            share = workload.loss(model(X), y) * (len(y) / len(y_all))
            (share * world_size).backward()
        average_gradients(params, group)
        optimizer.step()
        loss = share.detach().clone()
        comm.all_reduce(loss, group=group)   # the global batch's loss, for the curve
        if config.step_time:
            time.sleep(max(0.0, config.step_time - (time.perf_counter() - t)))
        history.append((step, loss.item()))
        report(step=step, loss=loss.item())

        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            _save(config, done, model, optimizer, history, group, attempt)
    return {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu(),
            "history": history, "start_step": start_step}


def reference(config: TrainConfig) -> dict:
    """The same job on one process without a group: ``torch.optim.SGD`` with momentum on the
    mean loss of each of the workload's global batches, with no checkpoint and no fault.

    :func:`train` equals it on any number of ranks to float rounding (the gradient is
    summed in another order), and a resumed run equals it too. With ``noise > 0`` every
    rank draws its own noise, so only a one-rank run draws the same as this one.

    Returns:
        ``{"params": the final flat parameters, "history": [(step, loss)]}``.
    """
    workload = config.workload.loaded()
    model = workload.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.lr, momentum=config.momentum)
    torch.manual_seed(workload.seed)
    history = []
    for step, (X, y) in enumerate(workload.batches()):
        if config.noise:
            X = X + config.noise * torch.randn_like(X)
        loss = workload.loss(model(X), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((step, loss.item()))
    return {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
            "history": history}


# ----------------------------------------------------------------------------------------
# Helpers of train: the optimizer, the resume, the save, the fault.
# ----------------------------------------------------------------------------------------

def _optimizer(params, config: TrainConfig, group):
    if config.algorithm == "zero":   # gradients arrive averaged: ZeRO stage 1's step alone
        return ShardedOptimizer(params, torch.optim.SGD, group=group, lr=config.workload.lr,
                                momentum=config.momentum)
    return torch.optim.SGD(params, lr=config.workload.lr, momentum=config.momentum)


def _resume(config: TrainConfig, model, optimizer, rank: int, world_size: int,
            attempt: int) -> tuple[int, list]:
    """Load the latest checkpoint into ``model`` and ``optimizer``; return (step, history)."""
    ckpt = checkpoint.load_latest(config.checkpoint_dir, rank) if config.checkpoint_dir else None
    start_step, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt.state["model"])
        optimizer.load_state_dict(ckpt.state["optimizer"])   # momentum; ZeRO reshards here
        start_step, history = ckpt.step, list(ckpt.state["history"])
        if ckpt.rank_state is not None and ckpt.world_size == world_size:
            checkpoint.restore_rng(ckpt.rank_state["rng"])     # same ranks: exact resume
    if ckpt is not None or attempt > 0:   # a restart without a checkpoint starts over
        report(step=start_step, event="resume", world_size=world_size)
    return start_step, history


def _save(config: TrainConfig, done: int, model, optimizer, history: list, group,
          attempt: int) -> None:
    """Checkpoint after ``done`` steps (collective: every rank calls it)."""
    t = time.perf_counter()
    rank = dist.get_rank(group)
    if config.algorithm == "zero":      # collective: the shards meet on rank 0
        optimizer.consolidate_state_dict(to=0)
        optimizer_state = optimizer.state_dict() if rank == 0 else None
    else:
        optimizer_state = optimizer.state_dict()
    state = {"model": model.state_dict(), "optimizer": optimizer_state, "history": history,
             "sampler": {"step": done}}   # the data position: a batch is a function of its step
    checkpoint.save(config.checkpoint_dir, done, state if rank == 0 else None,
                    {"rng": checkpoint.capture_rng()}, group=group, keep=config.keep,
                    on_half_written=lambda: _fail_if_due(config, rank, done, "save", attempt))
    report(step=done, event="checkpoint", checkpoint_time=time.perf_counter() - t)


def _fail_if_due(config: TrainConfig, rank: int, step: int, where: str, attempt: int) -> None:
    # Report the failure first: a killed rank says nothing afterwards.
    if config.fault is not None and config.fault.fires(rank, step, where, attempt):
        report(step=step, event="failure")
        config.fault.inject(rank, step, where, attempt)


# ----------------------------------------------------------------------------------------
# Under torchrun: ``torchrun --nproc-per-node=2 --max-restarts=3 -m distlab.fault_tolerance.elastic ...``
# ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """Run :func:`train` as a torchrun worker; a restarted worker resumes.

    torchrun's agent restarts *every* worker when one fails (up to ``--max-restarts``) and
    tells them which attempt this is in ``TORCHELASTIC_RESTART_COUNT``; the workers find
    the latest checkpoint in ``--checkpoint-dir`` and continue from it.
    """
    from distlab.launcher import init_from_env
    ap = argparse.ArgumentParser(prog="python -m distlab.fault_tolerance.elastic",
                                 description=main.__doc__)
    ap.add_argument("--checkpoint-dir", required=True)
    ap.add_argument("--model", default="linear", choices=MODELS)
    ap.add_argument("--algorithm", default="sync")
    ap.add_argument("--num-steps", type=int, default=40)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--fault", default="", help="KIND:RANK:STEP, e.g. kill:1:25")
    ap.add_argument("--out", default="", help="rank 0 saves its result here (torch.save)")
    args = ap.parse_args(argv)
    fault = None
    if args.fault:
        kind, rank, step = args.fault.split(":")
        fault = Fault(kind, rank=int(rank), step=int(step))
    config = TrainConfig(args.checkpoint_dir, algorithm=args.algorithm,
                         workload=replace(WORKLOAD, model=args.model, num_steps=args.num_steps),
                         checkpoint_every=args.checkpoint_every, fault=fault)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The agent's store outlives a restart, and gloo would find the addresses of the
        # dead attempt's workers in it ("Connection refused"): give each attempt its own keys.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    else:
        init_from_env("gloo")
    try:
        result = train(config, attempt=attempt)
        if dist.get_rank() == 0:
            print(f"distlab.fault_tolerance.elastic: attempt {attempt} resumed at step "
                  f"{result['start_step']}, final loss {result['history'][-1][1]:.6f}", flush=True)
            if args.out:
                torch.save({**result, "attempt": attempt}, args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
