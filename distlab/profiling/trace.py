"""Where the time of a step goes: a ``torch.profiler`` trace, and the exposed communication.

:func:`train` runs a few data-parallel steps of a workload on every rank, with distlab's DDP
wrappers (:mod:`distlab.data_parallel.ddp`, all-reduces launched from backward hooks) or
with FSDP (:mod:`distlab.sharding.fsdp`, all-gathers before each layer and reduce-scatters
after), times them, and records the last one with ``torch.profiler`` (Kineto). Each rank's
trace is written as Chrome trace JSON, ``<folder>/<wrapper>_rank<r>.json``: open it in
https://ui.perfetto.dev or chrome://tracing. The main thread shows the operators (forward,
backward, the optimizer); gloo's worker threads show the collectives (``gloo:all_reduce``,
``gloo:broadcast``...) while they are in flight.

**Exposed communication** is the time a collective is in flight while the rank computes
nothing: the union of the communication intervals minus the union of the compute intervals
(:func:`exposed`). Read from the trace (:func:`trace_intervals`) and from distlab's own
records of the same step, it should roughly agree: for DDP, the wrapper's ``events`` (each
all-reduce from launch to completion, as :mod:`distlab.data_parallel.sync_sgd` records
them for its ``timeline_steps``) beside the forward, backward and optimizer intervals; for
FSDP, whose collectives block, every second the :mod:`distlab.comm` ledger counts in its
all-gathers is exposed. (The isend/irecv of distlab's own ring reduce-scatter appear in a
gloo trace only as the calls that queue them, so the trace cannot time their transfer and
distlab's side leaves them out too; the ledger's ``point_to_point_time`` reports them.) On a loaded machine the two differ by the CPU time
of the bookkeeping around each collective (packing a bucket, queuing the call): the trace
counts it apart, distlab's records inside the step or the collective.
In the α-β model a bucketed DDP step exposes about one bucket's all-reduce,
2(N-1)·α + 2(N-1)/N·n_b·β, and hides the rest behind backward; FSDP exposes all of its
3·U·(N-1)·α + 3(N-1)/N·n·β (no prefetching here).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require
from distlab.data_parallel import ddp
from distlab.problems import models
from distlab.problems.workloads import Workload
from distlab.profiling import flops
from distlab.sharding.fsdp import FullyShardedDataParallel

WRAPPERS = ("ddp", "fsdp")
COMM_PREFIXES = ("gloo:", "nccl:")
"""Trace events of communication in flight: gloo's and NCCL's own annotations."""
POINT_TO_POINT = ("send", "recv")
"""Ledger entries a trace cannot time: gloo annotates only the call that queues them."""
PHASES = ("forward", "backward", "optimizer step")
"""The ``record_function`` labels of a step's compute (and "wait for gradients", not compute)."""


@dataclass(frozen=True)
class ProfileConfig:
    """A few timed data-parallel steps of ``workload``; the last one traced."""
    wrapper: str = "ddp"
    """``"ddp"`` (distlab's data-parallel wrappers) or ``"fsdp"`` (ZeRO stage 3)."""
    variant: str = "bucketed"
    """The DDP variant (a key of :data:`distlab.data_parallel.ddp.VARIANTS`)."""
    bucket_size_mb: float = 0.05
    """The bucketed variant's bucket size in MiB: small, so a tiny model has several."""
    world_size: int = 2
    """Ranks; each takes ``workload.batch_size / world_size`` examples of every batch."""
    workload: Workload = field(default_factory=lambda: Workload(
        model="transformer", hidden=64, depth=2, batch_size=16, num_steps=5, lr=0.01))
    """What is trained; its first step warms up, the middle ones are timed, the last traced."""
    folder: str = "traces"
    """Where each rank writes ``<wrapper>_rank<r>.json`` (created if missing)."""

    def __post_init__(self):
        require(self, "wrapper", self.wrapper in WRAPPERS, f"one of {WRAPPERS}")
        require(self, "variant", self.variant in ddp.VARIANTS, f"one of {list(ddp.VARIANTS)}")
        require(self, "bucket_size_mb", is_number(self.bucket_size_mb)
                and self.bucket_size_mb > 0, "a number > 0 (MiB)")
        require(self, "world_size", is_int(self.world_size)
                and 1 <= self.world_size <= launcher.MAX_WORLD_SIZE,
                f"an int in 1..{launcher.MAX_WORLD_SIZE}")
        require(self, "workload", isinstance(self.workload, Workload)
                and self.workload.model == "transformer", "a transformer Workload")
        require(self, "workload", self.workload.num_steps >= 3,
                "a Workload with num_steps >= 3 (a warm-up, timed steps, the traced one)")
        require(self, "world_size", self.workload.batch_size % self.world_size == 0,
                f"a divisor of workload.batch_size={self.workload.batch_size}")
        require(self, "folder", isinstance(self.folder, str) and self.folder != "",
                "a folder name")


def train(config: ProfileConfig, group=None) -> dict:
    """On every rank: warm up, time the middle steps, trace the last; return the numbers.

    Returns ``step_time`` (median seconds of the untraced steps), ``flops`` (this rank's
    FLOPs per step from the layer shapes), ``six_n_d``, ``peak`` (FLOP/s of a matmul on
    this process, the median of one measurement beside each step), ``achieved`` (FLOP/s of
    the median step), ``mfu``, ``trace`` (the JSON file), ``trace_exposed`` and
    ``own_exposed`` (seconds of exposed communication in the traced step, read from the
    trace and from distlab's own records), ``traced_step_time`` and
    ``point_to_point_time`` (the ledger's seconds in send/recv, which a trace cannot time).
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    wl = config.workload.loaded()
    net = wl.build_model()
    num_params = models.num_parameters(net)           # before FSDP shards them
    tokens = wl.batch_size // world_size * wl.block_size          # this rank's per step
    counted = flops.layer_flops(net, tokens, wl.block_size)["total"]
    if config.wrapper == "ddp":
        model = ddp.wrap(net, config.variant, group, bucket_size_mb=config.bucket_size_mb)
    else:
        model = FullyShardedDataParallel(net, group)
    opt = wl.optimizer(model.parameters())
    batches = list(wl.batches())
    times, peaks = [], []
    for X, y in batches[:-1]:        # the peak beside each step: a loaded machine drifts
        times.append(_step(model, opt, wl, X, y, rank, world_size)["time"])
        peaks.append(flops.peak_matmul_flops(repeats=3))
    peak = statistics.median(peaks[1:])
    os.makedirs(config.folder, exist_ok=True)
    path = os.path.join(config.folder, f"{config.wrapper}_rank{rank}.json")
    comm.ledger().reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        traced = _step(model, opt, wl, *batches[-1], rank, world_size)
    prof.export_chrome_trace(path)
    compute, communication = trace_intervals(path)
    ops = comm.ledger().by_op()
    point_to_point = sum(ops[k]["comm_time"] for k in POINT_TO_POINT if k in ops)
    own = (exposed(traced["comm"], traced["compute"]) if config.wrapper == "ddp"
           else comm.ledger().totals()["comm_time"] - point_to_point)
    step_time = statistics.median(times[1:])                      # the first warmed up
    return {"rank": rank, "step_time": step_time, "flops": counted, "peak": peak,
            "six_n_d": flops.six_n_d(num_params, tokens),
            "achieved": counted / step_time, "mfu": flops.mfu(counted, step_time, peak),
            "trace": path,
            "trace_exposed": exposed(communication, compute), "own_exposed": own,
            "traced_step_time": traced["time"], "point_to_point_time": point_to_point}


def start(config: ProfileConfig, on_output=None, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes; return the Run at once.

    The profiler's own log lines (Kineto's ``profiler_start``) are dropped from the
    workers' output."""
    config = replace(config, workload=config.workload.loaded())
    return launcher.start(train, config.world_size, config, on_output=_quiet(on_output),
                          **launch)


def run(config: ProfileConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def exposed(communication, compute) -> float:
    """Seconds of ``communication`` intervals covered by no ``compute`` interval.

    Both are lists of ``(start, end)`` in seconds on one clock; overlaps within each list
    count once.
    """
    covered = _union(compute)
    total = 0.0
    for a, b in _union(communication):
        total += b - a
        for c, d in covered:
            total -= max(0.0, min(b, d) - max(a, c))
    return total


def trace_intervals(path: str) -> tuple[list, list]:
    """``(compute, communication)`` intervals of one rank's Chrome trace, in seconds.

    Communication: every event of gloo or NCCL in flight (on gloo's worker threads, or on
    the main thread for a blocking send or receive). Compute: the main thread's labelled
    phases (:data:`PHASES`, from ``record_function``; its operators where a trace has no
    labels), less the time the main thread spends in communication calls: ``c10d::...``
    operators, and the idle time of the operator that issues each of them (FSDP's
    ``AllGather`` in backward, say), where it waits for the collective.
    """
    with open(path) as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    main = events[0]["pid"] if events else None                  # Linux: main tid == pid
    ours = [e for e in events if e.get("tid") == main]

    def span(e):
        return e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6

    communication = [span(e) for e in events if e["name"].startswith(COMM_PREFIXES)]
    ops = [e for e in ours if e.get("cat") == "cpu_op" and not e["name"].startswith("c10d::")]
    calls = [e for e in ours if e["name"].startswith(COMM_PREFIXES + ("c10d::",))]
    waiting = [span(e) for e in calls] + _idle(_issuers(calls, ops), ops, span)
    phases = [span(e) for e in ours if e["name"] in PHASES]
    busy = phases or [span(e) for e in ops]
    return _subtract(_union(busy), _union(waiting)), communication


# -- helpers ------------------------------------------------------------------------------

def _step(model, opt, wl, X, y, rank, world_size) -> dict:
    """One training step on this rank's rows; its compute and communication intervals."""
    X, y = X.chunk(world_size)[rank], y.chunk(world_size)[rank]   # (B/N, T)
    if hasattr(model, "events"):
        model.events = []                  # the DDP wrapper notes each all-reduce's span
    label = torch.profiler.record_function     # a named span in the trace (Perfetto)
    t0 = time.time()
    with label("forward"):
        opt.zero_grad()
        loss = wl.loss(model(X), y)
    t1 = time.time()
    with label("backward"):
        loss.backward()
    t2 = time.time()
    with label("wait for gradients"):
        if hasattr(model, "finish_gradient_synchronization"):
            model.finish_gradient_synchronization()
    t3 = time.time()
    with label("optimizer step"):
        opt.step()
    t4 = time.time()
    events = getattr(model, "events", None) or []
    # An asynchronous all-reduce notes its end from a callback on gloo's thread, which may
    # run just after wait() returned: wait for one event per bucket.
    deadline = time.time() + 1.0
    while len(events) < len(getattr(model, "buckets", ())) and time.time() < deadline:
        time.sleep(0.001)
    return {"time": t4 - t0, "compute": [(t0, t1), (t1, t2), (t3, t4)],
            "comm": [(e["start"], e["end"]) for e in events]}


def _issuers(calls, ops) -> list[dict]:
    """For each communication call, the innermost operator around it (the one issuing it)."""
    found = {}
    for c in calls:
        around = [o for o in ops if o["ts"] <= c["ts"]
                  and c["ts"] + c["dur"] <= o["ts"] + o["dur"]]
        if around:
            o = min(around, key=lambda o: o["dur"])
            found[id(o)] = o
    return list(found.values())


def _idle(issuers, ops, span) -> list[tuple[float, float]]:
    """The time inside each issuing operator that none of its own operators covers: there
    it waits for its collective."""
    idle = []
    for o in issuers:
        inside = [span(c) for c in ops if c is not o and o["ts"] <= c["ts"]
                  and c["ts"] + c["dur"] <= o["ts"] + o["dur"]]
        idle += _subtract([span(o)], _union(inside))
    return idle


def _union(intervals) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _subtract(intervals, holes) -> list[tuple[float, float]]:
    """``intervals`` minus ``holes`` (both disjoint and sorted)."""
    out = []
    for a, b in intervals:
        for c, d in holes:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
        if a < b:
            out.append((a, b))
    return out


def _quiet(on_output):
    """``on_output`` (or printing, as the launcher does) without Kineto's log lines."""
    def forward(rank, stream, text):
        kept = "".join(line for line in text.splitlines(keepends=True)
                       if line.strip() and "ActivityProfiler" not in line)
        if not kept:
            return
        if on_output is not None:
            on_output(rank, stream, kept)
        else:
            out = sys.stderr if stream == "stderr" else sys.stdout
            out.write("".join(f"[rank {rank}] {line}\n" for line in kept.splitlines()))
    return forward
