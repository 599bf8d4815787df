"""Elastic training: when a rank dies, restart from the last checkpoint with the survivors.

Synchronous data parallelism has no slack: every step's all-reduce needs every rank, so
one dead machine stops the whole job (the launcher turns that into a
:class:`~distlab.WorkerError` at once, never a hang). Recovery is therefore a restart:

1. **failure**: a rank dies (see :mod:`distlab.fault_tolerance.faults`);
2. **detection**: the agent notices (here: the launcher sees the process exit; across
   machines a heartbeat or a collective's timeout);
3. **restart**: the agent starts a new job on the ranks that are left, ``world_size - 1``;
4. **resume**: every new rank loads the latest checkpoint (:mod:`distlab.fault_tolerance.checkpoint`) and
   continues from its step. The steps since that checkpoint are done again: *lost work*.

This is what torchrun's elastic agent does (``torchrun --nnodes=MIN:MAX --max-restarts=K``,
PyTorch's "Torch Distributed Elastic"): :func:`run_elastic` is the same loop around
:func:`distlab.start`. The worker function, :func:`resumable_worker`, is also what a
restarted torchrun worker runs: ``python -m distlab.fault_tolerance.elastic --help``.

The job trains with a fixed *global* batch whose examples are dealt to the ranks, with the
gradient summed across ranks and divided by the global batch size. Its result therefore does
not depend on the number of ranks (up to float rounding), which is what makes shrinking
the world harmless for the optimization. Cost per step: one all-reduce of the gradients,
``2·alpha·log p + 2·(p-1)/p·n·beta`` (ring), as for :mod:`distlab.data_parallel.ddp`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import threading
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from distlab import comm
from distlab.fault_tolerance import checkpoint
from distlab.problems import data
from distlab.checks import is_int, is_number, require
from distlab.fault_tolerance.faults import Fault
from distlab.launcher import WorkerError, start
from distlab.metrics import report
from distlab.data_parallel.sync_sgd import SGD, TRAIN_SIZES, build_task, load_dataset

ALGORITHMS = ("sync", "zero")


@dataclass(frozen=True)
class TrainConfig:
    """A checkpointed synchronous training job that can be killed and resumed."""

    checkpoint_dir: str
    """Folder for the checkpoints, shared by the ranks (``""``: no checkpoints)."""
    algorithm: str = "sync"
    """``"sync"``: all-reduce then a replicated optimizer; ``"zero"``: a sharded optimizer."""
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
        require(self, "algorithm", self.algorithm in ALGORITHMS, f"one of {ALGORITHMS}")
        require(self, "task", self.task in TRAIN_SIZES, f"one of {sorted(TRAIN_SIZES)}")
        for name, low in (("num_steps", 1), ("batch_size", 1), ("checkpoint_every", 0),
                          ("keep", 1), ("seed", 0)):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= low, f"an int >= {low}")
        for name in ("lr", "noise", "step_time"):
            v = getattr(self, name)
            require(self, name, is_number(v) and v >= 0, "a number >= 0")
        require(self, "momentum", is_number(self.momentum) and 0 <= self.momentum < 1,
                "a number in [0, 1)")
        if self.fault is not None and not isinstance(self.fault, Fault):
            raise TypeError(f"fault must be a distlab.fault_tolerance.faults.Fault or None, got {self.fault!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every > 0 needs a checkpoint_dir")


def global_batch(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The examples of ``step``: the sampler position is a pure function of the step."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = data.shard_indices(n, 0, 1, epoch=epoch, seed=seed)   # the epoch's permutation
    return order[k * batch_size:(k + 1) * batch_size]


class MomentumSGD(SGD):
    """:class:`distlab.data_parallel.sync_sgd.SGD` (no TorchDynamo import, so workers restart fast) with the
    ``state_dict``/``load_state_dict`` of a torch optimizer: its momentum buffers."""

    def __init__(self, params, lr: float, momentum: float):
        super().__init__(params, momentum)
        self.lr = lr

    def step(self) -> None:
        super().step(self.lr)

    def state_dict(self) -> dict:
        return {"momentum_buffers": [None if b is None else b.clone() for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = [None if b is None else b.clone() for b in state["momentum_buffers"]]


def _optimizer(model, config: TrainConfig, group):
    if config.algorithm == "zero":
        from distlab.sharding.zero import ShardedOptimizer
        return ShardedOptimizer(model.parameters(), torch.optim.SGD, group=group,
                                lr=config.lr, momentum=config.momentum)
    return MomentumSGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def _optimizer_state(optimizer, config: TrainConfig, group):
    if config.algorithm == "zero":      # collective: the shards meet on rank 0
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if dist.get_rank(group) == 0 else None
    return optimizer.state_dict()


def resumable_worker(config: TrainConfig, attempt: int = 0, group=None,
                     dataset: data.Dataset | None = None) -> dict:
    """Train ``config`` on this rank, resuming from the latest checkpoint if there is one.

    Reports ``loss`` every step, and ``event`` records (``"resume"``, ``"failure"``,
    ``"checkpoint"``) that the elastic agent turns into a timeline.

    Args:
        config: the job.
        attempt: 0 for the first run, k for the k-th restart (a fault fires in one attempt).
        group: the process group (None: the world).
        dataset: the task's data, from :func:`distlab.data_parallel.sync_sgd.load_dataset` (sending it once
            saves every worker a second of loading scikit-learn); None loads it here.

    Returns:
        ``{"params": the final flat parameters, "history": [(step, loss)], "start_step"}``.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    task = build_task(config.task, config.seed, dataset)
    ds, model, loss_fn = task.dataset, task.model, task.loss_fn
    optimizer = _optimizer(model, config, group)
    params = [p for p in model.parameters() if p.requires_grad]
    start_step, history = 0, []
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)

    ckpt = checkpoint.load_latest(config.checkpoint_dir, rank) if config.checkpoint_dir else None
    if ckpt is not None:
        model.load_state_dict(ckpt.state["model"])
        optimizer.load_state_dict(ckpt.state["optimizer"])   # a sharded one reshards here
        start_step, history = ckpt.step, list(ckpt.state["history"])
        if ckpt.rank_state is not None and ckpt.world_size == world_size:
            checkpoint.restore_rng(ckpt.rank_state["rng"])     # same ranks: exact resume
    if ckpt is not None or attempt > 0:   # a restart without a checkpoint starts over
        report(step=start_step, event="resume", world_size=world_size)

    for step in range(start_step, config.num_steps):
        if config.fault is not None and config.fault.fires(rank, step, "step", attempt):
            report(step=step, event="failure")
            config.fault.inject(rank, step, "step", attempt)
        t = time.perf_counter()
        batch = global_batch(len(ds.y), step, config.batch_size, config.seed)
        mine = batch[data.shard_indices(len(batch), rank, world_size, shuffle=False)]
        X = ds.X[mine]
        if config.noise:
            X = X + config.noise * torch.randn_like(X)
        # Sum over my examples / global batch: the all-reduced sum is the global mean.
        loss = loss_fn(model(X), ds.y[mine], reduction="sum") / len(batch)
        optimizer.zero_grad()
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
        comm.all_reduce(flat, group=group)   # one message: gradients and the loss
        offset = 0
        for p in params:                     # the summed gradient back into .grad
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        optimizer.step()
        if config.step_time:
            time.sleep(max(0.0, config.step_time - (time.perf_counter() - t)))
        history.append((step, flat[-1].item()))
        report(step=step, loss=flat[-1].item())

        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            t = time.perf_counter()
            state = {"model": model.state_dict(), "history": history,
                     "optimizer": _optimizer_state(optimizer, config, group),
                     "sampler": {"epoch": done // max(1, len(ds.y) // config.batch_size),
                                 "step": done}}

            def halfway(step=done):
                if config.fault is not None and config.fault.fires(rank, step, "save", attempt):
                    report(step=step, event="failure")
                    config.fault.inject(rank, step, "save", attempt)
            checkpoint.save(config.checkpoint_dir, done, state if rank == 0 else None,
                            {"rng": checkpoint.capture_rng()}, group=group, keep=config.keep,
                            on_half_written=halfway)
            report(step=done, event="checkpoint", checkpoint_time=time.perf_counter() - t)
    return {"params": torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
            "history": history, "start_step": start_step}


# ----------------------------------------------------------------------------------------
# The elastic agent.
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ElasticConfig:
    """How the agent restarts a failed job (torchrun: ``--nnodes=MIN:MAX --max-restarts``)."""

    world_size: int = 2
    """Ranks of the first attempt."""
    min_world_size: int = 1
    """Give up rather than run on fewer ranks than this."""
    max_restarts: int = 3
    """Give up after this many restarts."""
    timeout: float = 60.0
    """Seconds an attempt may run; a hung rank is detected when it expires."""
    shrink: bool = True
    """Restart on the survivors (``world_size - 1``); False: on as many ranks as before."""

    def __post_init__(self):
        from distlab.launcher import MAX_WORLD_SIZE
        for name, low in (("world_size", 1), ("min_world_size", 1), ("max_restarts", 0)):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= low, f"an int >= {low}")
        if not self.min_world_size <= self.world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"world_size={self.world_size} must be in [min_world_size="
                             f"{self.min_world_size}, {MAX_WORLD_SIZE}]")
        require(self, "timeout", is_number(self.timeout) and self.timeout > 0, "seconds > 0")


class ElasticRun:
    """An elastic job in progress: a background agent that restarts it after each failure.

    It answers like a :class:`distlab.Run` (``done``, ``wait``, ``result``, ``stop``,
    ``metrics``, ``error``, ``world_size``), so a :class:`~distlab.ui.panel.RunPanel` drives
    it. Record times are seconds since the *job* started, across attempts; every record
    carries its ``attempt`` and ``world_size``. :attr:`events` is the timeline.
    """

    def __init__(self, config: TrainConfig, elastic: ElasticConfig, on_metrics=None,
                 on_output=None, name: str = "elastic"):
        if not isinstance(config, TrainConfig) or not isinstance(elastic, ElasticConfig):
            raise TypeError("ElasticRun needs a TrainConfig and an ElasticConfig")
        self.config, self.elastic, self.name = config, elastic, name
        self.world_size = elastic.world_size
        self.events: list[dict] = []
        self._records: list[dict] = []
        self._on_metrics, self._on_output = on_metrics, on_output
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._results, self.error, self._current, self._stopped = None, None, None, False
        self.t0 = time.time()
        self._thread = threading.Thread(target=self._agent, daemon=True, name="distlab-elastic")
        self._thread.start()

    def _event(self, event: str, **info) -> None:
        with self._lock:
            self.events.append({"event": event, "time": time.time() - self.t0, **info})

    def _relay(self, run_t0: float, attempt: int, world_size: int):
        def on_metrics(records):
            out = []
            for r in records:
                r = {**r, "time": r["time"] + run_t0 - self.t0, "attempt": attempt,
                     "world_size": world_size}
                if "event" in r:
                    with self._lock:
                        self.events.append(dict(r))
                out.append(r)
            with self._lock:
                self._records.extend(out)
            if self._on_metrics is not None:
                self._on_metrics(out)
        return on_metrics

    def _agent(self):
        world_size = self.elastic.world_size
        try:
            dataset = load_dataset(self.config.task)    # once, here, not in every worker
            for attempt in range(self.elastic.max_restarts + 1):
                if self._stopped:
                    self.error = WorkerError(None, "stopped by the user")
                    return
                if attempt:
                    self._event("restart", attempt=attempt, world_size=world_size)
                t_start = time.time()
                run = start(resumable_worker, world_size, self.config, attempt,
                            dataset=dataset, timeout=self.elastic.timeout, on_output=self._on_output,
                            on_metrics=self._relay(t_start, attempt, world_size))
                self._current = run
                run.wait()
                if run.error is None:
                    self._results = run.result()
                    self._event("finish", attempt=attempt, world_size=world_size)
                    return
                if self._stopped or not isinstance(run.error, WorkerError):
                    self.error = run.error
                    return
                self._event("detection", attempt=attempt, world_size=world_size,
                            rank=run.error.rank, reason=run.error.reason)
                if self.elastic.shrink:
                    world_size -= 1
                if world_size < self.elastic.min_world_size:
                    self.error = WorkerError(run.error.rank, f"{run.error.reason}; only "
                                             f"{world_size} rank(s) left, below min_world_size="
                                             f"{self.elastic.min_world_size}")
                    return
            self.error = WorkerError(None, f"gave up after max_restarts="
                                     f"{self.elastic.max_restarts} restarts")
        except BaseException as e:  # noqa: BLE001 - the caller must hear of any agent bug
            self.error = e
        finally:
            self._done.set()

    # -- what distlab.Run offers ------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def stop(self, reason: str = "stopped by the user") -> None:
        """Stop the current attempt and restart no more."""
        self._stopped = True
        if self._current is not None:
            self._current.stop(reason)
        self._done.wait(10)

    def result(self) -> list:
        """Wait; return the last attempt's per-rank results, or raise what ended the job."""
        while not self._done.wait(0.05):
            pass
        if self.error is not None:
            raise self.error
        return self._results

    def records(self) -> list[dict]:
        with self._lock:
            return list(self._records)

    def metrics(self) -> pd.DataFrame:
        """All attempts' records as a tidy frame (``time`` on the job's clock)."""
        from distlab.metrics import to_frame
        return to_frame(self.records(), run=self.name)

    def timeline(self) -> pd.DataFrame:
        """The events (start of attempts, failure, detection, restart, resume, checkpoint)."""
        with self._lock:
            return pd.DataFrame(self.events)

    def summary(self) -> dict:
        """Lost work of the first failure: steps redone, and seconds from failure to resume."""
        ev = self.timeline()
        get = lambda name: ev[ev.event == name].iloc[0] if (ev.event == name).any() else None
        fail, resume = get("failure"), get("resume")
        ckpt = ev[ev.event == "checkpoint"]
        out = {"checkpoint_time": float(ckpt.groupby("step").checkpoint_time.max().sum())
               if "checkpoint_time" in ckpt else 0.0, "restarts": int((ev.event == "restart").sum())}
        if fail is not None and resume is not None:
            out.update(failure_step=int(fail.step), resume_step=int(resume.step),
                       lost_steps=int(fail.step - resume.step),
                       downtime=float(resume.time - fail.time))
        return out

    def __repr__(self):
        return f"<distlab.ElasticRun {self.name!r} {'done' if self.done else 'running'}>"


def start_elastic(config: TrainConfig, elastic: ElasticConfig | None = None, on_metrics=None,
                  on_output=None, name: str = "elastic") -> ElasticRun:
    """Start an elastic job and return at once (the non-blocking form of :func:`run_elastic`)."""
    return ElasticRun(config, elastic or ElasticConfig(), on_metrics, on_output, name)


def run_elastic(config: TrainConfig, elastic: ElasticConfig | None = None,
                **kwargs) -> ElasticRun:
    """Run an elastic job to the end: restart from the latest checkpoint after each failure.

    Returns the finished :class:`ElasticRun` (``.result()``, ``.metrics()``, ``.timeline()``,
    ``.summary()``). Raises :class:`~distlab.WorkerError` if it gives up.
    """
    run = start_elastic(config, elastic, **kwargs)
    run.result()
    return run


# ----------------------------------------------------------------------------------------
# Under torchrun: ``torchrun --nproc-per-node=2 --max-restarts=3 -m distlab.fault_tolerance.elastic ...``
# ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """Run :func:`resumable_worker` as a torchrun worker; a restarted worker resumes.

    torchrun's agent restarts *every* worker when one fails (up to ``--max-restarts``) and
    tells them which attempt this is in ``TORCHELASTIC_RESTART_COUNT``; the workers find
    the latest checkpoint in ``--checkpoint-dir`` and continue from it.
    """
    from distlab.launcher import init_from_env
    ap = argparse.ArgumentParser(prog="python -m distlab.fault_tolerance.elastic", description=main.__doc__)
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
        result = resumable_worker(config, attempt)
        if dist.get_rank() == 0:
            print(f"distlab.fault_tolerance.elastic: attempt {attempt} resumed at step {result['start_step']}, "
                  f"final loss {result['history'][-1][1]:.6f}", flush=True)
            if args.out:
                torch.save({**result, "attempt": attempt}, args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
