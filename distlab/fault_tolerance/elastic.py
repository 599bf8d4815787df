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

The job trains with a fixed *global* batch whose examples are dealt to the ranks, and
averages the gradients of each rank's share of the global batch's mean loss. Its result
therefore does not depend on the number of ranks (up to float rounding), which is what
makes shrinking the world harmless for the optimization: :func:`reference` is the same
training on one process. Cost per step: one all-reduce of the gradients,
``2·alpha·log p + 2·(p-1)/p·n·beta`` (ring), as for :mod:`distlab.data_parallel.ddp`, plus
one of the loss for the curve (``2·alpha·log p``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, is_number, require
from distlab.data_parallel.ddp import average_gradients
from distlab.data_parallel.sync_sgd import TRAIN_SIZES, build_task
from distlab.fault_tolerance import checkpoint
from distlab.fault_tolerance.agent import ElasticConfig, ElasticRun
from distlab.fault_tolerance.faults import Fault
from distlab.metrics import report
from distlab.problems import data
from distlab.sharding.zero import ShardedOptimizer

ALGORITHMS = ("sync", "zero")


@dataclass(frozen=True)
class TrainConfig:
    """A checkpointed synchronous training job that can be killed and resumed."""

    checkpoint_dir: str
    """Folder for the checkpoints, shared by the ranks (``""``: no checkpoints)."""
    algorithm: str = "sync"
    """``"sync"``: a replicated ``torch.optim.SGD``; ``"zero"``: one sharded over the ranks."""
    task: str = "linear"
    """What to train, as in :func:`distlab.data_parallel.sync_sgd.build_task`: ``"linear"`` or ``"digits"``."""
    num_steps: int = 40
    """Total optimizer steps of the job, across restarts."""
    batch_size: int = 64
    """Global batch size, dealt to the ranks (so the result does not depend on their number)."""
    lr: float = 0.05
    """Learning rate of SGD with momentum."""
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
    seed: int = 0
    """Seed of the data, the model and the RNGs."""
    step_time: float = 0.0
    """Extra seconds of "compute" per step, so lost work is visible on a fast toy problem."""

    def __post_init__(self):
        require(self, "checkpoint_dir", isinstance(self.checkpoint_dir, str), "a folder name")
        require(self, "algorithm", self.algorithm in ALGORITHMS, f"one of {ALGORITHMS}")
        require(self, "task", self.task in TRAIN_SIZES, f"one of {sorted(TRAIN_SIZES)}")
        n = TRAIN_SIZES.get(self.task)
        require(self, "batch_size", is_int(self.batch_size) and 1 <= self.batch_size <= n,
                f"an int in 1..{n} (the examples of task={self.task!r})")
        for name, low in (("num_steps", 1), ("checkpoint_every", 0), ("keep", 1), ("seed", 0)):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= low, f"an int >= {low}")
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
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
    task = build_task(config.task, config.seed)
    ds, model = task.dataset, task.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config, group)
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    start_step, history = _resume(config, model, optimizer, rank, world_size, attempt)

    for step in range(start_step, config.num_steps):
        _fail_if_due(config, rank, step, "step", attempt)
        t = time.perf_counter()
        batch = global_batch(len(ds.y), step, config.batch_size, config.seed)
        mine = batch[data.shard_indices(len(batch), rank, world_size, shuffle=False)]
        X = ds.X[mine]
        if config.noise:
            X = X + config.noise * torch.randn_like(X)
        # My examples' share of the global batch's mean loss: the shares add up to it, so
        # world_size * share averaged over the ranks is the global mean, however the batch
        # was dealt (a rank with no example has no gradient, which counts as zeros).
        share = task.loss_fn(model(X), ds.y[mine], reduction="sum") / len(batch)
        optimizer.zero_grad()
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
            _save(config, done, model, optimizer, history, len(ds.y), group, attempt)
    return {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
            "history": history, "start_step": start_step}


def reference(config: TrainConfig) -> dict:
    """The same job on one process without a group: ``torch.optim.SGD`` with momentum on the
    mean loss of each global batch, with no checkpoint and no fault.

    :func:`train` equals it on any number of ranks to float rounding (the gradient is
    summed in another order), and a resumed run equals it too. With ``noise > 0`` every
    rank draws its own noise, so only a one-rank run draws the same as this one.

    Returns:
        ``{"params": the final flat parameters, "history": [(step, loss)]}``.
    """
    task = build_task(config.task, config.seed)
    model, ds = task.model, task.dataset
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    torch.manual_seed(config.seed)
    history = []
    for step in range(config.num_steps):
        idx = global_batch(len(ds.y), step, config.batch_size, config.seed)
        X = ds.X[idx]
        if config.noise:
            X = X + config.noise * torch.randn_like(X)
        loss = task.loss_fn(model(X), ds.y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((step, loss.item()))
    return {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
            "history": history}


def global_batch(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The examples of ``step``: the sampler position is a pure function of the step, so a
    resumed run sees exactly the batches the uninterrupted one would have."""
    for name, value, low in (("n", n, 1), ("step", step, 0), ("batch_size", batch_size, 1),
                             ("seed", seed, 0)):
        if not (is_int(value) and value >= low):
            raise ValueError(f"{name}={value!r} is out of range; allowed an int >= {low}")
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = data.shard_indices(n, 0, 1, epoch=epoch, seed=seed)   # the epoch's permutation
    return order[k * batch_size:(k + 1) * batch_size]


# ----------------------------------------------------------------------------------------
# Helpers of train: the optimizer, the resume, the save, the fault.
# ----------------------------------------------------------------------------------------

def _optimizer(params, config: TrainConfig, group):
    if config.algorithm == "zero":   # gradients arrive averaged: ZeRO stage 1's step alone
        return ShardedOptimizer(params, torch.optim.SGD, group=group, lr=config.lr,
                                momentum=config.momentum)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


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


def _save(config: TrainConfig, done: int, model, optimizer, history: list, n: int, group,
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
             "sampler": {"epoch": done // max(1, n // config.batch_size), "step": done}}
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
    ap.add_argument("--task", default="linear")
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
    config = TrainConfig(args.checkpoint_dir, algorithm=args.algorithm, task=args.task,
                         num_steps=args.num_steps, checkpoint_every=args.checkpoint_every,
                         fault=fault)
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
