"""Lab 04 exercise: write the step of a sharded optimizer (ZeRO stage 1).

The student writes ``sharded_sgd_step(param, grad, momentum, lr, beta, group)``:

* ``param`` and ``grad``: the full flat parameter and its gradient, already averaged over
  ranks, identical on every rank; their length is divisible by the world size N;
* ``momentum``: this rank's momentum buffer, for its 1/N slice only.

Rank r owns the r-th contiguous slice. It updates its momentum and its slice of the
parameter with SGD with momentum (``m = beta·m + g``, ``p = p - lr·m``), then all-gathers
the slices so that every rank ends with the whole updated parameter in ``param``.
:func:`check_sharded_sgd_step` runs it on real processes and says which rank, which slice
and which step went wrong.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, require_arg
from distlab.exercises import Verdict, launch_student, register

NUMEL, STEPS, LR, BETA = 24, 3, 0.1, 0.9


@register("sharded_sgd_step")
def sharded_sgd_step(param, grad, momentum, lr, beta, group=None):
    """Reference solution: update my slice, then all-gather every rank's slice."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    n = param.numel() // world_size
    mine = slice(rank * n, (rank + 1) * n)         # the slice this rank owns
    momentum.mul_(beta).add_(grad[mine])
    updated = param[mine] - lr * momentum
    comm.all_gather_into_tensor(param, updated, group=group)   # everyone gets every slice


def _grads():
    g = torch.Generator().manual_seed(4)
    return [torch.randn(NUMEL, generator=g) for _ in range(STEPS)]


def _reference():
    p, m, out = torch.linspace(-1, 1, NUMEL), torch.zeros(NUMEL), []
    for g in _grads():
        m = BETA * m + g
        p = p - LR * m
        out.append((p.clone(), m.clone()))
    return out


def _worker(student_fn):
    world_size = dist.get_world_size()
    param = torch.linspace(-1, 1, NUMEL)
    momentum = torch.zeros(NUMEL // world_size)
    comm.ledger().reset()
    history = []
    for g in _grads():
        student_fn(param, g.clone(), momentum, LR, BETA)
        history.append((param.clone(), momentum.clone()))
    return {"history": history, "ops": comm.ledger().by_op()}


def _first_wrong(a, b, n):
    bad = ~torch.isclose(a, b, rtol=1e-5, atol=1e-6)
    return None if not bad.any() else int(bad.nonzero()[0]) // n


def check_sharded_sgd_step(student_fn, world_size: int = 4) -> Verdict:
    """Run ``student_fn`` for 3 steps on ``world_size`` ranks against one-process SGD.

    ``world_size`` must divide the parameter's 24 elements, so every slice is equal.
    """
    require_arg("world_size", world_size,
                is_int(world_size) and world_size >= 1 and NUMEL % world_size == 0,
                f"a divisor of {NUMEL}: 1, 2, 3, 4, 6, 8, 12 or 24")
    results, verdict = launch_student(
        "sharded_sgd_step", student_fn, _worker, world_size, student_fn, timeout=60,
        hang_hint="every rank must call the all-gather, once per step, with its own slice")
    if verdict is not None:
        return verdict
    n = NUMEL // world_size
    ref = _reference()
    for step, (want_p, want_m) in enumerate(ref):
        for rank, res in enumerate(results):
            p, m = res["history"][step]
            where = f"after step {step + 1}, rank {rank}"
            mine = slice(rank * n, (rank + 1) * n)
            if m.shape != want_m[mine].shape or not torch.allclose(m, want_m[mine], 1e-5, 1e-6):
                return Verdict(False, f"{where}: its momentum buffer does not hold the momentum "
                               f"of its own slice (elements {mine.start}..{mine.stop - 1}). "
                               "Rank r owns slice r: add grad[r·n:(r+1)·n], not the whole grad.")
            chunk = _first_wrong(p, want_p, n)
            if chunk is None:
                continue
            if chunk == rank:
                return Verdict(False, f"{where}: its own slice {chunk} (elements "
                               f"{chunk * n}..{chunk * n + n - 1}) is wrong: the update "
                               "p = p - lr·m of the slice it owns is off.")
            return Verdict(False, f"{where}: slice {chunk} (elements {chunk * n}.."
                           f"{chunk * n + n - 1}), owned by rank {chunk}, is not the updated "
                           "one: did every rank all-gather the updated slices into param?")
    ops = results[0]["ops"]
    if "all_reduce" in ops or "broadcast" in ops:
        return Verdict(False, "the parameters are right, but you used "
                       f"{sorted(k for k in ops if k in ('all_reduce', 'broadcast'))}: one "
                       "all-gather of the updated slices is all ZeRO needs.")
    if "all_gather" not in ops:
        return Verdict(False, "the parameters are right, but no all-gather went through "
                       "distlab.comm: use comm.all_gather_into_tensor so bytes are counted.")
    sent = ops["all_gather"]["bytes_sent"]
    return Verdict(True, f"every rank updated only its 1/{world_size} slice and all-gathered "
                   f"the rest: {STEPS} steps equal one-process SGD with momentum, "
                   f"{sent} bytes sent per rank.")
