"""Lab 02 assignment: average the gradients (part A), then build the overlapped, bucketed
DDP (part B); both checked on real processes against single-process SGD.

Part A, ``average_gradients(model, group=None)``: called on every rank after
``loss.backward()``, it leaves every trainable parameter's ``.grad`` equal to the mean over
the ranks, with **one** all-reduce of a flat buffer (Li et al. 2020, "PyTorch Distributed",
section 3.2.2: one latency alpha instead of one per tensor).

Part B, a class ``DDP(model, bucket_bytes, group=None)`` with ``finish()``: gradient hooks
(``register_post_accumulate_grad_hook``) fill buckets, taken in reverse parameter order and
closed once they hold ``bucket_bytes``; each bucket is all-reduced asynchronously as soon as
it and every bucket before it are complete (so every rank issues the same collectives in the
same order); ``finish()`` zero-fills what this rank's backward did not reach, waits, divides
by the world size and copies the means back (section 3.2.3: the all-reduces overlap the rest
of backward; cost 2(p-1)·B·alpha + 2(p-1)/p·n·beta for B buckets of n bytes in all).

The model of both checks has what real models have (:class:`ExerciseModel`): a frozen
layer (its ``.grad`` stays None), a weight shared by two layers (averaged once) and a
branch that odd ranks skip (its ``.grad`` is None there and counts as zeros). What is right
is single-process SGD on the mean of the ranks' losses, the arithmetic of
:func:`distlab.data_parallel.ddp.average_gradients`; the student's code runs inside
:func:`~distlab.exercises.forbid`, so distlab's own DDP is off limits. In each worker
``torch.distributed.all_reduce`` is wrapped to record every call: its size, whether it was
asynchronous, and whether it started before ``backward()`` returned.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distlab.checks import is_int, require_arg
from distlab.exercises import Verdict, forbid, launch_student

FORBIDDEN = ("distlab.data_parallel.ddp.average_gradients",
             "distlab.data_parallel.ddp.NaiveDDP.finish_gradient_synchronization",
             "distlab.data_parallel.ddp.FlatDDP.finish_gradient_synchronization",
             "distlab.data_parallel.ddp.OverlapDDP.__init__",
             "distlab.data_parallel.ddp.BucketedDDP.__init__",
             "torch.nn.parallel.DistributedDataParallel.__init__")
WHY = "write the averaging yourself, with comm.all_reduce"
LR = 0.1            # the checks' SGD step
MAX_RANKS = 8


class ExerciseModel(nn.Module):
    """Linear -> frozen Linear -> two Linears sharing one weight -> (branch) -> Linear.

    ``forward(x, use_branch)``: the branch is added only when ``use_branch``; the checks
    skip it on odd ranks, so its parameters get no gradient there.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(5, 6)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight            # tied: model.parameters() yields it once
        self.branch = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)
        self.to(dtype)

    def forward(self, x, use_branch: bool = True):
        h = torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.frozen(torch.tanh(self.inp(x))))))))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def check_average_gradients(student_fn: Callable, *, points: float, world_size: int = 2,
                            dtype: torch.dtype = torch.float32) -> Verdict:
    """Part A: run ``student_fn(model, None)`` after one backward on ``world_size`` ranks.

    Right when every trainable ``.grad`` is the mean over the ranks (a skipped branch
    counting as zeros), the frozen layer has none, and each rank made one all-reduce call.
    Right gradients from more than one call earn half the points.
    """
    _require_ranks(world_size)
    results, verdict = launch_student(
        "average_gradients", student_fn, _run_average, world_size, student_fn, dtype,
        points=points, hang_hint="every rank must make the same collective calls in the same "
                                 "order, including ranks whose forward skipped the branch")
    if verdict is not None:
        return verdict
    model = ExerciseModel(dtype)
    local = [_local_grads(model, r, world_size, 0, dtype) for r in range(world_size)]
    want = _mean_grads(model, world_size, 0, dtype)
    for rank, (grads, _) in enumerate(results):
        problem = _wrong_gradient(grads, want, local[rank], rank, world_size)
        if problem:
            return Verdict(False, problem, 0.0, points)
    for rank, (_, calls) in enumerate(results):
        if len(calls) != 1:
            return Verdict(False, f"the gradients are right, but rank {rank} made {len(calls)} "
                                  "all-reduce calls: pack every gradient into one flat buffer "
                                  "and all-reduce it once", points / 2, points)
    return Verdict(True, f"all {world_size} ranks hold the mean gradient of every trainable "
                         "parameter (the frozen one untouched, the tied one once, the skipped "
                         "branch as zeros), with one all-reduce each", points, points)


def check_ddp(student_cls, *, points: float, world_size: int = 2, bucket_bytes: int = 100,
              num_steps: int = 3, dtype: torch.dtype = torch.float32) -> Verdict:
    """Part B: train ``num_steps`` SGD steps with ``student_cls(model, bucket_bytes, None)``.

    Each step every rank runs forward and backward on its shard, calls ``finish()`` and
    steps. The gradients after ``finish()`` must be single-process SGD's on every rank and
    step (60% of the points, and the other checks only count when they are); each step's
    all-reduces must be the buckets of the rule, in order (20%); they must be asynchronous
    and, on a rank whose forward used every parameter, all started before ``backward()``
    returned (20%).
    """
    _require_ranks(world_size)
    require_arg("bucket_bytes", bucket_bytes, is_int(bucket_bytes) and bucket_bytes >= 0,
                "an int >= 0")
    require_arg("num_steps", num_steps, is_int(num_steps) and 1 <= num_steps <= 20, "1..20")
    results, verdict = launch_student(
        "DDP", student_cls, _run_ddp, world_size, student_cls, bucket_bytes, num_steps, dtype,
        points=points, hang_hint="gloo pairs collectives by the order each rank issues them: "
                                 "launch bucket i only after buckets 0..i-1, and let finish() "
                                 "launch those a skipped parameter held back")
    if verdict is not None:
        return verdict
    model = ExerciseModel(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(num_steps):
        local = [_local_grads(model, r, world_size, step, dtype) for r in range(world_size)]
        want = _mean_grads(model, world_size, step, dtype)
        for rank in range(world_size):
            problem = _wrong_gradient(results[rank][step]["grads"], want, local[rank], rank,
                                      world_size, f", step {step}")
            if problem:
                return Verdict(False, problem, 0.0, points)
        optimizer.step()
    problems, earned = [], 0.6 * points
    buckets = bucket_numels([p for p in model.parameters() if p.requires_grad], bucket_bytes)
    wrong = _first(results, lambda s: [n for n, _ in s["calls"]] != buckets)
    if wrong:
        rank, step, s = wrong
        problems.append(f"rank {rank}, step {step}: all-reduces of "
                        f"{[n for n, _ in s['calls']]} elements, but the buckets of "
                        f"bucket_bytes={bucket_bytes} are {buckets} (reverse parameter order; a "
                        "bucket closes as soon as it holds at least bucket_bytes bytes)")
    else:
        earned += 0.2 * points
    blocking = _first(results, lambda s: not all(async_op for _, async_op in s["calls"]))
    early = _first(results, lambda s: s["during_backward"] < len(s["calls"]),
                   ranks=range(0, world_size, 2))   # the ranks that use every parameter
    if blocking:
        rank, step, _ = blocking
        problems.append(f"rank {rank}, step {step}: an all-reduce was blocking: start each "
                        "with async_op=True and wait for it in finish(), so that backward "
                        "goes on while the bucket travels")
    elif early:
        rank, step, s = early
        problems.append(f"rank {rank}, step {step}: only {s['during_backward']} of "
                        f"{len(s['calls'])} all-reduces started before backward() returned; "
                        "this rank used every parameter, so every bucket fills during "
                        "backward: launch it from the hook that completes it")
    else:
        earned += 0.2 * points
    if problems:
        return Verdict(False, "the gradients are right on every rank and step, but\n"
                              + "\n".join(problems), earned, points)
    return Verdict(True, f"{num_steps} steps on {world_size} ranks equal single-process SGD "
                         f"(frozen layer untouched, tied weight once, the branch odd ranks "
                         f"skip as zeros), with {len(buckets)} asynchronous bucket "
                         "all-reduce(s) per step, started during backward", points, points)


def bucket_numels(params: list[torch.Tensor], bucket_bytes: int) -> list[int]:
    """Elements of each bucket, in launch order: reverse parameter order, each bucket closed
    as soon as it holds at least ``bucket_bytes`` bytes (so it may exceed it by one tensor)."""
    sizes, numel, nbytes = [], 0, 0
    for p in reversed(params):
        numel, nbytes = numel + p.numel(), nbytes + p.numel() * p.element_size()
        if nbytes >= bucket_bytes:
            sizes.append(numel)
            numel, nbytes = 0, 0
    return sizes + ([numel] if numel else [])


# -- what runs on each rank -------------------------------------------------------------------

class _Recorder:
    """Wraps ``torch.distributed.all_reduce`` in this worker: ``calls`` is ``[(numel, async)]``."""

    def __enter__(self):
        self.calls, self._original = [], dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            async_op = kwargs.get("async_op", args[2] if len(args) > 2 else False)
            self.calls.append((tensor.numel(), bool(async_op)))
            return self._original(tensor, *args, **kwargs)
        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _run_average(student_fn: Callable, dtype: torch.dtype):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = ExerciseModel(dtype)
    _backward(model, rank, world_size, 0, dtype)
    with _Recorder() as recorder, forbid(*FORBIDDEN, why=WHY):
        student_fn(model, None)
    return _grads(model), recorder.calls


def _run_ddp(student_cls, bucket_bytes: int, num_steps: int, dtype: torch.dtype):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = ExerciseModel(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    with _Recorder() as recorder, forbid(*FORBIDDEN, why=WHY):
        ddp = student_cls(model, bucket_bytes, None)
        for step in range(num_steps):
            optimizer.zero_grad(set_to_none=True)
            first = len(recorder.calls)
            _backward(model, rank, world_size, step, dtype)   # the hooks fire in here
            during_backward = len(recorder.calls) - first
            ddp.finish()
            steps.append({"grads": _grads(model), "calls": recorder.calls[first:],
                          "during_backward": during_backward})
            optimizer.step()
    return steps


# -- what is right ----------------------------------------------------------------------------

def _batch(rank: int, world_size: int, step: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1000 + step)
    X = torch.randn(4 * world_size, 5, generator=g, dtype=dtype)
    y = torch.randn(4 * world_size, 1, generator=g, dtype=dtype)
    return X[rank::world_size], y[rank::world_size]     # disjoint shards, 4 rows each


def _loss(model: nn.Module, rank: int, world_size: int, step: int, dtype: torch.dtype):
    X, y = _batch(rank, world_size, step, dtype)
    return F.mse_loss(model(X, use_branch=rank % 2 == 0), y)   # odd ranks skip the branch


def _backward(model, rank, world_size, step, dtype) -> None:
    _loss(model, rank, world_size, step, dtype).backward()


def _grads(model: nn.Module) -> dict:
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()}


def _local_grads(model, rank, world_size, step, dtype) -> dict:
    model.zero_grad(set_to_none=True)
    _backward(model, rank, world_size, step, dtype)
    return _grads(model)


def _mean_grads(model, world_size, step, dtype) -> dict:
    """Single-process: the gradient of the mean of the ranks' losses (left in ``.grad``)."""
    model.zero_grad(set_to_none=True)
    losses = [_loss(model, r, world_size, step, dtype) for r in range(world_size)]
    (sum(losses) / world_size).backward()
    return _grads(model)


def _wrong_gradient(grads: dict, want: dict, local: dict, rank: int, world_size: int,
                    where: str = "") -> str | None:
    """None if ``grads`` are the mean gradients; else what is wrong, naming the parameter."""
    for name, w in want.items():
        got = grads[name]
        if w is None:
            if got is not None:
                return (f"rank {rank}{where}: the frozen parameter '{name}' now has a gradient; "
                        "leave parameters with requires_grad=False alone")
            continue
        if got is None:
            return (f"rank {rank}{where}: '{name}' has no gradient. This rank's forward skipped "
                    "it, but it counts as zeros: give it a zero gradient and average it, so "
                    "every rank packs the same parameters")
        if torch.allclose(got, w, rtol=1e-5, atol=1e-6):
            continue
        hint = ""
        if local[name] is not None and torch.allclose(got, local[name], rtol=1e-5, atol=1e-6):
            hint = " That is this rank's own gradient: no communication reached it."
        elif torch.allclose(got, w * world_size, rtol=1e-5, atol=1e-6):
            hint = " That is the sum over ranks: divide by the world size."
        elif name == "a.weight":
            hint = " This weight is shared by layers a and b: average it exactly once."
        err = (got - w).abs().max().item()
        return (f"rank {rank}{where}: the gradient of '{name}' is off by up to {err:.3g} from "
                f"the mean over {world_size} ranks (expected {_head(w)}, got {_head(got)}).{hint}")
    return None


def _first(results: list, bad: Callable, ranks=None):
    """``(rank, step, record)`` of the first step record for which ``bad`` holds, or None."""
    for rank in (range(len(results)) if ranks is None else ranks):
        for step, record in enumerate(results[rank]):
            if bad(record):
                return rank, step, record
    return None


def _head(t: torch.Tensor) -> str:
    values = ", ".join(f"{v:.4g}" for v in t.reshape(-1)[:3].tolist())
    return f"[{values}{', ...' if t.numel() > 3 else ''}]"


def _require_ranks(world_size) -> None:
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= MAX_RANKS,
                f"an int in 1..{MAX_RANKS}")
