"""Lab 05 exercise: the forward pass of a row-parallel linear layer (Megatron-LM).

The student writes ``row_parallel_forward(x_shard, weight_shard, bias, group=None)``. Rank
r holds the columns ``weight_shard = W[:, r*k:(r+1)*k]`` of the full weight ``W`` (out, in)
and the matching slice ``x_shard = X[..., r*k:(r+1)*k]`` of the input, as a column-parallel
layer leaves it. Every rank must return the full output ``X W^T + b``: the partial products
``x_shard W_r^T`` summed over the ranks by one all-reduce (Megatron's ``g``, Shoeybi et al.
2019, section 3), and the bias, which every rank holds whole, added once.
"""
from __future__ import annotations

import traceback
from typing import Callable

import torch

from distlab.checks import is_int, require_arg
from distlab.exercises import Verdict, launch_student, register

IN_FEATURES, OUT_FEATURES = 12, 5


@register("row_parallel_forward")
def row_parallel_forward(x_shard: torch.Tensor, weight_shard: torch.Tensor,
                         bias: torch.Tensor, group=None) -> torch.Tensor:
    """Reference solution: partial product, all-reduce (sum), then the bias once."""
    from distlab import comm
    y = x_shard @ weight_shard.T            # (B, out): this rank's share of X W^T
    comm.all_reduce(y, group=group)         # sum of the shares = X W^T on every rank
    return y + bias                         # after the sum, or it would be counted p times


def _problem(world_size: int):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(4, IN_FEATURES, generator=g)              # (B, in)
    W = torch.randn(OUT_FEATURES, IN_FEATURES, generator=g)   # (out, in)
    b = torch.randn(OUT_FEATURES, generator=g)                # (out,)
    return X, W, b


def _run_student(student_fn: Callable):
    import torch.distributed as dist
    from distlab import comm
    rank, world_size = dist.get_rank(), dist.get_world_size()
    X, W, b = _problem(world_size)
    # This rank's columns: x (B, in/p), w (out, in/p), as a column-parallel layer leaves them.
    x, w = X.chunk(world_size, dim=1)[rank].clone(), W.chunk(world_size, dim=1)[rank].clone()
    x0, w0, b0 = x.clone(), w.clone(), b.clone()
    comm.ledger().reset()
    try:
        with torch.no_grad():
            y = student_fn(x, w, b, None)
    except Exception as e:  # noqa: BLE001 - the verdict reports it
        return ("raised", f"{type(e).__name__}: {e}", traceback.format_exc(limit=-2))
    changed = [n for n, a, a0 in (("x_shard", x, x0), ("weight_shard", w, w0), ("bias", b, b0))
               if not torch.equal(a, a0)]
    return ("output", y, changed, comm.ledger().totals()["bytes_sent"])


def check_row_parallel_forward(student_fn: Callable, world_size: int = 2) -> Verdict:
    """Run ``student_fn(x_shard, weight_shard, bias, group)`` on ``world_size`` processes.

    The input has 12 features split evenly over the ranks (``world_size`` 2, 3, 4 or 6);
    every rank must return the full (4, 5) output ``X W^T + b``.
    """
    require_arg("world_size", world_size, is_int(world_size) and world_size in (2, 3, 4, 6),
                f"2, 3, 4 or 6 (it must divide the {IN_FEATURES} input features)")
    results, verdict = launch_student(
        "row_parallel_forward", student_fn, _run_student, world_size, student_fn,
        hang_hint="every rank must make the same collective calls in the same order")
    if verdict is not None:
        return verdict
    X, W, b = _problem(world_size)
    want = X @ W.T + b
    for rank, res in enumerate(results):
        if res[0] == "raised":
            return Verdict(False, f"rank {rank} raised {res[1]}")
        _, y, changed, _ = res
        if not isinstance(y, torch.Tensor):
            return Verdict(False, f"rank {rank} returned {type(y).__name__}, not a tensor")
        if y.shape != want.shape:
            return Verdict(False, f"rank {rank} returned shape {tuple(y.shape)}; the full "
                                  f"output is (batch, out_features) = {tuple(want.shape)}")
        if torch.allclose(y, want, atol=1e-5):
            continue
        x = X.chunk(world_size, dim=1)[rank]                        # (B, in/p)
        partial = x @ W.chunk(world_size, dim=1)[rank].T            # (B, out)
        err = (y - want).abs().max().item()
        if torch.allclose(y, partial + b, atol=1e-5) or torch.allclose(y, partial, atol=1e-5):
            hint = ("that is only this rank's partial product: the ranks' partials must be "
                    "summed with an all-reduce")
        elif torch.allclose(y, want + (world_size - 1) * b, atol=1e-5):
            hint = (f"the bias is counted {world_size} times: it was added before the "
                    "all-reduce on every rank; add it once, after the sum")
        elif torch.allclose(y, want - b, atol=1e-5):
            hint = "the bias is missing: add it (once) after the all-reduce"
        elif torch.allclose(y, (want - b) / world_size + b, atol=1e-5):
            hint = "the partials are averaged, not summed: X W^T is their sum"
        else:
            hint = f"it is off by up to {err:.3g}"
        return Verdict(False, f"rank {rank}: wrong output, {hint}.")
    for rank, (_, _, changed, _) in enumerate(results):
        if changed:
            return Verdict(False, f"rank {rank}: the output is right, but {', '.join(changed)} "
                                  f"changed in place; the layer's inputs and weights must be "
                                  f"left as they were (all-reduce a new tensor)")
    if results[0][3] == 0:
        return Verdict(False, "the output is right, but no bytes went through distlab.comm: "
                              "use comm.all_reduce so the lab can count the traffic")
    return Verdict(True, f"all {world_size} ranks return X W^T + b: partial products summed by "
                         f"one all-reduce ({results[0][3]} bytes sent per rank), bias added once")
