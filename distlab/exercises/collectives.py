"""Lab 01's assignment: a ring reduce-scatter (part A), then the whole ring all-reduce (part B).

Both are written with ``comm.isend`` / ``comm.irecv`` only (the built-in collectives and
distlab's own are off limits, see :data:`FORBIDDEN`), on ``chunks =
tensor.view(-1).tensor_split(p)``, so any number of elements works (the first ``n mod p``
chunks are one element longer):

* ``ring_reduce_scatter(tensor, group=None)``: p-1 steps around the ring; afterwards chunk
  ``rank`` of ``tensor`` holds the sum over the ranks of that chunk; it is returned.
* ``ring_all_reduce(tensor, group=None)``: the reduce-scatter, then p-1 all-gather steps;
  afterwards ``tensor`` holds the sum on every rank, in place.

How the checker finds the mistake: rank r contributes ``(i + 1) · 8^r`` at element i, so
every element of a result, divided by ``i + 1``, is a number whose base-8 digits count how
many times each rank's contribution was added (exact in float32 and float64 for up to 7
ranks). A right answer has every digit 1; any other digit names the rank that was dropped (0)
or added twice (2), at that chunk. The ledger then checks the traffic: a ring sends p-1
messages per phase from every rank, and ``(p-1)·n`` bytes per phase over all ranks.
"""
from __future__ import annotations

from typing import Callable

import torch

from distlab.checks import is_int, require_arg
from distlab.exercises import Verdict, forbid, launch_student, require_case

BASE = 8            # one base-8 digit per rank: exact in float32 for up to 7 ranks
FORBIDDEN = tuple(f"torch.distributed.{name}" for name in (
    "all_reduce", "reduce_scatter", "reduce_scatter_tensor", "all_gather",
    "all_gather_into_tensor", "reduce", "broadcast")) + tuple(
    f"distlab.comm.{name}" for name in (
        "all_reduce", "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor",
        "broadcast")) + tuple(
    f"distlab.communication.collectives.{name}" for name in (
        "ring_all_reduce", "ring_reduce_scatter", "ring_all_gather", "naive_all_reduce",
        "recursive_doubling_all_reduce", "gloo_all_reduce"))
"""What the student may not call: every all-reduce, reduce-scatter and all-gather there is."""
WHY = "build it from comm.isend and comm.irecv"
HANG_HINT = ("a deadlock? Every isend needs a matching irecv on its neighbour, posted in the "
             "same step.")


def check_ring_reduce_scatter(student_fn: Callable, *, points: float, world_size: int = 4,
                              numel: int = 14, dtype: torch.dtype = torch.float32) -> Verdict:
    """Part A: run ``student_fn`` on ``world_size`` real processes; on every rank, the returned
    chunk ``rank`` (and that chunk of the tensor) must hold the sum over the ranks, sent as
    p-1 ring messages of ``(p-1)/p·n`` bytes in all per rank on average."""
    _require_case(world_size, numel, dtype, points)
    results, failed = launch_student(
        "ring_reduce_scatter", student_fn, _run_student, world_size, student_fn, numel, dtype,
        timeout=60, hang_hint=HANG_HINT, points=points)
    if failed is not None:
        return failed
    case = _case(world_size, numel, dtype)

    def fail(message):
        return Verdict(False, f"{case}: {message}", 0.0, points)

    chunks = torch.arange(numel).tensor_split(world_size)         # each chunk's indices
    for rank, (x, returned, _) in enumerate(results):
        mine = chunks[rank]
        if returned is None or returned.numel() != len(mine):
            got = "nothing" if returned is None else f"{returned.numel()} elements"
            return fail(f"rank {rank} returned {got}; return chunk {rank} of the tensor, "
                        f"its {len(mine)} elements")
        problem = _chunk_problem(returned.reshape(-1), mine, rank, rank, world_size)
        if problem:
            shifted = chunks[(rank + 1) % world_size]
            if (len(shifted) == len(mine) and x.dtype == dtype and _chunk_problem(
                    x.reshape(-1)[shifted], shifted, rank, (rank + 1) % world_size,
                    world_size) is None):
                problem += (f". Chunk {(rank + 1) % world_size} holds the sum on this rank: "
                            f"shift the schedule so that rank r finishes chunk r (in step s "
                            f"send chunk (r - s - 1) mod p)")
            return fail(problem)
        if returned.dtype != dtype:
            return fail(f"rank {rank} returned {_name(returned.dtype)}, not {_name(dtype)}")
    traffic = _traffic_problem(results, numel, dtype, world_size, phases=1)
    if traffic:
        return fail(traffic)
    return Verdict(True, f"{case}: every rank's chunk holds the sum, after p-1 = "
                         f"{world_size - 1} ring messages per rank", points, points)


def check_ring_all_reduce(student_fn: Callable, *, points: float, world_size: int = 4,
                          numel: int = 14, dtype: torch.dtype = torch.float32) -> Verdict:
    """Part B: run ``student_fn`` on ``world_size`` real processes; say whether it is a ring
    all-reduce.

    Checks, in order: it finishes (no deadlock), raises nothing and calls nothing off
    limits; the tensor passed in holds the sum on every rank (else: the first wrong rank and
    chunk, and whose contribution is missing or doubled); the ring's traffic: 2(p-1)
    messages from every rank, ``2(p-1)·n`` bytes over all ranks. Partial points: the
    reduce-scatter half right (every chunk's sum complete on some rank) earns half; right
    sums without the ring's traffic earn three quarters.
    """
    _require_case(world_size, numel, dtype, points)
    results, failed = launch_student(
        "ring_all_reduce", student_fn, _run_student, world_size, student_fn, numel, dtype,
        timeout=60, hang_hint=HANG_HINT, points=points)
    if failed is not None:
        return failed
    case = _case(world_size, numel, dtype)
    for rank, (x, returned, _) in enumerate(results):
        problem = diagnose(x, rank, world_size)
        if problem and returned is not None and returned.shape == x.shape \
                and diagnose(returned, rank, world_size) is None:
            return Verdict(False, f"{case}: rank {rank} returned the right sum but left its "
                                  "tensor unchanged: all-reduce works in place, write into "
                                  "tensor", 0.0, points)
        if problem:
            earned = points / 2 if _reduce_scatter_done(results, world_size) else 0.0
            half = (" (every chunk's sum is complete on some rank: the reduce-scatter works, "
                    "the all-gather does not)" if earned else "")
            return Verdict(False, f"{case}: {problem}{half}", earned, points)
        if x.dtype != dtype:
            return Verdict(False, f"{case}: rank {rank}'s tensor became {_name(x.dtype)}",
                           0.0, points)
    traffic = _traffic_problem(results, numel, dtype, world_size, phases=2)
    if traffic:
        return Verdict(False, f"{case}: the sums are right, but {traffic}", points * 3 / 4,
                       points)
    return Verdict(True, f"{case}: every rank holds the sum, after 2(p-1) = "
                         f"{2 * (world_size - 1)} ring messages per rank and 2(p-1)·n bytes in "
                         "all: a ring all-reduce", points, points)


def contribution(rank: int, numel: int = 12, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What rank ``rank`` passes in: element i is ``(i + 1) · 8^rank``."""
    return torch.arange(1, numel + 1, dtype=dtype) * float(BASE ** rank)


def diagnose(result: torch.Tensor, rank: int, world_size: int) -> str | None:
    """None if ``result`` is the sum; else which chunk is wrong on ``rank`` and how."""
    result = result.reshape(-1)
    chunks = torch.arange(result.numel()).tensor_split(world_size)   # each chunk's indices
    right = [c for c, idx in enumerate(chunks)
             if _chunk_problem(result[idx], idx, rank, c, world_size) is None]
    also = f"; chunk(s) {right} on this rank are right" if right else ""
    for c, idx in enumerate(chunks):
        problem = _chunk_problem(result[idx], idx, rank, c, world_size)
        if problem:
            return problem + also
    return None


# ----------------------------------------------------------------------------------------
# Helpers: the worker, the digits, the traffic.
# ----------------------------------------------------------------------------------------

def _run_student(student_fn: Callable, numel: int, dtype: torch.dtype):
    import torch.distributed as dist
    from distlab import comm
    x = contribution(dist.get_rank(), numel, dtype)
    comm.ledger().reset()
    with forbid(*FORBIDDEN, why=WHY):
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


def _chunk_problem(values: torch.Tensor, idx: torch.Tensor, rank: int, chunk: int,
                   world_size: int) -> str | None:
    """None if ``values`` (chunk ``chunk``, elements ``idx``) hold the sum over the ranks."""
    where = f"rank {rank}, chunk {chunk} (elements {idx[0].item()}..{idx[-1].item()})"
    for v, i in zip(values.tolist(), idx.tolist()):
        counts = _digits(v / (i + 1), world_size)
        if counts == [1] * world_size:
            continue
        if counts is None:
            return (f"{where}: element {i} is {v:g}, which is no sum of the ranks' "
                    "contributions (a chunk sent to the wrong place?)")
        missing = [r for r, k in enumerate(counts) if k == 0]
        twice = [r for r, k in enumerate(counts) if k > 1]
        parts = []
        if missing:
            parts.append(f"is missing the contribution of rank(s) {missing}")
        if twice:
            parts.append(f"has rank(s) {twice} added more than once")
        return f"{where} {' and '.join(parts)}"
    return None


def _reduce_scatter_done(results, world_size: int) -> bool:
    """True when every chunk holds the full sum on at least one rank."""
    numel = results[0][0].numel()
    chunks = torch.arange(numel).tensor_split(world_size)
    return all(any(_chunk_problem(x.reshape(-1)[idx], idx, r, c, world_size) is None
                   for r, (x, _, _) in enumerate(results)) for c, idx in enumerate(chunks))


def _traffic_problem(results, numel: int, dtype: torch.dtype, world_size: int,
                     phases: int) -> str | None:
    """What is not a ring about the messages the ledger counted, or None."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    want_total = phases * (world_size - 1) * numel * itemsize
    sends = [ops.get("send", {}) for _, _, ops in results]
    for rank, s in enumerate(sends):
        if s.get("calls", 0) != phases * (world_size - 1):
            return (f"rank {rank} sent {s.get('calls', 0)} messages through comm.isend/send; "
                    f"a ring sends one per step, {phases * (world_size - 1)} in all "
                    "(the ledger counts only distlab.comm's sends: use comm.isend)")
    total = sum(s.get("bytes_sent", 0) for s in sends)
    if total != want_total:
        return (f"the ranks sent {total} bytes in all; a ring sends each of the p chunks "
                f"p-1 times per phase, {phases}·(p-1)·n = {want_total} bytes")
    return None


def _require_case(world_size, numel, dtype, points) -> None:
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size < BASE,
                f"an int in 1..{BASE - 1} (one base-{BASE} digit per rank)")
    require_arg("numel", numel, is_int(numel) and world_size <= numel <= 10_000,
                f"an int in {world_size}..10000 (at least one element per chunk)")
    require_case(world_size, numel, dtype, points)


def _case(world_size: int, numel: int, dtype: torch.dtype) -> str:
    return f"{world_size} ranks, {numel} elements, {_name(dtype)}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
