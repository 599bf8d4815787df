"""Lab 00's assignment: the global mean (part A) and one data-parallel step by hand (part B).

Part A, ``global_mean(x, group=None)``: every rank passes its own ``x`` and gets back the
element-wise mean over the ranks, its caller's ``x`` untouched.

Part B, ``data_parallel_step(model, X, y, num_examples, lr, group=None) -> float``: every rank
holds a replica of the linear model and its own shard ``(X, y)`` of the data; one step of
full-batch gradient descent on the mean squared error over *all* ``num_examples`` examples,
with the gradient summed over the ranks by all-reduce and divided by ``num_examples``. It
returns the mean squared error over all examples before the step. The checker runs several
steps on real processes and compares each rank's parameters and loss, step by step, with
single-process gradient descent on the whole data set (computed here, from torch alone).
"""
from __future__ import annotations

from typing import Callable

import torch

from distlab.checks import is_int, is_number, require_arg
from distlab.exercises import Verdict, forbid, launch_student, require_case
from distlab.problems.data import linear_regression, shard_indices
from distlab.problems.models import linear

LOSS_SHARE = 0.25
"""Part B: the share of the points for the loss; the parameters earn the rest."""


# ----------------------------------------------------------------------------------------
# Part A: the mean over the ranks.
# ----------------------------------------------------------------------------------------

def check_global_mean(student_fn: Callable, *, points: float, world_size: int = 3,
                      numel: int = 3, dtype: torch.dtype = torch.float32) -> Verdict:
    """Run ``student_fn`` on ``world_size`` real processes; say whether each rank got the mean.

    Rank r passes ``x`` with distinct values per rank (so a sum, a rank-0 copy or a missing
    division are each recognisably wrong); every rank must return the mean, of ``x``'s shape
    and dtype, and leave ``x`` as it was.
    """
    require_case(world_size, numel, dtype, points)
    results, failed = launch_student("global_mean", student_fn, _run_global_mean, world_size,
                                     student_fn, numel, dtype, points=points,
                                     hang_hint="does every rank call the same collective?")
    if failed is not None:
        return failed
    values = [_local_value(r, numel, dtype) for r in range(world_size)]
    want, total = torch.stack(values).mean(0), torch.stack(values).sum(0)
    case = f"{world_size} ranks, {numel} elements, {_name(dtype)}"

    def fail(message):
        return Verdict(False, f"{case}: {message}", 0.0, points)

    for rank, (kind, out, x_after) in enumerate(results):
        if kind == "type":
            return fail(f"rank {rank} returned a {out}, not a torch.Tensor")
        if out.shape != want.shape or out.dtype != dtype:
            return fail(f"rank {rank} returned shape {tuple(out.shape)}, {_name(out.dtype)}; "
                        f"expected {tuple(want.shape)}, {_name(dtype)}: the shape and dtype of x")
        if not torch.allclose(out, want, rtol=1e-5, atol=1e-5):
            hint = ""
            if torch.allclose(out, total, atol=1e-5):
                hint = " That is the sum: divide by the number of ranks."
            elif torch.allclose(out, values[rank], atol=1e-5):
                hint = " That is this rank's own x: no communication happened."
            elif torch.allclose(out, values[0], atol=1e-5):
                hint = " That is rank 0's x: a broadcast, not an average."
            return fail(f"rank {rank} returned {_fmt(out)}, but the mean over {world_size} "
                        f"ranks is {_fmt(want)}.{hint}")
        if not torch.equal(x_after, values[rank]):
            return fail(f"rank {rank} got the mean, but its x changed from {_fmt(values[rank])} "
                        f"to {_fmt(x_after)}: all_reduce works in place, so reduce a copy")
    return Verdict(True, f"{case}: every rank got the mean {_fmt(want)}", points, points)


def _local_value(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    i = torch.arange(numel, dtype=dtype)
    return (rank + 1.0) * (i + 1) + 10.0 * rank * (-1) ** i - 2.0 * rank * rank


def _run_global_mean(student_fn: Callable, numel: int, dtype: torch.dtype):
    import torch.distributed as dist
    x = _local_value(dist.get_rank(), numel, dtype)
    out = student_fn(x)
    if not isinstance(out, torch.Tensor):
        return ("type", type(out).__name__, x)
    return ("tensor", out.detach().cpu(), x)


# ----------------------------------------------------------------------------------------
# Part B: one data-parallel step of gradient descent, by hand.
# ----------------------------------------------------------------------------------------

def check_data_parallel_step(student_fn: Callable, *, points: float, world_size: int = 4,
                             num_examples: int = 30, num_features: int = 4, num_steps: int = 3,
                             lr: float = 0.1, seed: int = 0) -> Verdict:
    """Run ``num_steps`` of ``student_fn`` on ``world_size`` real processes, each rank on its
    shard, and compare every rank's parameters and loss, step by step, with single-process
    full-batch gradient descent on all ``num_examples`` examples.

    The default 30 examples on 4 ranks make shards of 8, 8, 7 and 7: averaging the ranks'
    mean gradients (instead of summing and dividing by ``num_examples``) is then wrong, and
    the feedback says so. ``ddp.average_gradients`` is off limits: the all-reduce and the
    division are the exercise. The parameters earn 3/4 of the points, the loss 1/4.
    """
    require_case(world_size, 1, torch.float32, points)
    for name, value, low in (("num_examples", num_examples, world_size),
                             ("num_features", num_features, 1), ("num_steps", num_steps, 1)):
        require_arg(name, value, is_int(value) and value >= low, f"an int >= {low}")
    require_arg("lr", lr, is_number(lr) and lr > 0, "a number > 0")
    results, failed = launch_student(
        "data_parallel_step", student_fn, _run_steps, world_size, student_fn, num_examples,
        num_features, num_steps, lr, seed, points=points,
        hang_hint="does every rank call the same collectives, in the same order?")
    if failed is not None:
        return failed
    case = (f"{world_size} ranks, {num_examples} examples "
            f"(shards of {_shard_sizes(num_examples, world_size)}), {num_steps} steps")
    ref = _reference(num_examples, num_features, lr, seed, world_size, num_steps)
    wrong_params = _first_wrong_param(results, ref, num_examples)
    wrong_loss = _first_wrong_loss(results, ref, num_examples)
    earned = points * ((1 - LOSS_SHARE) * (wrong_params is None)
                       + LOSS_SHARE * (wrong_loss is None))
    problems = [p for p in (wrong_params, wrong_loss) if p is not None]
    if not problems:
        return Verdict(True, f"{case}: every rank took exactly the steps of one process on the "
                             "whole data set, and returned its loss", points, points)
    return Verdict(False, f"{case}:\n" + "\n".join(problems), earned, points)


def _run_steps(student_fn: Callable, num_examples: int, num_features: int, num_steps: int,
               lr: float, seed: int) -> list[dict]:
    """One rank: build the replica and the shard, call the student's step ``num_steps`` times."""
    import torch.distributed as dist
    rank, world_size = dist.get_rank(), dist.get_world_size()
    data = linear_regression(n=num_examples, d=num_features, seed=seed)
    shard = shard_indices(num_examples, rank, world_size, seed=seed)
    X, y = data.X[shard], data.y[shard]                       # (n_r, d), (n_r, 1)
    model = linear(num_features, seed=seed)
    steps = []
    for _ in range(num_steps):
        with forbid("distlab.data_parallel.ddp.average_gradients",
                    why="write the all-reduce and the division yourself"):
            loss = student_fn(model, X.clone(), y.clone(), num_examples, lr)
        steps.append({"loss": loss if isinstance(loss, (int, float)) else
                      (loss.item() if isinstance(loss, torch.Tensor) and loss.numel() == 1
                       else repr(loss)[:60]),
                      "params": {n: p.detach().clone() for n, p in model.named_parameters()}})
    return steps


def _reference(num_examples, num_features, lr, seed, world_size, num_steps):
    """Per step: (loss before it, parameters after it), and each mistake's parameters.

    Each mistake is taken from the right parameters of the step before, so the first wrong
    step is explained by what that one step did.
    """
    data = linear_regression(n=num_examples, d=num_features, seed=seed)
    shards = [shard_indices(num_examples, r, world_size, seed=seed) for r in range(world_size)]
    model = linear(num_features, seed=seed)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    out = []
    for _ in range(num_steps):
        sums = [_grad_sum(params, data.X[s], data.y[s]) for s in shards]   # per rank: summed
        total = [sum(gs) for gs in zip(*(g for g, _ in sums))]
        loss = sum(l for _, l in sums) / num_examples
        step = lambda grads: {n: p - lr * g for n, p, g in zip(names, params, grads)}  # noqa: E731
        mean_of_means = [sum(g[i] / len(s) for (g, _), s in zip(sums, shards)) / world_size
                         for i in range(len(params))]
        mistakes = {
            "the sum over the ranks, not divided by num_examples: divide by it": step(total),
            "the average of the ranks' mean gradients: with shards of unequal sizes that "
            "weights their examples unequally; sum the gradients of the summed squared errors "
            "and divide by num_examples": step(mean_of_means),
            "the sum of the ranks' mean gradients: divide by the number of examples": step(
                [m * world_size for m in mean_of_means]),
        }
        right = step([g / num_examples for g in total])
        per_rank_local = [step([g / num_examples for g in gs]) for gs, _ in sums]
        per_rank_local_mean = [step([g / len(s) for g in gs]) for (gs, _), s in zip(sums, shards)]
        out.append({"loss": loss, "local_losses": [l / len(s) for (_, l), s in zip(sums, shards)],
                    "right": right, "mistakes": mistakes, "local": per_rank_local,
                    "local_mean": per_rank_local_mean})
        params = [right[n] for n in names]
    return out


def _grad_sum(params, X, y):
    w, b = (p.clone().requires_grad_(True) for p in params)
    loss_sum = ((X @ w.T + b - y) ** 2).sum()
    return list(torch.autograd.grad(loss_sum, (w, b))), loss_sum.item()


def _close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in b)


def _first_wrong_param(results, ref, num_examples) -> str | None:
    for step, want in enumerate(ref):
        for rank, steps in enumerate(results):
            got = steps[step]["params"]
            for name, value in want["right"].items():
                if name not in got or got[name].shape != value.shape:
                    return (f"rank {rank}, step {step}: parameter {name!r} is missing or "
                            "changed shape; update model's parameters in place")
                if torch.allclose(got[name], value, rtol=1e-4, atol=1e-6):
                    continue
                hint = ""
                if _close(got, want["local"][rank]) or _close(got, want["local_mean"][rank]):
                    hint = (" That is the step of this rank's own shard only: sum the "
                            "gradients over the ranks with one all-reduce.")
                for mistake, params in want["mistakes"].items():
                    if not hint and _close(got, params):
                        hint = f" Your step used {mistake}."
                return (f"rank {rank}, step {step}: parameter {name!r} is {_fmt(got[name])}, "
                        f"expected {_fmt(value)} (one process on all {num_examples} "
                        f"examples).{hint}")
    return None


def _first_wrong_loss(results, ref, num_examples) -> str | None:
    for step, want in enumerate(ref):
        for rank, steps in enumerate(results):
            got = steps[step]["loss"]
            if not isinstance(got, (int, float)):
                return (f"rank {rank}, step {step}: returned {got}, not the loss as a float "
                        "(use .item())")
            if abs(got - want["loss"]) <= 1e-4 * abs(want["loss"]) + 1e-6:
                continue
            hint = ""
            if abs(got - want["local_losses"][rank]) <= 1e-4 * abs(got) + 1e-6:
                hint = " That is the loss of this rank's shard only: add it up over the ranks."
            return (f"rank {rank}, step {step}: returned the loss {got:.6g}, but the mean "
                    f"squared error over all {num_examples} examples before the step is "
                    f"{want['loss']:.6g}.{hint}")
    return None


# ----------------------------------------------------------------------------------------
# Small helpers.
# ----------------------------------------------------------------------------------------



def _shard_sizes(n: int, world_size: int) -> str:
    return ", ".join(str(len(range(r, n, world_size))) for r in range(world_size))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fmt(t: torch.Tensor) -> str:
    values = t.reshape(-1).tolist()
    shown = ", ".join(f"{v:.4g}" for v in values[:6])
    return "[" + shown + (", ..." if len(values) > 6 else "") + "]"
