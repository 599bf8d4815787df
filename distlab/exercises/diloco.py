"""Lab 10's assignment: DiLoCo's averaged pseudo-gradient (part A), then one DiLoCo round
(part B), both checked on real processes against one process playing every worker.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105, algorithm 1): from the shared global
parameters θ each worker takes H inner steps with its own inner optimizer (AdamW), the
workers average their pseudo-gradients Δ_r = θ − θ_r with one all-reduce of n values
(``2(p-1) alpha + 2(p-1)/p·4n beta`` per round: H times fewer bytes than DDP), the outer
SGD with Nesterov momentum steps θ with Δ as its gradient, and every worker restarts at the
new θ (its inner optimizer's state is kept).

* ``outer_gradient(start_params, worker_params, group=None) -> [Δ per parameter]``: the mean
  over the ranks of ``start − worker``, with one all-reduce.
* ``diloco_round(model, inner_opt, outer_opt, start, batches, loss_fn, group=None)``: one
  round; afterwards ``start`` holds the new θ and the model's parameters equal it.

What is right is computed here with ``torch.optim`` in one process (:func:`_reference`), the
arithmetic of :mod:`distlab.communication_efficient.diloco`, whose functions are off limits
(:data:`FORBIDDEN`), as is distlab's gradient averaging. The mistakes students make (the sum
instead of the mean, Δ with the wrong sign, each rank's own Δ, the outer step before Δ is in
``.grad``, no reset) are recognized on the first round and named.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distlab.checks import is_int, is_number, require_arg
from distlab.exercises import Verdict, forbid, launch_student, require_case

FORBIDDEN = tuple(f"distlab.communication_efficient.diloco.{name}" for name in (
    "train", "reference", "outer_optimizer", "inner_step", "assign_grads", "Worker.step")
) + ("distlab.communication_efficient.streaming_diloco.train",
     "distlab.data_parallel.ddp.average_gradients")
"""What the student may not call: distlab's DiLoCo and its one gradient averaging."""
WHY = "write the pseudo-gradient, its average and the round yourself"
HANG_HINT = ("every rank must make the same all-reduce calls in the same order, with "
             "tensors of the same size")
INNER_LR = 0.05
BATCH = 4
POINTS_B = {"outer": 5 / 8, "reset": 2 / 8, "traffic": 1 / 8}
"""How part B's points are shared: θ after every round, the reset workers, one all-reduce."""
MISTAKES = {
    "sum": "That is the sum over the ranks of the pseudo-gradients: divide by the number of ranks.",
    "sign": "That is a step with −Δ: the pseudo-gradient is θ_start − θ_worker (start minus worker).",
    "own": "That is this rank's own pseudo-gradient: all-reduce it and divide by the ranks.",
    "stale": ("θ did not move in the first round: put the averaged Δ in each start parameter's "
              ".grad BEFORE outer_opt.step()."),
}


def check_outer_gradient(student_fn: Callable, *, points: float, world_size: int = 2,
                         dtype: torch.dtype = torch.float32) -> Verdict:
    """Part A: ``student_fn(start_params, worker_params, None)`` on ``world_size`` ranks, the
    start the same everywhere and each rank's worker parameters its own.

    All the points: every rank returns the mean over the ranks of ``start − worker``, one
    tensor per parameter, with one all-reduce; half of them with more than one.
    """
    require_case(world_size, 1, dtype, points)
    results, failed = launch_student("outer_gradient", student_fn, _run_outer_gradient,
                                     world_size, student_fn, dtype, points=points,
                                     timeout=60, hang_hint=HANG_HINT)
    if failed is not None:
        return failed
    case = f"{_ranks(world_size)}, {str(dtype).removeprefix('torch.')}"
    start = _params(_model(dtype))
    workers = [_moved(start, r) for r in range(world_size)]
    deltas = [[s.detach() - w for s, w in zip(start, ws)] for ws in workers]
    want = [torch.stack(d).mean(0) for d in zip(*deltas)]
    for rank, (got, calls) in enumerate(results):
        if isinstance(got, str):
            return Verdict(False, f"{case}: rank {rank}: {got}", 0.0, points)
        variants = {"sum": [w * world_size for w in want], "sign": [-w for w in want],
                    "own": deltas[rank]}
        problem = _mismatch(got, want, f"rank {rank}", variants, dtype)
        if problem:
            return Verdict(False, f"{case}: {problem}", 0.0, points)
    for rank, (_, calls) in enumerate(results):
        if calls != 1:
            return Verdict(False, f"{case}: the average is right, but rank {rank} made {calls} "
                                  "all-reduce calls: flatten the Δs into one buffer "
                                  "(torch.cat) and all-reduce it once", points / 2, points)
    return Verdict(True, f"{case}: every rank holds the averaged pseudo-gradient of every "
                         "parameter, from one all-reduce", points, points)


def check_diloco_round(student_fn: Callable, *, points: float, world_size: int = 2,
                       inner_steps: int = 3, rounds: int = 3, outer_lr: float = 0.7,
                       outer_momentum: float = 0.9,
                       dtype: torch.dtype = torch.float32) -> Verdict:
    """Part B: ``rounds`` calls of ``student_fn(model, inner_opt, outer_opt, start, batches,
    loss_fn)`` on ``world_size`` ranks (AdamW inner, Nesterov SGD outer), compared after every
    round with one process playing every worker.

    Points (:data:`POINTS_B`): 5/8 θ (``start``) right on every rank after every round; 2/8
    every worker reset to its θ; 1/8 (with θ right) each rank all-reduced the n values of Δ
    once per round and nothing else.
    """
    require_case(world_size, 1, dtype, points)
    require_arg("inner_steps", inner_steps, is_int(inner_steps) and 1 <= inner_steps <= 20,
                "an int in 1..20")
    require_arg("rounds", rounds, is_int(rounds) and 1 <= rounds <= 10, "an int in 1..10")
    require_arg("outer_lr", outer_lr, is_number(outer_lr) and 0 < outer_lr <= 10, "(0, 10]")
    require_arg("outer_momentum", outer_momentum,
                is_number(outer_momentum) and 0 <= outer_momentum < 1, "[0, 1)")
    setting = (world_size, inner_steps, rounds, outer_lr, outer_momentum, dtype)
    results, failed = launch_student("diloco_round", student_fn, _run_round, world_size,
                                     student_fn, *setting, points=points, timeout=60,
                                     hang_hint=HANG_HINT)
    if failed is not None:
        return failed
    case = (f"{_ranks(world_size)}, H={inner_steps}, {rounds} rounds, outer lr {outer_lr}, "
            f"momentum {outer_momentum}, {str(dtype).removeprefix('torch.')}")
    right = _reference(*setting)
    mistakes = {v: _reference(*setting, variant=v)["theta"][0] for v in MISTAKES}
    n = sum(w.numel() for w in right["theta"][0][0])
    outer = reset = traffic = None
    for k in range(rounds):
        for rank, records in enumerate(results):
            if isinstance(records[k], str):
                return Verdict(False, f"{case}: round {k}, rank {rank}: {records[k]}", 0.0, points)
            theta, local, numel = records[k]
            where = f"round {k}, rank {rank}"
            if outer is None:
                variants = {v: m[rank] for v, m in mistakes.items()} if k == 0 else {}
                outer = _mismatch(theta, right["theta"][k][rank], f"{where}: θ (start)",
                                  variants, dtype)
            if reset is None:
                reset = _mismatch(local, theta, f"{where}: the model after the round",
                                  {}, dtype, want_name="θ")
                if reset and k == 0 and _close(local, right["inner"][0][rank], dtype):
                    reset += (" The model still holds its inner-step parameters: copy the new "
                              "θ into it (w.copy_(θ) under torch.no_grad()).")
            if traffic is None and world_size > 1 and numel != n:
                traffic = (f"{where}: all-reduced {numel} values; a DiLoCo round all-reduces "
                           f"the n = {n} values of Δ once (nothing during the inner steps)")
    earned = points * (POINTS_B["outer"] * (outer is None) + POINTS_B["reset"] * (reset is None)
                       + POINTS_B["traffic"] * (outer is None and traffic is None))
    problems = [p for p in (outer, reset, traffic if outer is None else None) if p]
    if problems:
        return Verdict(False, f"{case}: " + "\n".join(problems), round(earned, 6), points)
    return Verdict(True, f"{case}: every rank's θ follows the one-process DiLoCo after every "
                         f"round, the workers restart at θ, and each round all-reduced the "
                         f"{n} values of Δ once", points, points)


# ----------------------------------------------------------------------------------------
# On each rank: the student's function, with what it returned and what it sent.
# ----------------------------------------------------------------------------------------

class _Counter:
    """Wraps ``torch.distributed.all_reduce`` (which ``comm.all_reduce`` calls) in this
    worker: ``calls`` and ``numel`` all-reduced so far."""

    def __enter__(self):
        self.calls, self.numel, self._original = 0, 0, dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            self.calls, self.numel = self.calls + 1, self.numel + tensor.numel()
            return self._original(tensor, *args, **kwargs)
        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _run_outer_gradient(student_fn, dtype):
    rank = dist.get_rank()
    start = _params(_model(dtype))
    worker = [nn.Parameter(w) for w in _moved(start, rank)]
    with _Counter() as counter, forbid(*FORBIDDEN, why=WHY):
        returned = student_fn(start, worker)
    return _tensors(returned, start), counter.calls


def _run_round(student_fn, world_size, inner_steps, rounds, outer_lr, outer_momentum, dtype):
    """``[(θ, the model's parameters, values all-reduced)]`` after each round."""
    rank = dist.get_rank()
    model, start = _model(dtype), _params(_model(dtype))
    inner = torch.optim.AdamW(model.parameters(), lr=INNER_LR)
    outer = _outer(start, outer_lr, outer_momentum)
    records = []
    for k in range(rounds):
        batches = [_batch(rank, k, h, dtype) for h in range(inner_steps)]
        with _Counter() as counter, forbid(*FORBIDDEN, why=WHY):
            returned = student_fn(model, inner, outer, start, batches, F.mse_loss)
        if returned is not None:
            records.append(f"returned a {type(returned).__name__}; return nothing (None): "
                           "the round changes start and the model in place")
            break
        records.append((_copies(start), _copies(model.parameters()), counter.numel))
    return records


def _tensors(returned, like):
    """The returned Δs as tensors, or a sentence saying what came back instead."""
    if isinstance(returned, (list, tuple)) and len(returned) == len(like) and all(
            isinstance(t, torch.Tensor) and t.shape == w.shape for t, w in zip(returned, like)):
        return _copies(returned)
    what = type(returned).__name__
    if isinstance(returned, (list, tuple)):
        what = f"{what} of {len(returned)}: " + ", ".join(
            f"{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            for t in returned)
    return (f"returned a {what}; return a list of {len(like)} tensors, one shaped like each "
            f"parameter ({', '.join(str(tuple(w.shape)) for w in like)})")


# ----------------------------------------------------------------------------------------
# What is right, computed in one process.
# ----------------------------------------------------------------------------------------

NAMES = ("inp.weight", "inp.bias", "out.weight", "out.bias")


def _model(dtype) -> nn.Module:
    """The same small MLP on every rank (a fixed seed): 4 -> 6 -> 2."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(inp=nn.Linear(4, 6), act=nn.Tanh(),
                                         out=nn.Linear(6, 2))).to(dtype)


def _params(model) -> list:
    return list(model.parameters())


def _moved(start, rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s worker parameters for part A: the start moved by its own noise."""
    g = torch.Generator().manual_seed(100 + rank)
    return [(w.detach() + torch.randn(w.shape, generator=g, dtype=torch.float64)
             .to(w.dtype)) for w in start]


def _batch(rank: int, k: int, h: int, dtype):
    """Rank ``rank``'s ``(X, y)`` for inner step ``h`` of round ``k`` (its own data)."""
    g = torch.Generator().manual_seed(10_007 * k + 101 * h + rank)
    X = torch.randn(BATCH, 4, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 2, generator=g, dtype=torch.float64) + rank
    return X.to(dtype), y.to(dtype)


def _outer(params, lr, momentum) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


def _copies(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _reference(world_size, inner_steps, rounds, outer_lr, outer_momentum, dtype,
               variant: str = "right") -> dict:
    """Every rank's θ and worker parameters after the inner steps, ``[round][rank]``, with
    the mistake ``variant`` (one of :data:`MISTAKES`) or none (``"right"``)."""
    models = [_model(dtype) for _ in range(world_size)]
    inners = [torch.optim.AdamW(m.parameters(), lr=INNER_LR) for m in models]
    thetas = [_params(_model(dtype)) for _ in range(world_size)]
    outers = [_outer(t, outer_lr, outer_momentum) for t in thetas]
    out, previous = {"theta": [], "inner": []}, None
    for k in range(rounds):
        for rank, (model, inner) in enumerate(zip(models, inners)):
            for h in range(inner_steps):
                X, y = _batch(rank, k, h, dtype)
                inner.zero_grad()
                F.mse_loss(model(X), y).backward()
                inner.step()
        out["inner"].append([_copies(m.parameters()) for m in models])
        deltas = [[t.detach() - w.detach() for t, w in zip(theta, m.parameters())]
                  for theta, m in zip(thetas, models)]
        mean = [torch.stack(d).mean(0) for d in zip(*deltas)]
        for rank, (theta, outer) in enumerate(zip(thetas, outers)):
            grads = {"right": mean, "sum": [d * world_size for d in mean],
                     "sign": [-d for d in mean], "own": deltas[rank], "stale": previous}[variant]
            for w, d in zip(theta, grads or [None] * len(theta)):
                w.grad = None if d is None else d.clone()
            outer.step()
            with torch.no_grad():
                for w, t in zip(models[rank].parameters(), theta):
                    w.copy_(t)
        previous = mean
        out["theta"].append([_copies(theta) for theta in thetas])
    return out


# ----------------------------------------------------------------------------------------
# Explaining what is wrong: the round, the rank, the parameter, expected against got.
# ----------------------------------------------------------------------------------------

def _ranks(world_size: int) -> str:
    return f"{world_size} rank{'s' if world_size > 1 else ''}"


def _tolerance(dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


def _close(got, want, dtype) -> bool:
    return all(g.shape == w.shape and torch.allclose(g, w, **_tolerance(dtype))
               for g, w in zip(got, want))


def _mismatch(got, want, where, variants, dtype, want_name="expected") -> str | None:
    """None when ``got`` equals ``want`` parameter by parameter; else the first parameter
    and element that differ, and the mistake among ``variants`` that ``got`` equals."""
    for name, g, w in zip(NAMES, got, want):
        if g.shape != w.shape:
            return f"{where}: {name} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        bad = ~torch.isclose(g, w, **_tolerance(dtype))
        if bad.any():
            e = tuple(int(i) for i in bad.nonzero()[0])
            hint = next((MISTAKES[v] for v, alt in variants.items() if _close(got, alt, dtype)),
                        "")
            return (f"{where}: {name}{list(e)} is {g[e].item():.6g}, {want_name} "
                    f"{w[e].item():.6g}. {hint}".rstrip())
    return None
