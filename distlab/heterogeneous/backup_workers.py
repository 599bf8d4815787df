"""Synchronous SGD with backup workers: each step keeps the first N - b gradients.

Chen, Pan, Monga, Bengio and Jozefowicz 2016, "Revisiting Distributed Synchronous SGD"
(arXiv 1604.00981, section 3): plain synchronous SGD waits, every step, for the slowest of
its N workers, and the slowest of N grows with N (a heavy tail of straggler times).
Asynchronous SGD never waits but applies stale gradients. The paper's middle way: run
N workers but aggregate only the first ``N - b`` gradients that arrive for the current
parameters and **drop** the ``b`` late ones (the *backup workers*). The step time becomes
the ``(N-b)``-th order statistic of the workers' times instead of the maximum, and every
applied gradient is fresh (staleness 0). ``b = 0`` is plain synchronous SGD.

The run: rank 0 is the server, ranks ``1 .. N`` the workers (worker ``w`` = rank ``w + 1``).

* The server sends every worker ``[GO, version] + x`` (the flat parameters). For version
  ``t`` it receives gradients from any worker, in order of arrival: one computed on ``t``
  is kept, one computed on an older version is dropped and its worker at once gets ``x_t``
  (a late worker computes on the newest parameters). At ``N - b`` kept gradients it applies
  their mean (summed in worker order, so the run is reproducible) with the workload's
  optimizer, records which workers were kept, and sends ``x_{t+1}`` to them.
* Worker ``w`` computes, on the parameters it received, the gradient of its minibatch of
  version ``t`` (:func:`distlab.asynchronous.ps_config.worker_batch`: ``batch_size``
  examples from its own shard, seeded by ``(w, t)``), takes its injected time
  (:func:`compute_time`) and sends ``[w, t, loss] + g``.

:func:`reference` replays the recorded kept sets on one process and must equal the run.
With a fixed straggler that is always among the b late ones, its shard's examples are never
used (the paper's random stragglers do not have that bias).

Communication per step (alpha-beta, P parameters of n bytes): the server receives at least
``N - b`` gradients and sends as many parameter vectors, ``2(N-b)(alpha + n beta)`` through
its one link (plus the dropped gradients, wasted: up to ``b (alpha + n beta)``); each worker
sends and receives one vector per gradient, ``2(alpha + n beta)``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector

from distlab import comm, launcher
from distlab.asynchronous.ps_config import worker_batch
from distlab.checks import is_int, is_number, require, require_arg
from distlab.launcher import Run
from distlab.metrics import report
from distlab.problems import convex
from distlab.problems.workloads import Workload

GO, STOP = 1.0, 0.0
HEAD = 3          # a gradient message: [worker, version, loss] + g
REPLY_HEAD = 2    # a reply: [GO or STOP, version] + x


@dataclass(frozen=True)
class BackupConfig:
    """Synchronous SGD on a server and ``num_workers`` workers, ``backups`` of them spare."""

    workload: Workload = field(default_factory=lambda: Workload(
        model="mlp", hidden=16, depth=1, batch_size=16, lr=0.1, num_steps=30))
    """What is trained (``"linear"`` or ``"mlp"``); ``batch_size`` is one worker's gradient,
    so a step averages ``(num_workers - backups) * batch_size`` examples."""
    num_workers: int = 4
    """Worker processes N (ranks 1..N; rank 0 is the server), 1 to 32."""
    backups: int = 0
    """b: gradients dropped each step (the last ones to arrive); 0 = plain synchronous SGD."""
    step_time: float = 0.02
    """Seconds of simulated compute added to every gradient."""
    slowdown: tuple = ()
    """Per-worker slowdown factors (worker i takes ``slowdown[i]`` times as long); missing = 1."""
    straggler: float = 1.0
    """Each step one worker, drawn from the seed, takes this many times as long (1 = none)."""
    eval_size: int = 512
    """Training examples (the first ones) on which the server measures the loss."""
    target_loss: float | None = None
    """Stop after the first update whose loss is at or below this; None = run num_steps."""

    def __post_init__(self):
        convex.require_flat_workload(self)
        require(self, "num_workers", is_int(self.num_workers) and 1 <= self.num_workers <= 32,
                "1..32")
        shard = len(self.workload.loaded().dataset.y) // self.num_workers
        require(self, "workload", self.workload.batch_size <= shard,
                f"a workload with batch_size <= {shard} (a gradient is a minibatch of one "
                f"worker's shard of {shard} examples)")
        require(self, "backups", is_int(self.backups) and 0 <= self.backups < self.num_workers,
                f"an int in 0..{self.num_workers - 1} (at least one gradient per step)")
        require(self, "step_time", is_number(self.step_time) and 0 <= self.step_time <= 10,
                "0..10 s")
        require(self, "slowdown",
                isinstance(self.slowdown, tuple) and len(self.slowdown) <= self.num_workers
                and all(is_number(f) and 1 <= f <= 100 for f in self.slowdown),
                f"a tuple of at most num_workers={self.num_workers} factors in [1, 100]")
        require(self, "straggler", is_number(self.straggler) and 1 <= self.straggler <= 100,
                "a factor in [1, 100]")
        require(self, "eval_size", is_int(self.eval_size) and self.eval_size >= 1,
                "an int >= 1")
        require(self, "target_loss", self.target_loss is None or is_number(self.target_loss),
                "a number or None")

    @property
    def world_size(self) -> int:
        return self.num_workers + 1


def train(config: BackupConfig, group=None) -> dict:
    """The body of every rank: rank 0 serves, ranks 1..N work.

    Returns, on the server, ``{"role": "server", "params", "kept"`` (the sorted workers
    kept at each step), ``"losses"`` (on the first ``eval_size`` examples, of versions
    0, 1, ...), ``"dropped"`` (gradients dropped), ``"wall_time"}``; on a worker,
    ``{"role": "worker", "worker", "gradients", "compute_time"}``. The server reports
    ``loss``, ``kept`` and cumulative ``dropped`` at each version, a worker its cumulative
    ``compute_time``.
    """
    if not isinstance(config, BackupConfig):
        raise TypeError(f"config must be a BackupConfig, got {type(config).__name__}")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if world_size != config.world_size:
        raise ValueError(f"this config needs world_size={config.world_size} "
                         f"(1 server + num_workers), got {world_size}")
    return _serve(config, group) if rank == 0 else _work(config, rank - 1, group)


def reference(config: BackupConfig, kept: list) -> dict:
    """Replay on one process: at step t, the mean of the kept workers' gradients at ``x_t``.

    ``kept`` is the server's record (``train``'s ``"kept"``); the run must equal this.
    Returns ``{"params", "losses"}`` (the losses of versions 0 .. len(kept)).
    """
    require_arg("kept", kept, isinstance(kept, list) and len(kept) <= config.workload.num_steps
                and all(len(k) >= 1 and all(is_int(w) and 0 <= w < config.num_workers
                                            for w in k) for k in kept),
                f"a list of at most num_steps lists of workers in 0..{config.num_workers - 1}")
    config = replace(config, workload=config.workload.loaded())   # load the data once
    workload = config.workload
    model = workload.build_model()
    x = parameters_to_vector(model.parameters()).detach().clone()   # (P,)
    optimizer = workload.optimizer([x])
    losses = [_eval_loss(config, model, x)]
    for t, workers in enumerate(kept):
        grads = [_gradient(config, model, w, t, x)[1] for w in sorted(workers)]
        x.grad = torch.stack(grads).mean(0)    # (k, P) -> (P,)
        optimizer.step()
        losses.append(_eval_loss(config, model, x))
    return {"params": x.detach(), "losses": losses}


def start(config: BackupConfig, **launch) -> Run:
    """Start :func:`train` on ``num_workers + 1`` processes; return the :class:`Run` at once."""
    if not isinstance(config, BackupConfig):
        raise TypeError(f"config must be a BackupConfig, got {type(config).__name__}")
    config = replace(config, workload=config.workload.loaded())   # the data travels with it
    return launcher.start(train, config.world_size, config, **launch)


def run(config: BackupConfig, **launch) -> list[dict]:
    """:func:`start` and wait: the per-rank results of :func:`train` (the server's first)."""
    return start(config, **launch).result()


def compute_time(config: BackupConfig, worker: int, version: int, work_time: float) -> float:
    """Seconds worker ``worker`` takes for its gradient of ``version``, ``work_time`` measured.

    The parameter server's straggler rule (:mod:`distlab.asynchronous.ps_worker`): a worker
    of factor ``s`` takes ``s * (work_time + step_time)``; ``s`` is its ``slowdown`` times
    ``straggler`` when it is the step's drawn straggler (the same draw on every rank).
    """
    require_arg("worker", worker, is_int(worker) and 0 <= worker < config.num_workers,
                f"0..{config.num_workers - 1}")
    s = config.slowdown[worker] if worker < len(config.slowdown) else 1.0
    if config.straggler > 1 and worker == straggler_of(config, version):
        s *= config.straggler
    return s * (work_time + config.step_time)


def straggler_of(config: BackupConfig, version: int) -> int:
    """The worker drawn (from the seed) to straggle at ``version``."""
    require_arg("version", version, is_int(version) and version >= 0, "an int >= 0")
    g = torch.Generator().manual_seed(config.workload.seed * 1_000_003 + version)
    return int(torch.randint(config.num_workers, (1,), generator=g))


# -- the two roles --------------------------------------------------------------------------

def _serve(config: BackupConfig, group) -> dict:
    """Rank 0: keep the first N - b fresh gradients of each version, drop the late ones."""
    workload = config.workload.loaded()
    model = workload.build_model()
    x = parameters_to_vector(model.parameters()).detach().clone()   # (P,)
    optimizer = workload.optimizer([x])
    N, need = config.num_workers, config.num_workers - config.backups
    t0 = time.perf_counter()
    pending = [_reply(w, GO, 0, x, group) for w in range(N)]
    computing = set(range(N))              # a gradient is expected from these
    kept_log, dropped = [], 0
    losses = [_eval_loss(config, model, x)]
    report(step=0, loss=losses[0], dropped=0)
    for t in range(workload.num_steps):
        fresh: dict[int, torch.Tensor] = {}
        while len(fresh) < need:
            w, v, g = _receive(len(x), group)
            computing.discard(w)
            if v == t:
                fresh[w] = g               # waits for x_{t+1}
            else:                          # late: dropped; compute on the newest x
                dropped += 1
                pending.append(_reply(w, GO, t, x, group))
                computing.add(w)
        kept = sorted(fresh)
        x.grad = torch.stack([fresh[w] for w in kept]).mean(0)   # (N-b, P) -> (P,)
        optimizer.step()
        kept_log.append(kept)
        losses.append(_eval_loss(config, model, x))
        report(step=t + 1, loss=losses[-1], kept=len(kept), dropped=dropped)
        done = t + 1 == workload.num_steps or (config.target_loss is not None
                                               and losses[-1] <= config.target_loss)
        if done:
            break
        for w in kept:
            pending.append(_reply(w, GO, t + 1, x, group))
            computing.add(w)
    for w in set(range(N)) - computing:    # idle: told at once
        pending.append(_reply(w, STOP, len(kept_log), x, group))
    while computing:                       # busy: their last gradient is drained, then told
        w, _, _ = _receive(len(x), group)
        computing.discard(w)
        dropped += 1
        pending.append(_reply(w, STOP, len(kept_log), x, group))
    for work in pending:
        work.wait()
    return {"role": "server", "params": x.detach(), "kept": kept_log, "losses": losses,
            "dropped": dropped, "wall_time": time.perf_counter() - t0}


def _work(config: BackupConfig, worker: int, group) -> dict:
    """Worker ``worker``: receive x_t, compute the gradient of version t, send it, repeat."""
    workload = config.workload.loaded()
    model = workload.build_model()
    P = sum(p.numel() for p in model.parameters())
    reply = torch.empty(REPLY_HEAD + P)
    gradients, busy = 0, 0.0
    while True:
        comm.recv(reply, 0, group=group)
        if reply[0] == STOP:
            break
        version = int(reply[1])
        t = time.perf_counter()
        loss, g = _gradient(config, model, worker, version, reply[REPLY_HEAD:])
        work_time = time.perf_counter() - t
        time.sleep(max(compute_time(config, worker, version, work_time) - work_time, 0.0))
        busy += time.perf_counter() - t
        comm.send(torch.cat([torch.tensor([worker, version, float(loss)]), g]), 0, group=group)
        gradients += 1
        report(step=version, compute_time=busy)
    return {"role": "worker", "worker": worker, "gradients": gradients, "compute_time": busy}


def _gradient(config: BackupConfig, model, worker: int, version: int, x: torch.Tensor):
    """Loss and flat gradient of ``worker``'s minibatch of ``version`` at parameters ``x``."""
    ds = config.workload.loaded().dataset
    idx = worker_batch(config, ds, worker, version)
    return convex.flat_gradient(model, config.workload.loss, ds.X[idx], ds.y[idx], x)


def _eval_loss(config: BackupConfig, model, x: torch.Tensor) -> float:
    ds, n = config.workload.loaded().dataset, config.eval_size
    return convex.loss_at(model, config.workload.loss, ds.X[:n], ds.y[:n], x)


def _reply(worker: int, code: float, version: int, x: torch.Tensor, group):
    """Send worker ``worker`` ``[code, version] + x`` (a copy: x changes before it is sent)."""
    msg = torch.cat([torch.tensor([code, float(version)]), x.detach()])
    return comm.isend(msg, worker + 1, group=group)


def _receive(num_params: int, group) -> tuple[int, int, torch.Tensor]:
    """The next gradient from any worker: ``(worker, version, g)``."""
    msg = torch.empty(HEAD + num_params)
    comm.recv(msg, group=group)            # any source: whoever is first
    return int(msg[0]), int(msg[1]), msg[HEAD:]
