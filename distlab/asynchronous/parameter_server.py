"""Asynchronous SGD on a parameter server, with a staleness bound you can turn.

The classic architecture of Downpour SGD (Dean et al. 2012) and of Li et al. 2014
("Scaling distributed machine learning with the parameter server", OSDI): ranks
``0 .. num_servers-1`` hold the parameters, the other ranks are workers.  Each worker loops:

1. **pull** the parameters (with their *version*: how many updates the server has applied),
2. compute a gradient on a minibatch of its own shard of the data,
3. **push** the gradient, tagged with the version it was computed on.

The server applies each gradient as it arrives, with no global barrier.  By the time it
lands, other workers may have updated the parameters ``tau`` times: the gradient's measured
**staleness** ``tau = version_now - version_read`` (the ``staleness`` column of the metrics).

Consistency models (Ho et al. 2013, "More effective distributed ML via a stale synchronous
parallel parameter server", NeurIPS, section 3):

* ``staleness=0`` - **BSP**, bulk synchronous: every worker waits for the slowest at every
  clock; the server averages the round's gradients into one update (exactly synchronous
  SGD, ``tau = 0``);
* ``staleness=s`` - **SSP**: a worker may start its clock ``c`` only if the slowest worker
  has finished clock ``c - s - 1`` (it is at most ``s`` clocks ahead);
* ``staleness=None`` - fully **asynchronous** (Hogwild-style server, Downpour).

Under SSP(s) with W workers the update delay is bounded too: ``tau <= (2s+1)(W-1)``
(:func:`max_delay`; each other worker can push at most ``2s+1`` clocks during one of yours).

Options to rescue a diverging run: the staleness-aware learning rate of Zhang et al. 2016
("Staleness-aware async-SGD for distributed deep learning", IJCAI, section 3.2: the step of a
gradient with staleness ``tau`` is ``lr / tau``) and gradient-norm clipping.  Stragglers are
injected per worker (a slowdown factor, or a seeded random delay), and a worker can be
killed mid-run (``SIGKILL``, no goodbye): the server notices its silence (a heartbeat timeout,
as in Li et al. 2014, section 4.3), reports the loss and carries on with the others. The
workers are launched as ``expendable_ranks``, so the launcher lets the run go on too.

Communication cost per gradient (alpha-beta model, P parameters, S server shards): the worker
sends and receives P floats in S messages each, ``2S alpha + 2P beta``; an unsharded server
moves ``2WP`` floats per round of W gradients through one network link, a sharded server
``2WP/S`` through each of S links, which is why sharding removes the server bottleneck.

Run it with :func:`train` (blocking) or :func:`start` (for widgets); both launch
``num_servers + num_workers`` real processes through :func:`distlab.launch`.
"""
from __future__ import annotations

import math
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from distlab import comm
from distlab.problems import data, models
from distlab.checks import is_int, is_number, require
from distlab.launcher import start as _start
from distlab.metrics import report

PROBLEMS = ("linear_regression", "digits")
_STOP, _GO, _BYE = 0.0, 1.0, -1   # reply codes; _BYE in a push's clock: "I am leaving"
_HEAD = 4   # push: [worker, clock, version_read, loss]   reply: [go/stop, version, tau, lr]


@dataclass(frozen=True)
class ParameterServerConfig:
    """How a parameter-server run is set up; validated before any process starts."""

    num_workers: int = 4
    """Worker processes (ranks ``num_servers ..``), 1 to 32."""
    num_servers: int = 1
    """Server ranks; the parameter vector is split evenly across them (sharded server)."""
    staleness: int | None = None
    """SSP bound s in clocks: 0 = BSP (synchronous), None = fully asynchronous."""
    lr: float = 0.05
    """Learning rate of the server's SGD step."""
    num_steps: int = 200
    """Server updates to apply (BSP: rounds, each the mean of every worker's gradient)."""
    batch_size: int | None = 32
    """Minibatch per gradient, drawn from the worker's shard; None = the whole shard."""
    problem: str = "linear_regression"
    """``"linear_regression"`` (``nn.Linear``) or ``"digits"`` (an MLP)."""
    hidden: int = 32
    """Hidden width of the digits MLP (more parameters: a heavier server)."""
    eval_size: int = 512
    """Training examples (the first ones) on which workers measure the loss they pull."""
    staleness_aware: bool = False
    """Divide the step of a gradient with staleness tau by tau (Zhang et al. 2016)."""
    clip: float | None = None
    """Clip each gradient's norm to this value before pushing it; None = no clipping."""
    step_time: float = 0.0
    """Seconds of simulated compute added to every gradient (stands in for a bigger model)."""
    slowdown: tuple = ()
    """Per-worker slowdown factors (worker i takes ``slowdown[i]`` times as long); missing = 1."""
    random_delay: float = 0.0
    """Mean (seconds) of an extra exponential delay per gradient, seeded; 0 = none."""
    seed: int = 0
    """Seeds the model, the data shards, the minibatches and the random delays."""
    target_loss: float | None = None
    """Stop as soon as the training loss is at or below this; None = run num_steps."""
    divergence_factor: float = 1e4
    """The run is declared diverged when the loss exceeds this many times the first loss."""
    worker_timeout: float = 10.0
    """Seconds of silence after which a computing worker is declared lost."""
    drop_worker: int | None = None
    """Kill this worker (0-based) mid-run with SIGKILL, as a crashed machine; None = none."""
    drop_at: int = 5
    """The clock at which ``drop_worker`` is killed."""
    wait_rule: Callable | None = field(default=None, compare=False)
    """``may_proceed(clock, clocks, staleness) -> bool``; None = :func:`may_proceed`."""

    def __post_init__(self):
        require(self, "num_workers", is_int(self.num_workers) and 1 <= self.num_workers <= 32,
                "1..32")
        require(self, "num_servers", is_int(self.num_servers) and 1 <= self.num_servers <= 8,
                "1..8")
        require(self, "staleness",
                self.staleness is None or (is_int(self.staleness) and self.staleness >= 0),
                "an int >= 0 (0 = BSP) or None (fully asynchronous)")
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
        require(self, "num_steps", is_int(self.num_steps) and 1 <= self.num_steps <= 10**6,
                "1..1e6")
        require(self, "batch_size",
                self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
                "an int >= 1 or None (whole shard)")
        require(self, "problem", self.problem in PROBLEMS, f"one of {PROBLEMS}")
        require(self, "hidden", is_int(self.hidden) and 1 <= self.hidden <= 4096, "1..4096")
        require(self, "eval_size", is_int(self.eval_size) and self.eval_size >= 1,
                "an int >= 1")
        require(self, "clip", self.clip is None or (is_number(self.clip) and self.clip > 0),
                "> 0 or None")
        require(self, "step_time", is_number(self.step_time) and 0 <= self.step_time <= 10,
                "0..10 s")
        require(self, "slowdown",
                isinstance(self.slowdown, tuple) and len(self.slowdown) <= self.num_workers
                and all(is_number(f) and 1 <= f <= 100 for f in self.slowdown),
                f"a tuple of at most num_workers={self.num_workers} factors in [1, 100]")
        require(self, "random_delay",
                is_number(self.random_delay) and 0 <= self.random_delay <= 10, "0..10 s")
        require(self, "seed", is_int(self.seed), "an int")
        require(self, "target_loss", self.target_loss is None or is_number(self.target_loss),
                "a number or None")
        require(self, "divergence_factor",
                is_number(self.divergence_factor) and self.divergence_factor > 1, "> 1")
        longest = self.step_time * max(self.slowdown, default=1) + 10 * self.random_delay
        require(self, "worker_timeout",
                is_number(self.worker_timeout) and self.worker_timeout > longest + 0.5,
                f"> {longest + 0.5:g} s (longer than the slowest gradient)")
        require(self, "drop_worker", self.drop_worker is None
                or (is_int(self.drop_worker) and 0 <= self.drop_worker < self.num_workers),
                f"None or 0..{self.num_workers - 1}")
        require(self, "drop_at", is_int(self.drop_at) and self.drop_at >= 1, "an int >= 1")
        require(self, "wait_rule", self.wait_rule is None or callable(self.wait_rule),
                "None or a function may_proceed(clock, clocks, staleness) -> bool")

    @property
    def world_size(self) -> int:
        return self.num_servers + self.num_workers

    @property
    def mode(self) -> str:
        """``"BSP"``, ``"SSP"`` or ``"async"``."""
        return "async" if self.staleness is None else "BSP" if self.staleness == 0 else "SSP"


def may_proceed(clock: int, clocks: list[int], staleness: int | None) -> bool:
    """The SSP wait condition (Ho et al. 2013, section 3): may a worker start ``clock``?

    ``clocks`` are the clocks of the live workers (gradients each has pushed so far). The
    worker may go on if it is at most ``staleness`` clocks ahead of the slowest one: every
    gradient of clocks ``<= clock - staleness - 1`` has then been applied. None: no bound.
    """
    return staleness is None or clock - min(clocks) <= staleness


def max_delay(staleness: int | None, num_workers: int) -> float:
    """The largest update delay tau that SSP(s) allows: ``(2s+1)(W-1)``; 0 for BSP."""
    if staleness is None:
        return math.inf
    return 0 if staleness == 0 else (2 * staleness + 1) * (num_workers - 1)


# ----------------------------------------------------------------------------------------
# The problem every rank builds identically from the seed.
# ----------------------------------------------------------------------------------------

def build_problem(config: ParameterServerConfig):
    """``(model, dataset, loss_fn)`` for ``config.problem``, identical on every rank."""
    if config.problem == "linear_regression":
        ds = data.linear_regression(seed=config.seed)
        return models.linear(ds.num_features, seed=config.seed), ds, F.mse_loss
    ds = data.digits(seed=config.seed)
    return (models.mlp(ds.num_features, config.hidden, ds.num_classes, depth=1,
                       seed=config.seed), ds, F.cross_entropy)


def worker_batch(config: ParameterServerConfig, ds, worker: int, clock: int) -> torch.Tensor:
    """Row indices of ``worker``'s minibatch at ``clock``: seeded, from its own shard."""
    shard = data.shard_indices(len(ds.y), worker, config.num_workers, seed=config.seed)
    if config.batch_size is None:
        return shard
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + worker * 7919 + clock)
    return shard[torch.randint(len(shard), (config.batch_size,), generator=g)]


def gradient(model, loss_fn, X, y, flat: torch.Tensor):
    """Loss and flat gradient of ``model`` with parameters ``flat`` on ``(X, y)``."""
    vector_to_parameters(flat, model.parameters())
    loss = loss_fn(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


def shard_bounds(num_params: int, num_servers: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of each server's slice of the flat parameter vector."""
    sizes = [len(c) for c in torch.arange(num_params).tensor_split(num_servers)]
    starts = [sum(sizes[:i]) for i in range(num_servers)]
    return [(a, a + n) for a, n in zip(starts, sizes)]


# ----------------------------------------------------------------------------------------
# The server.
# ----------------------------------------------------------------------------------------

def _receiver(buf_size: int, group, inbox: queue.Queue, go_on: queue.Queue) -> None:
    """Receive pushes from any worker, one at a time, into ``inbox``.

    A blocking ``wait()`` has no usable timeout on gloo (a timed-out receive cannot be
    resumed), so it runs here, and the server loop waits on ``inbox`` with a timeout: that
    is how a silent worker is noticed. The loop answers on ``go_on`` whether another
    message is expected, so no receive is left posted at the end.
    """
    while True:
        buf = torch.empty(buf_size)
        comm.irecv(buf, group=group).wait()   # any source: whoever pushes first
        inbox.put(buf)
        if not go_on.get():
            return


def _serve(config: ParameterServerConfig, shard: int, group) -> dict:
    """Server shard ``shard``: apply pushes as they arrive, answer each with fresh parameters.

    A worker that pushed is *waiting* until the wait rule lets it start its next clock; it
    is then sent the parameters and is *busy* until its next push. A busy worker silent for
    ``worker_timeout`` seconds is *lost*: the others carry on without it.
    """
    model, ds, _ = build_problem(config)
    lo, hi = shard_bounds(sum(p.numel() for p in model.parameters()), config.num_servers)[shard]
    x = parameters_to_vector(model.parameters()).detach()[lo:hi].clone()   # (hi - lo,)
    W, S, s = config.num_workers, config.num_servers, config.staleness
    rule = config.wait_rule or may_proceed
    st = _ServerState(W)
    busy, waiting, lost, finished = set(), set(), {}, set()
    round_grads: dict[int, torch.Tensor] = {}     # BSP: this round's gradients, by worker
    pending, log = [], []                         # sends in flight; the instrumented events
    t0 = time.monotonic()

    def live():
        return [w for w in range(W) if w not in lost]

    def reply(w, go):
        msg = torch.cat([torch.tensor([_GO if go else _STOP, st.version, st.tau[w],
                                       st.lr_used[w]]), x])
        try:
            pending.append(comm.isend(msg, S + w, group=group))
        except RuntimeError:       # its connection is closed: it died; silence will tell
            pass
        if go:
            busy.add(w)
            st.last_heard[w] = time.monotonic()
            log.append(("read", w, st.clocks[w], st.version,
                        st.clocks[w] - min(st.clocks[v] for v in live())))
        else:
            finished.add(w)

    def release_waiting():
        for w in sorted(waiting):
            if st.reason is not None:
                waiting.discard(w)
                reply(w, False)
            elif rule(st.clocks[w], [st.clocks[v] for v in live()], s):
                waiting.discard(w)
                reply(w, True)

    def stop(why):
        st.reason = st.reason or why
        release_waiting()

    def apply(g, lr_used):
        x.sub_(lr_used * g)
        st.version += 1
        if st.version >= config.num_steps:
            stop(f"finished {config.num_steps} updates")

    def apply_round():
        # Sum in worker order, whatever the arrival order: BSP then equals synchronous SGD
        # bit for bit (tests/test_parameter_server.py checks it).
        mean = torch.stack([round_grads[w] for w in sorted(round_grads)]).mean(0)
        round_grads.clear()
        apply(mean, config.lr)

    def on_push(msg):
        w, clock, v_read, loss = int(msg[0]), int(msg[1]), int(msg[2]), float(msg[3])
        g = msg[_HEAD:]
        busy.discard(w)
        if clock == _BYE:                            # another shard told it to stop
            finished.add(w)
            return None
        if w in lost or st.reason is not None:      # too late: the run has moved on
            return reply(w, False)
        st.clocks[w] = clock + 1
        st.tau[w] = tau = st.version - v_read       # the measured staleness
        st.lr_used[w] = config.lr / max(tau, 1) if config.staleness_aware else config.lr
        log.append(("push", w, clock, v_read, tau))
        if shard == 0:
            st.check_loss(config, v_read, loss, stop)
        if not bool(torch.isfinite(g).all()):
            stop(f"diverged at update {st.version}: worker {w} pushed a non-finite gradient")
        if st.reason is not None:
            return reply(w, False)
        if s == 0:                                   # BSP: one update per round, the mean
            round_grads[w] = g
            if set(round_grads) >= set(live()):
                apply_round()
        else:
            apply(g, st.lr_used[w])
        waiting.add(w)                               # until the wait rule lets it go on
        release_waiting()

    def check_heartbeats():
        now = time.monotonic()
        for w in sorted(busy):
            if now - st.last_heard[w] > config.worker_timeout:
                busy.discard(w)
                lost[w] = f"silent for {now - st.last_heard[w]:.1f} s at clock {st.clocks[w]}"
                if shard == 0:
                    print(f"parameter server: worker {w} (rank {S + w}) lost, {lost[w]}; "
                          f"carrying on with {W - len(lost)} workers", flush=True)
                if not live():
                    stop("every worker was lost")
                elif s == 0 and round_grads and set(round_grads) >= set(live()):
                    apply_round()
                release_waiting()
        if not busy and waiting and st.reason is None:
            raise RuntimeError(f"deadlock: the wait rule lets no worker proceed (clocks "
                               f"{st.clocks}, staleness={s}); check may_proceed")

    for w in range(W):
        reply(w, True)
    inbox, go_on = queue.Queue(), queue.Queue()
    threading.Thread(target=_receiver, args=(_HEAD + hi - lo, group, inbox, go_on),
                     daemon=True).start()
    while len(finished) + len(lost) < W:
        try:
            msg = inbox.get(timeout=0.05)
        except queue.Empty:
            check_heartbeats()
            continue
        on_push(msg)
        go_on.put(bool(busy))      # another push can only come from a busy worker
    for p in pending:
        try:
            p.wait()
        except RuntimeError:       # a dead worker: nothing to deliver to
            pass
    if st.reason and shard == 0 and "diverged" in st.reason:
        print(f"parameter server: {st.reason}", flush=True)   # one line, not a flood
    elapsed = time.monotonic() - t0
    return {"role": "server", "shard": shard, "params": x, "version": st.version,
            "clocks": st.clocks, "lost": lost, "stopped": st.reason, "log": log,
            "diverged": st.reason if st.reason and "diverged" in st.reason else None,
            "updates_per_s": st.version / elapsed, "elapsed": elapsed}


class _ServerState:
    """The counters of one server shard."""

    def __init__(self, num_workers: int):
        self.version = 0                       # updates applied so far
        self.clocks = [0] * num_workers        # gradients pushed by each worker
        self.tau = [0] * num_workers           # staleness of each worker's last gradient
        self.lr_used = [0.0] * num_workers     # the step size it was applied with
        self.last_heard = [time.monotonic()] * num_workers
        self.reason: str | None = None         # why the run is stopping, once it is
        self.first_loss: float | None = None
        self.loss_version = -1                 # the last version whose loss was reported

    def check_loss(self, config, version: int, loss: float, stop) -> None:
        """Report the loss of ``version`` once; stop on divergence or on the target."""
        if version <= self.loss_version:
            return
        self.loss_version = version
        report(step=version, loss=loss)
        self.first_loss = loss if self.first_loss is None else self.first_loss
        if not math.isfinite(loss) or loss > config.divergence_factor * self.first_loss:
            stop(f"diverged at update {version}: loss {loss:.3g} (first loss "
                 f"{self.first_loss:.3g}); try a smaller lr, staleness_aware=True or clip")
        elif config.target_loss is not None and loss <= config.target_loss:
            stop(f"reached target loss {config.target_loss:g} at update {version}")


# ----------------------------------------------------------------------------------------
# The worker.
# ----------------------------------------------------------------------------------------

def _work(config: ParameterServerConfig, worker: int, group) -> dict:
    """Worker ``worker``: pull from every shard, compute a gradient, push its slices back."""
    model, ds, loss_fn = build_problem(config)
    P = sum(p.numel() for p in model.parameters())
    bounds = shard_bounds(P, config.num_servers)
    slowdown = config.slowdown[worker] if worker < len(config.slowdown) else 1.0
    delays = torch.Generator().manual_seed(config.seed * 31 + worker)
    X_eval, y_eval = ds.X[:config.eval_size], ds.y[:config.eval_size]
    clock, compute_time = 0, 0.0
    while True:
        replies = [torch.empty(_HEAD + hi - lo) for lo, hi in bounds]
        works = [comm.irecv(r, j, group=group) for j, r in enumerate(replies)]
        for wk in works:
            wk.wait()
        if any(r[0] == _STOP for r in replies):
            # Shards decide to stop independently (each counts its own updates; only shard
            # 0 sees the loss): tell the others, which are waiting for a push, that we leave.
            byes = [comm.isend(torch.cat([torch.tensor([worker, _BYE, 0, 0]),
                                          torch.zeros(hi - lo)]), j, group=group)
                    for j, ((lo, hi), r) in enumerate(zip(bounds, replies)) if r[0] == _GO]
            for wk in byes:
                wk.wait()
            break
        versions = [int(r[1]) for r in replies]
        if clock > 0:   # the server measured the previous gradient's staleness
            report(step=clock - 1, staleness=max(int(r[2]) for r in replies),
                   lr=float(replies[0][3]), compute_time=compute_time,
                   **comm.ledger().totals())
        if worker == config.drop_worker and clock == config.drop_at:
            print(f"worker {worker}: killed at clock {clock} (injected failure)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no message: a crash
            time.sleep(60)                         # SIGKILL is delivered asynchronously
        flat = torch.cat([r[_HEAD:] for r in replies])
        t = time.perf_counter()
        with torch.no_grad():   # the loss of the parameters just pulled (fixed examples)
            vector_to_parameters(flat, model.parameters())
            loss = float(loss_fn(model(X_eval), y_eval))
        idx = worker_batch(config, ds, worker, clock)
        _, g = gradient(model, loss_fn, ds.X[idx], ds.y[idx], flat)
        if config.clip is not None:
            g = g * min(1.0, config.clip / (float(g.norm()) + 1e-12))
        # A straggler takes `slowdown` times as long as the (simulated) compute.
        work_time = time.perf_counter() - t + config.step_time
        extra = (slowdown - 1.0) * work_time + config.step_time
        if config.random_delay > 0:
            extra += float(torch.empty(1).exponential_(1 / config.random_delay,
                                                       generator=delays))
        time.sleep(extra)
        compute_time += time.perf_counter() - t
        sends = [comm.isend(torch.cat([torch.tensor([worker, clock, versions[j], loss]),
                                       g[lo:hi]]), j, group=group)
                 for j, (lo, hi) in enumerate(bounds)]
        for wk in sends:
            wk.wait()
        clock += 1
    return {"role": "worker", "worker": worker, "clocks": clock,
            "compute_time": compute_time}


def run(config: ParameterServerConfig, group=None) -> dict:
    """The body of every rank: ranks below ``num_servers`` serve, the others work."""
    rank = dist.get_rank(group)
    if dist.get_world_size(group) != config.world_size:
        raise ValueError(f"this config needs world_size={config.world_size} "
                         f"(num_servers + num_workers), got {dist.get_world_size(group)}")
    if rank < config.num_servers:
        return _serve(config, rank, group)
    return _work(config, rank - config.num_servers, group)


# ----------------------------------------------------------------------------------------
# From a notebook.
# ----------------------------------------------------------------------------------------

@dataclass
class Result:
    """What a finished run gives back: parameters, metrics and what the servers saw."""
    params: torch.Tensor
    """The final flat parameter vector (the shards put back together)."""
    metrics: object
    """The tidy metrics DataFrame (server ``loss``; workers' ``staleness``, ``lr``...)."""
    servers: list
    workers: list
    """The surviving workers' summaries."""
    died: dict
    """``{rank: how it died}`` for worker processes that died, as the launcher saw it."""

    @property
    def diverged(self) -> str | None:
        return self.servers[0]["diverged"]

    @property
    def lost(self) -> dict:
        """``{worker: why}`` for the workers the server gave up on."""
        return self.servers[0]["lost"]


def start(config: ParameterServerConfig, timeout: float | None = 300, **launch_kwargs):
    """Launch ``config.world_size`` processes and return the :class:`distlab.Run` at once.

    The workers are expendable: if one dies, the launcher lets the run go on.
    """
    if not isinstance(config, ParameterServerConfig):
        raise TypeError(f"config must be a ParameterServerConfig, got {type(config).__name__}")
    launch_kwargs.setdefault("expendable_ranks",
                             tuple(range(config.num_servers, config.world_size)))
    return _start(run, config.world_size, config, timeout=timeout, **launch_kwargs)


def collect(run_handle) -> Result:
    """Wait for a run started by :func:`start` and assemble its :class:`Result`."""
    results = run_handle.result()
    servers = [r for r in results if r is not None and r["role"] == "server"]
    return Result(torch.cat([s["params"] for s in servers]), run_handle.metrics(), servers,
                  [r for r in results if r is not None and r["role"] == "worker"],
                  dict(getattr(run_handle, "lost", {})))


def train(config: ParameterServerConfig, **launch_kwargs) -> Result:
    """Run the parameter server to the end (blocking) and return its :class:`Result`."""
    return collect(start(config, **launch_kwargs))


def reference_bsp(config: ParameterServerConfig) -> torch.Tensor:
    """Single-process synchronous SGD on the same data: what ``staleness=0`` must equal.

    At step t every worker's minibatch gradient is taken at the same parameters and the
    mean of them, in worker order, is applied.
    """
    model, ds, loss_fn = build_problem(config)
    x = parameters_to_vector(model.parameters()).detach().clone()
    for t in range(config.num_steps):
        grads = []
        for w in range(config.num_workers):
            idx = worker_batch(config, ds, w, t)
            _, g = gradient(model, loss_fn, ds.X[idx], ds.y[idx], x)
            if config.clip is not None:
                g = g * min(1.0, config.clip / (float(g.norm()) + 1e-12))
            grads.append(g)
        x = x - config.lr * torch.stack(grads).mean(0)
    return x

