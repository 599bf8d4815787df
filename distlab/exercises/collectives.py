"""Lab 01 exercise: your own ring all-reduce, checked on 4 real processes.

The student writes ``ring_all_reduce(tensor, group=None)``: sum ``tensor`` over all ranks,
in place, with ``comm.isend`` / ``comm.irecv`` only, as a reduce-scatter followed by an
all-gather around the ring (see :func:`distlab.communication.collectives.ring_all_reduce`).

How the checker finds the mistake: rank r contributes ``(i + 1) · 8^r`` at element i, so
every element of the result, divided by ``i + 1``, is a number whose base-8 digits count
how many times each rank's contribution was added. A right answer has every digit 1; any
other digit names the rank that was dropped (0) or added twice (2), at that chunk.
"""
from __future__ import annotations

from typing import Callable

import torch

from distlab.checks import is_int, require_arg
from distlab.communication import alpha_beta
from distlab.exercises import Verdict, launch_student, register

BASE = 8            # one base-8 digit per rank: exact in float32 for up to 7 ranks
NUMEL = 12          # 3 elements per chunk on 4 ranks


@register("ring_all_reduce")
def ring_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Reference solution: p-1 reduce-scatter steps, then p-1 all-gather steps."""
    import torch.distributed as dist
    from distlab import comm
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    right, left = (rank + 1) % p, (rank - 1) % p
    chunks = tensor.view(-1).tensor_split(p)          # p views (numel/p,) that write tensor
    for step in range(p - 1):                         # reduce-scatter
        send, recv = chunks[(rank - step) % p], chunks[(rank - step - 1) % p]
        incoming = torch.empty_like(recv)
        reqs = [comm.isend(send, right, group=group), comm.irecv(incoming, left, group=group)]
        for req in reqs:
            req.wait()
        recv += incoming                              # rank now holds more of this chunk's sum
    for step in range(p - 1):                         # all-gather: pass the finished chunks on
        send, recv = chunks[(rank - step + 1) % p], chunks[(rank - step) % p]
        reqs = [comm.isend(send, right, group=group), comm.irecv(recv, left, group=group)]
        for req in reqs:
            req.wait()
    return tensor


def contribution(rank: int, numel: int = NUMEL) -> torch.Tensor:
    """What rank ``rank`` passes in: element i is ``(i + 1) · 8^rank``."""
    return torch.arange(1, numel + 1, dtype=torch.float32) * float(BASE ** rank)


def _run_student(student_fn: Callable):
    import torch.distributed as dist
    from distlab import comm
    x = contribution(dist.get_rank())
    comm.ledger().reset()
    returned = student_fn(x)
    ops = comm.ledger().by_op()
    returned = returned.detach().clone() if isinstance(returned, torch.Tensor) else None
    return x, returned, ops


def _digits(value: float, world_size: int) -> list[int] | None:
    """Base-8 digits (rank 0 first) of a whole number, or None if it is not one."""
    v = round(value)
    if abs(v - value) > 1e-3 or v < 0 or v >= BASE ** world_size:
        return None
    return [(v // BASE ** r) % BASE for r in range(world_size)]


def diagnose(result: torch.Tensor, rank: int, world_size: int) -> str | None:
    """None if ``result`` is the sum; else which chunk is wrong on ``rank`` and how."""
    chunks = torch.arange(result.numel()).tensor_split(world_size)   # each chunk's indices
    right = [c for c, idx in enumerate(chunks)
             if all(_digits(result[i].item() / (i + 1), world_size) == [1] * world_size
                    for i in idx.tolist())]
    also = f"; chunk(s) {right} on this rank are right" if right else ""
    for c, idx in enumerate(chunks):
        for i in idx.tolist():
            counts = _digits(result[i].item() / (i + 1), world_size)
            if counts == [1] * world_size:
                continue
            where = f"rank {rank}, chunk {c} (elements {idx[0].item()}..{idx[-1].item()})"
            if counts is None:
                return (f"{where}: element {i} is {result[i].item():g}, which is no sum of "
                        f"the ranks' contributions (a chunk sent to the wrong place?){also}")
            missing = [r for r, k in enumerate(counts) if k == 0]
            twice = [r for r, k in enumerate(counts) if k > 1]
            parts = []
            if missing:
                parts.append(f"is missing the contribution of rank(s) {missing}")
            if twice:
                parts.append(f"has rank(s) {twice} added more than once")
            return f"{where} {' and '.join(parts)}{also}"
    return None


def check_ring_all_reduce(student_fn: Callable, world_size: int = 4) -> Verdict:
    """Run ``student_fn`` on ``world_size`` real processes; say whether it is a ring all-reduce.

    Checks, in order: it finishes (no deadlock) and raises nothing; the tensor passed in holds
    the sum on every rank (else: the first wrong rank and chunk, and whose contribution is
    missing or doubled); only point-to-point messages were used; each rank sent the ring's
    ``2(p-1)/p·n`` bytes. ``world_size`` is 1 to 7: one base-8 digit per rank.
    """
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size < BASE,
                f"an int in 1..{BASE - 1} (one base-{BASE} digit per rank)")
    results, verdict = launch_student(
        "ring_all_reduce", student_fn, _run_student, world_size, student_fn,
        hang_hint="a deadlock? Every isend needs a matching irecv on its neighbour, posted "
                  "in the same step.")
    if verdict is not None:
        return verdict
    for rank, (x, returned, _) in enumerate(results):
        problem = diagnose(x, rank, world_size)
        if problem and returned is not None and diagnose(returned, rank, world_size) is None:
            return Verdict(False, f"rank {rank} returned the right sum but left its tensor "
                                  "unchanged: all-reduce works in place, write into tensor")
        if problem:
            return Verdict(False, problem)
    ops = results[0][2]
    built_in = sorted(set(ops) - {"send", "recv"})
    if built_in:
        return Verdict(False, f"the sums are right, but built from {built_in}: use only "
                              "comm.isend and comm.irecv")
    ring = alpha_beta.ring_all_reduce_bytes(NUMEL * 4, world_size)
    for rank, (_, _, ops) in enumerate(results):
        sent = ops.get("send", {}).get("bytes_sent", 0)
        if sent != ring:
            return Verdict(False, f"the sums are right, but rank {rank} sent {sent} bytes; a "
                                  f"ring all-reduce of {NUMEL * 4} bytes on {world_size} ranks "
                                  f"sends 2(p-1)/p·n = {ring}")
    return Verdict(True, f"every one of {world_size} ranks holds the sum, and each sent "
                         f"{ring} bytes = 2(p-1)/p·n: a ring all-reduce")

