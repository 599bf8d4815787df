"""Lab 02 exercise: average the gradients after backward, as DDP does.

The student writes ``average_gradients(model, group=None)``: called on every rank after
``loss.backward()``, it must leave every trainable parameter's ``.grad`` equal to the mean
over the group's ranks of their ``.grad``. Then every rank's ``optimizer.step()`` takes the
same step, and data-parallel SGD equals SGD on the global batch (Goyal et al. 2017, sec. 2).

The checker's model has what real models have: a frozen layer (its ``.grad`` is ``None``:
leave it alone) and a weight shared by two layers (average it once).
"""
from __future__ import annotations

import traceback
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distlab.checks import is_int, require_arg
from distlab.launcher import MAX_WORLD_SIZE
from distlab.exercises import Verdict, launch_student, register


@register("average_gradients")
def average_gradients(model: nn.Module, group=None) -> None:
    """Reference solution: one all-reduce per trainable parameter, divided by world size."""
    import torch.distributed as dist
    from distlab import comm
    world_size = dist.get_world_size(group)
    for p in model.parameters():          # yields a tied (shared) weight only once
        if not p.requires_grad:           # frozen: no gradient, leave it alone
            continue
        if p.grad is None:                # unused by this rank's forward: it contributes zeros,
            p.grad = torch.zeros_like(p)  # and every rank still makes the same calls in order
        p.grad /= world_size              # average, not sum: the step must not grow with p
        comm.all_reduce(p.grad, group=group)


class ExerciseModel(nn.Module):
    """Linear -> frozen Linear -> two Linears sharing one weight -> Linear."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(5, 6)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.frozen(torch.tanh(self.inp(x))))
        return self.head(torch.tanh(self.b(torch.tanh(self.a(h)))))


def _batch(rank: int, world_size: int):
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(8 * world_size, 5, generator=g), torch.randn(8 * world_size, 1, generator=g)
    return X[rank::world_size], y[rank::world_size]     # disjoint shards, 8 rows each


def _local_grads(model: nn.Module, rank: int, world_size: int) -> dict:
    model.zero_grad(set_to_none=True)
    X, y = _batch(rank, world_size)
    F.mse_loss(model(X), y).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _run_student(student_fn: Callable):
    import torch.distributed as dist
    from distlab import comm
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = ExerciseModel()
    _local_grads(model, rank, world_size)
    comm.ledger().reset()
    try:
        student_fn(model, None)
    except Exception as e:  # noqa: BLE001 - the verdict reports it
        return ("raised", f"{type(e).__name__}: {e}", traceback.format_exc(limit=-2))
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters()}
    return ("grads", grads, comm.ledger().totals()["bytes_sent"])


def check_average_gradients(student_fn: Callable, world_size: int = 3) -> Verdict:
    """Run ``student_fn(model, group)`` after backward on ``world_size`` real processes.

    Each rank computes the gradient of its own shard's mean loss; afterwards every
    trainable parameter's ``.grad`` must be the average over the ranks, on every rank.
    """
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= MAX_WORLD_SIZE,
                f"an int in 1..{MAX_WORLD_SIZE}")
    results, verdict = launch_student(
        "average_gradients", student_fn, _run_student, world_size, student_fn, timeout=30,
        hang_hint="not every rank made the same collective calls in the same order")
    if verdict is not None:
        return verdict
    model = ExerciseModel()
    local = [_local_grads(model, r, world_size) for r in range(world_size)]
    for rank, res in enumerate(results):
        if res[0] == "raised":
            hint = (" Frozen parameters (requires_grad=False) have p.grad None: skip them."
                    if "NoneType" in res[1] else "")
            return Verdict(False, f"rank {rank} raised {res[1]}.{hint}")
    for rank, (_, grads, _) in enumerate(results):
        if grads["frozen.weight"] is not None:
            return Verdict(False, f"rank {rank}: the frozen parameter 'frozen.weight' now has a "
                                  "gradient; leave parameters with requires_grad=False alone")
        for name, g in grads.items():
            if local[rank][name] is None:
                continue
            want = torch.stack([loc[name] for loc in local]).mean(0)
            if torch.allclose(g, want, atol=1e-6, rtol=1e-5):
                continue
            hint = ""
            if torch.allclose(g, local[rank][name], atol=1e-6):
                hint = " That is this rank's own gradient: no communication reached it."
            elif name == "a.weight":   # the parameters before it were right
                hint = (" This weight is shared by layers a and b (b.weight is a.weight): "
                        "average it exactly once; model.parameters() yields it once.")
            elif torch.allclose(g, want * world_size, atol=1e-6, rtol=1e-5):
                hint = " That is the sum over ranks: divide by the world size."
            err = (g - want).abs().max().item()
            return Verdict(False, f"rank {rank}: the gradient of '{name}' is off by up to "
                                  f"{err:.3g} from the mean over {world_size} ranks.{hint}")
    if results[0][2] == 0:
        return Verdict(False, "the gradients are right, but no bytes went through "
                              "distlab.comm: use comm.all_reduce (not torch.distributed "
                              "directly) so the lab can count the traffic")
    return Verdict(True, f"all {world_size} ranks hold the mean gradient of every trainable "
                         f"parameter (the frozen one untouched, the tied one averaged once); "
                         f"each sent {results[0][2]} bytes")
