"""Lab 05's assignment: Megatron's f and g (part A), the parallel linears and 1F1B (part B).

Part A, two ``torch.autograd.Function`` classes (Shoeybi et al. 2019, "Megatron-LM", section
3): ``CopyToParallel`` (*f*: identity forward, all-reduce of the gradient backward) and
``ReduceFromParallel`` (*g*: all-reduce forward, identity backward), each applied as
``Cls.apply(x, group)``. The checker runs both forward *and* backward on real processes,
counts the all-reduces of each direction in the :mod:`distlab.comm` ledger, and says which
direction of which function is wrong, rank by rank.

Part B: ``column_parallel_linear(x, weight_shard, bias_shard, group)`` (``f(x) W_r^T + b_r``)
and ``row_parallel_linear(x_shard, weight_shard, bias, group)`` (``g(x_r W_r^T) + b``),
checked as Megatron's MLP block ``relu(X A^T + a) B^T + b``, output and every gradient,
against the unsplit block; ``one_f_one_b(num_stages, num_microbatches, stage)``, a stage's
order of work under 1F1B (Narayanan et al. 2021), against
:func:`distlab.model_parallel.pipeline.schedule` (off limits while the student's code runs);
``pipeline_step(layers, order, inputs, loss_fn, group)``, one training step of a stage by that
order, against one backward pass of the unsplit model.

Cost (alpha-beta, ring all-reduce of n bytes over p ranks, 2(p-1)·alpha + 2(p-1)/p·n·beta):
the block makes one all-reduce of the activations forward (g) and one of their gradient
backward (f); the weights never move.
"""
from __future__ import annotations

from typing import Callable

import torch

from distlab.checks import is_int, require_arg
from distlab.exercises import Verdict, forbid, launch_student
from distlab.exercises.pipeline_step import (BATCH, LAYERS, fmt as _fmt, pipeline_problem,
                                             run_pipeline_step)
from distlab.model_parallel import pipeline

TP = "distlab.model_parallel.tensor_parallel."
OFF_LIMITS = (TP + "CopyToParallelRegion.forward", TP + "CopyToParallelRegion.backward",
              TP + "ReduceFromParallelRegion.forward", TP + "ReduceFromParallelRegion.backward",
              TP + "ColumnParallelLinear.forward", TP + "RowParallelLinear.forward",
              "distlab.model_parallel.pipeline.schedule",
              "distlab.model_parallel.pipeline.PipelineStage.train_step")
WHY = "this assignment is Megatron's f and g, its parallel linears and the 1F1B order"
D_IN, D_OUT = 6, 3
SCHEDULE_CASES = ((4, 6), (4, 2), (2, 1))
"""(num_stages, num_microbatches) of the visible check: steady state, a short pipeline, m=1."""


# ----------------------------------------------------------------------------------------
# Part A: f and g, forward and backward.
# ----------------------------------------------------------------------------------------

def check_f_and_g(f_cls, g_cls, *, points: float, world_size: int = 2,
                  numel: int = 6) -> Verdict:
    """Run ``f_cls.apply(x, None)`` and ``g_cls.apply(x, None)`` forward and backward on
    ``world_size`` real processes, rank r's ``x`` and upstream gradient distinct per rank.

    Points: each function half; within it, the backward counts twice the forward.
    """
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= 8,
                "an int in 1..8")
    require_arg("numel", numel, is_int(numel) and numel >= 1, "an int >= 1")
    results, failed = launch_student(
        "CopyToParallel or ReduceFromParallel", f_cls, _run_f_and_g, world_size, f_cls, g_cls,
        numel, points=points,
        hang_hint="every rank must make the same all-reduces, in the same direction")
    if failed is not None:
        return failed
    inputs = torch.stack([_values(r, numel, 1.0) for r in range(world_size)])    # (p, n)
    upstream = torch.stack([_values(r, numel, -0.5) for r in range(world_size)])  # (p, n)
    rules = {"f": ((lambda r: inputs[r], "the identity", 0),
                   (lambda r: upstream.sum(0), "the all-reduce (sum) of the gradient", 1)),
             "g": ((lambda r: inputs.sum(0), "the all-reduce (sum) of the ranks' inputs", 1),
                   (lambda r: upstream[r], "the identity", 0))}
    problems, earned = [], 0.0
    for name, directions in rules.items():
        for direction, share, rule in zip(("forward", "backward"), (1 / 6, 2 / 6), directions):
            problem = _direction_problem(results, name, direction, *rule, inputs, upstream)
            problems += [problem] if problem else []
            earned += 0 if problem else share
    case = f"{world_size} ranks, {numel} elements"
    if not problems:
        return Verdict(True, f"{case}: f is the identity forward and all-reduces the gradient "
                             "backward, g the reverse, one all-reduce each", points, points)
    return Verdict(False, f"{case}: " + "\n".join(problems), round(points * earned, 6), points)


def _run_f_and_g(f_cls, g_cls, numel):
    import torch.distributed as dist
    from distlab import comm
    rank, out = dist.get_rank(), {}
    for name, cls in (("f", f_cls), ("g", g_cls)):
        x = _values(rank, numel, 1.0).requires_grad_()
        comm.ledger().reset()
        with forbid(*OFF_LIMITS, why=WHY):
            y = cls.apply(x, None)
        forward_calls = comm.ledger().by_op().get("all_reduce", {}).get("calls", 0)
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            out[name] = {"error": f"its forward returned {type(y).__name__} that autograd "
                                  "does not track: return a tensor (e.g. x.view_as(x))"}
            continue
        comm.ledger().reset()
        with forbid(*OFF_LIMITS, why=WHY):
            y.backward(_values(rank, numel, -0.5))
        out[name] = {"forward": y.detach().clone(), "forward_calls": forward_calls,
                     "backward": None if x.grad is None else x.grad.clone(),
                     "backward_calls": comm.ledger().by_op().get("all_reduce", {}).get("calls", 0),
                     "x_kept": torch.equal(x.detach(), _values(rank, numel, 1.0))}
    return out


def _direction_problem(results, name, direction, want, rule, calls, inputs, upstream):
    label = {"f": "f (CopyToParallel)", "g": "g (ReduceFromParallel)"}[name]
    for rank, res in enumerate(results):
        res = res[name]
        if "error" in res:
            return f"rank {rank}: {label}: {res['error']}"
        got = res[direction]
        expected = want(rank)
        if got is None or got.shape != expected.shape:
            return (f"rank {rank}: {label} {direction}: the input's gradient is "
                    f"{'missing' if got is None else tuple(got.shape)}; expected {rule}")
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
            return (f"rank {rank}: {label} {direction} gave {_fmt(got)}, which is "
                    f"{_what(got, rank, inputs if direction == 'forward' else upstream)}; "
                    f"its {direction} is {rule}: {_fmt(expected)}")
        if direction == "forward" and not res["x_kept"]:
            return (f"rank {rank}: {label} forward is right but changed its input x in place: "
                    "all-reduce a copy (x.clone())")
        if res[f"{direction}_calls"] != calls and len(results) > 1:
            return (f"rank {rank}: {label} {direction} is right but made "
                    f"{res[f'{direction}_calls']} all-reduce calls through distlab.comm; "
                    f"expected {calls} (use comm.all_reduce, so the lab counts it)")
    return None


def _what(got, rank, per_rank) -> str:
    for text, value in (("this rank's own value", per_rank[rank]),
                        ("the sum over the ranks", per_rank.sum(0)),
                        ("the mean over the ranks", per_rank.mean(0)),
                        ("zero", torch.zeros_like(got))):
        if torch.allclose(got, value, rtol=1e-5, atol=1e-5):
            return text
    return "none of this rank's value, the sum or the mean"


def _values(rank: int, numel: int, scale: float) -> torch.Tensor:
    i = torch.arange(numel, dtype=torch.float32)
    return scale * ((rank + 1.0) * (i + 1) + 3.0 * rank * (-1) ** i)


# ----------------------------------------------------------------------------------------
# Part B: the parallel linears and the 1F1B order.
# ----------------------------------------------------------------------------------------

def check_model_parallel(column_fn: Callable, row_fn: Callable, schedule_fn: Callable,
                         step_fn: Callable, *, points: float, world_size: int = 2,
                         hidden: int = 8, schedules=SCHEDULE_CASES, num_stages: int = 4,
                         num_microbatches: int = 3) -> Verdict:
    """Megatron's MLP block ``relu(X A^T + a) B^T + b`` split over ``world_size`` real
    processes with the student's linears, forward and backward against the unsplit block
    (1.5 of 7 points each layer); each stage's 1F1B order for every ``(num_stages,
    num_microbatches)`` in ``schedules`` (1 point); then one 1F1B training step of
    ``step_fn`` on ``num_stages`` processes against the unsplit model's loss and gradients
    (3 points).
    """
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= 8,
                "an int in 1..8")
    require_arg("hidden", hidden, is_int(hidden) and hidden >= 1 and hidden % world_size == 0,
                f"a multiple of world_size={world_size}")
    for p, m in schedules:
        require_arg("schedules", (p, m), is_int(p) and is_int(m) and p >= 1 and m >= 1,
                    "pairs (num_stages, num_microbatches) of ints >= 1")
    require_arg("num_stages", num_stages, is_int(num_stages) and 1 <= num_stages <= LAYERS,
                f"an int in 1..{LAYERS}")
    require_arg("num_microbatches", num_microbatches, is_int(num_microbatches)
                and 1 <= num_microbatches <= BATCH, f"an int in 1..{BATCH}")
    results, failed = launch_student(
        "column_parallel_linear, row_parallel_linear or one_f_one_b", column_fn, _run_block,
        world_size, column_fn, row_fn, schedule_fn, hidden, tuple(schedules), points=points,
        hang_hint="every rank must make the same all-reduces, in the same order")
    if failed is None:
        want = _unsplit_block(hidden, world_size)
        found = {"column": _layer_problem(results, want, ("h", "dA", "da", "dX"), "column"),
                 "row": _layer_problem(results, want, ("Y", "dB", "db"), "row"),
                 "schedule": _schedule_problem(results[0]["schedules"], schedules)}
    else:
        found = {"column": failed.message, "row": "", "schedule": ""}
    stages, failed = launch_student(
        "pipeline_step", step_fn, run_pipeline_step, num_stages, step_fn, num_microbatches,
        OFF_LIMITS, WHY,
        points=points, hang_hint="send with comm.isend (a blocking send waits for a neighbour "
        "that may be waiting for you) and wait for those sends at the end of the step")
    found["pipeline"] = (failed.message if failed is not None
                         else pipeline_problem(stages, num_microbatches))
    shares = {"column": 1.5, "row": 1.5, "schedule": 1, "pipeline": 3}
    earned = sum(shares[k] for k, problem in found.items() if problem is None)
    problems = [p for p in found.values() if p]
    case = f"{world_size} ranks, hidden width {hidden}"
    if not problems:
        return Verdict(True, f"{case}: the split block equals the unsplit one forward and "
                             f"backward, every stage's order is 1F1B for {list(schedules)}, "
                             f"and your 1F1B step on {num_stages} stages and {num_microbatches} "
                             "microbatches equals the unsplit model's", points, points)
    return Verdict(False, f"{case}: " + "\n".join(problems), points * earned / 7, points)


def _problem_tensors(hidden: int):
    g = torch.Generator().manual_seed(5)
    return {"X": torch.randn(BATCH, D_IN, generator=g), "A": torch.randn(hidden, D_IN, generator=g),
            "a": torch.randn(hidden, generator=g), "B": torch.randn(D_OUT, hidden, generator=g),
            "b": torch.randn(D_OUT, generator=g), "T": torch.randn(BATCH, D_OUT, generator=g)}


def _run_block(column_fn, row_fn, schedule_fn, hidden, schedules):
    import torch.distributed as dist
    rank, p = dist.get_rank(), dist.get_world_size()
    t = _problem_tensors(hidden)
    # This rank's slices: A by rows (its hidden units, (h/p, in)), B by columns ((out, h/p)).
    X = t["X"].clone().requires_grad_()
    A = t["A"].chunk(p, 0)[rank].clone().requires_grad_()
    a = t["a"].chunk(p, 0)[rank].clone().requires_grad_()
    B = t["B"].chunk(p, 1)[rank].clone().requires_grad_()
    b = t["b"].clone().requires_grad_()
    with forbid(*OFF_LIMITS, why=WHY):
        h = column_fn(X, A, a, None)                   # (batch, h/p)
        Y = row_fn(torch.relu(h), B, b, None)          # (batch, out)
        (Y * t["T"]).sum().backward()
    grads = {name: None if v.grad is None else v.grad.clone()
             for name, v in (("dX", X), ("dA", A), ("da", a), ("dB", B), ("db", b))}
    out = {"h": h.detach().clone(), "Y": Y.detach().clone(), **grads, "schedules": None}
    if rank == 0:
        with forbid(*OFF_LIMITS, why=WHY):
            orders = [[schedule_fn(n, m, s) for s in range(n)] for n, m in schedules]
        out["schedules"] = [[_picklable(order) for order in case] for case in orders]
    return out


def _picklable(order):
    """The student's order as a list of tuples, or its text if it is not a list of pairs."""
    steps = list(order) if hasattr(order, "__iter__") and not isinstance(order, str) else None
    if steps is None or any(isinstance(s, str) or not hasattr(s, "__iter__") for s in steps):
        return f"{order if steps is None else steps!r:.80}"
    return [tuple(step) for step in steps]


def _unsplit_block(hidden: int, world_size: int) -> list[dict]:
    """Each rank's expected slices of the unsplit block's output and gradients."""
    t = {k: v.clone().requires_grad_() for k, v in _problem_tensors(hidden).items()}
    h = t["X"] @ t["A"].T + t["a"]                      # (batch, hidden)
    Y = torch.relu(h) @ t["B"].T + t["b"]               # (batch, out)
    (Y * t["T"]).sum().backward()
    return [{"h": h.detach().chunk(world_size, 1)[r], "Y": Y.detach(), "dX": t["X"].grad,
             "dA": t["A"].grad.chunk(world_size, 0)[r], "da": t["a"].grad.chunk(world_size, 0)[r],
             "dB": t["B"].grad.chunk(world_size, 1)[r], "db": t["b"].grad}
            for r in range(world_size)]


NAMES = {"h": "the column-parallel output X A_r^T + a_r", "dA": "the gradient of its A_r",
         "da": "the gradient of its a_r", "dX": "the gradient of the input X (f's backward)",
         "Y": "the row-parallel output Y", "dB": "the gradient of its B_r",
         "db": "the gradient of the bias b"}
HINTS = {"dX": " It must be the sum of every rank's contribution: does the column-parallel "
               "layer apply f (CopyToParallel) to x?",
         "Y": " The partial products must be summed by g (ReduceFromParallel), and the bias "
              "added once, after the sum."}


def _layer_problem(results, want, keys, layer) -> str | None:
    for rank, res in enumerate(results):
        for key in keys:
            got, expected = res[key], want[rank][key]
            if got is None or got.shape != expected.shape:
                return (f"rank {rank}, {layer}-parallel layer: {NAMES[key]} is "
                        f"{'missing' if got is None else f'of shape {tuple(got.shape)}'}; "
                        f"expected shape {tuple(expected.shape)}")
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                i = int((~torch.isclose(got, expected, rtol=1e-4, atol=1e-5)).nonzero()[0][0])
                return (f"rank {rank}, {layer}-parallel layer: {NAMES[key]} is wrong, row {i}: "
                        f"got {_fmt(got[i])}, expected {_fmt(expected[i])}.{HINTS.get(key, '')}")
    return None


def _schedule_problem(got_cases, cases) -> str | None:
    for (p, m), got_stages in zip(cases, got_cases):
        for stage, got in enumerate(got_stages):
            want = pipeline.schedule("1f1b", p, m, stage)
            try:
                got = [(str(op), int(i)) for op, i in got] if isinstance(got, list) else got
            except (TypeError, ValueError):
                got = f"{got!r:.80}"
            if isinstance(got, str):
                return (f"p={p}, m={m}, stage {stage}: the order must be a list of "
                        f"(\"F\" or \"B\", microbatch) pairs, got {got}")
            if got == want:
                continue
            k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got),
                                                                                  len(want)))
            found = f"{got[k]}" if k < len(got) else "the end of the list"
            expected = f"{want[k]}" if k < len(want) else "the end of the list"
            warmup = min(p - stage - 1, m)
            return (f"p={p}, m={m}, stage {stage}: step {k} of its order is {found}, expected "
                    f"{expected}. Under 1F1B stage s first runs min(p-s-1, m) = {warmup} "
                    "warm-up forwards, then alternates one forward and one backward, then "
                    "runs the remaining backwards; at most p - s microbatches are in flight.")
    return None
