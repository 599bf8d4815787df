"""Lab 00 exercise: the mean over all ranks of a tensor each rank holds.

The student writes ``global_mean(x, group=None) -> torch.Tensor``: every rank passes its own
``x`` and every rank must get back the element-wise mean over the ranks. It is the one
collective that data-parallel training needs (gradient averaging), in two lines.
"""
from __future__ import annotations

from typing import Callable

import torch

from distlab.exercises import Verdict, launch_student, register


@register("global_mean")
def global_mean(x: torch.Tensor, group=None) -> torch.Tensor:
    """Reference solution: sum with one all-reduce, then divide by the number of ranks."""
    import torch.distributed as dist
    from distlab import comm
    total = x.clone()                     # all_reduce works in place: keep the caller's x
    comm.all_reduce(total, group=group)
    return total / dist.get_world_size(group)


def _local_value(rank: int) -> torch.Tensor:
    # Distinct, non-symmetric values per rank, so a sum, a rank-0 copy or a missing division
    # each give a recognisably wrong answer.
    return torch.tensor([rank + 1.0, 10.0 * rank, -2.0 * rank * rank])


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in t.tolist()) + "]"


def _run_student(student_fn: Callable):
    import torch.distributed as dist
    rank = dist.get_rank()
    x = _local_value(rank)
    out = student_fn(x.clone())
    if not isinstance(out, torch.Tensor):
        return ("type", type(out).__name__)
    return ("tensor", out.detach().cpu().float())


def check_global_mean(student_fn: Callable, world_size: int = 3) -> Verdict:
    """Run ``student_fn`` on ``world_size`` real processes and say whether each rank got the mean."""
    results, failed = launch_student("global_mean", student_fn, _run_student, world_size,
                                     student_fn, hang_hint="does every rank call the same "
                                     "collective?")
    if failed is not None:
        return failed
    values = [_local_value(r) for r in range(world_size)]
    want = torch.stack(values).mean(0)
    total = torch.stack(values).sum(0)
    for rank, (kind, out) in enumerate(results):
        if kind == "type":
            return Verdict(False, f"rank {rank} returned a {out}, not a torch.Tensor")
        if out.shape != want.shape:
            return Verdict(False, f"rank {rank} returned shape {tuple(out.shape)}; "
                                  f"expected {tuple(want.shape)}, the shape of x")
        if torch.allclose(out, want, atol=1e-5):
            continue
        hint = ""
        if torch.allclose(out, total, atol=1e-5):
            hint = " That is the sum: divide by the number of ranks."
        elif torch.allclose(out, values[rank], atol=1e-5):
            hint = " That is this rank's own x: no communication happened."
        elif torch.allclose(out, values[0], atol=1e-5):
            hint = " That is rank 0's x: a broadcast, not an average."
        return Verdict(False, f"rank {rank} returned {_fmt(out)}, but the mean over "
                              f"{world_size} ranks is {_fmt(want)}.{hint}")
    return Verdict(True, f"every one of {world_size} ranks got the mean {_fmt(want)}")
