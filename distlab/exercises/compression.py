"""Lab 06's assignment: top-k compression with error feedback (part A), then the compressed
all-reduce over the ranks (part B).

* ``topk_with_feedback(x, residual, k) -> (values, indices)``: on one rank, ``c = x +
  residual``; the k coordinates of ``c`` of largest magnitude are sent (their values and
  indices are returned) and ``residual`` becomes, in place, ``c`` with those k coordinates
  set to zero: it carries exactly what was not sent (Stich, Cordonnier and Jaggi 2018,
  "Sparsified SGD with memory", algorithm 1).
* ``topk_all_reduce(x, residual, k, group=None) -> mean``: every rank compresses its own
  ``x`` that way, the ranks exchange only the k values and indices with ``comm.all_gather``
  (``(p-1)·k·(value + index bytes)`` per rank), and every rank returns the mean over the
  ranks of the sparse vectors that were sent.

What is right is computed here with ``torch.topk`` in one process, playing every rank with
its own residual, step after step. distlab's own compressed all-reduce is off limits (see
:data:`FORBIDDEN`). Part A is judged on each rank's own residual, so a wrong residual does
not also make the selection look wrong; part B's mean likewise: the exchange, the error
feedback (the residuals against the reference run) and the bytes each earn their points.
"""
from __future__ import annotations

from typing import Callable

import torch

from distlab.checks import is_int, require_arg
from distlab.exercises import Verdict, forbid, launch_student, require_case

FORBIDDEN = tuple(f"distlab.communication_efficient.compression.{name}" for name in (
    "all_reduce_compressed", "compress_with_feedback", "TopK.compress", "TopK.decompress"))
"""What the student may not call: distlab's own top-k compressor and compressed all-reduce."""
WHY = "write the top-k selection and the error feedback yourself"
HANG_HINT = ("every rank must make the same collective calls, in the same order, with "
             "tensors of the same shape (k values, then k indices)")
ATOL = 1e-5
POINTS_B = {"mean": 4 / 7, "feedback": 2 / 7, "bytes": 1 / 7}
"""How part B's points are shared: the exchange, the error feedback, the sparse traffic."""


def check_topk_with_feedback(student_fn: Callable, *, points: float, world_size: int = 2,
                             numel: int = 12, k: int = 3, steps: int = 3,
                             dtype: torch.dtype = torch.float32) -> Verdict:
    """Part A: run ``student_fn(x, residual, k)`` for ``steps`` steps on each of
    ``world_size`` real processes, each rank with its own ``x`` and residual.

    Two thirds of the points: the returned k indices are those of the k largest ``|x +
    residual|`` and the values are ``(x + residual)`` there, at every rank and step; one
    third: the residual afterwards is ``x + residual`` with the k coordinates the student
    sent set to zero (judged on the student's own choice and own residual).
    """
    _require_case(world_size, numel, k, steps, dtype, points)
    results, failed = launch_student(
        "topk_with_feedback", student_fn, _run_student, world_size, student_fn, numel, k,
        steps, dtype, "a", timeout=60, hang_hint="part A sends nothing: an endless loop?",
        points=points)
    if failed is not None:
        return failed
    case = _case(world_size, numel, k, dtype)
    selection = feedback = None
    for step in range(steps):
        for rank, records in enumerate(results):
            before, returned, after, _ = records[step]
            where = f"rank {rank}, step {step}"
            if isinstance(returned, str):
                return Verdict(False, f"{case}: {where}: {returned}", 0.0, points)
            x = _x(rank, step, numel, dtype)
            c = x + before
            selection = selection or _selection_problem(returned, c, k, where, x)
            feedback = feedback or _residual_problem(after, _unsent(c, returned[1], k), before,
                                                     x, k, where)
    earned = round(points * (2 / 3 * (selection is None) + 1 / 3 * (feedback is None)), 6)
    problems = [p for p in (selection, feedback) if p]
    if problems:
        return Verdict(False, f"{case}: " + "\n".join(problems), earned, points)
    return Verdict(True, f"{case}: every rank sent the k largest magnitudes of x + residual "
                         f"and kept exactly the rest, at every one of {steps} steps",
                   points, points)


def check_topk_all_reduce(student_fn: Callable, *, points: float, world_size: int = 3,
                          numel: int = 60, k: int = 4, steps: int = 3,
                          dtype: torch.dtype = torch.float32) -> Verdict:
    """Part B: run ``student_fn(x, residual, k)`` for ``steps`` steps on ``world_size`` real
    processes and compare every rank's output and residual, step by step, with the
    single-process reference.

    Points (shares of ``points``, :data:`POINTS_B`): 4/7 the mean, on every rank and step,
    of the top-k vectors the ranks sent (judged on each rank's own residual); 2/7 the
    residuals equal to the reference run's; 1/7 the traffic: each rank sent between 1 byte
    and the all-gather of k values and k int64 indices, ``(p-1)·k·(value + 8)`` bytes, per
    step through ``distlab.comm`` (only with the mean right).
    """
    _require_case(world_size, numel, k, steps, dtype, points)
    results, failed = launch_student(
        "topk_all_reduce", student_fn, _run_student, world_size, student_fn, numel, k, steps,
        dtype, "b", timeout=60, hang_hint=HANG_HINT, points=points)
    if failed is not None:
        return failed
    case = _case(world_size, numel, k, dtype)
    reference = _reference(world_size, numel, k, steps, dtype)
    budget = (world_size - 1) * k * (torch.finfo(dtype).bits // 8 + 8)
    mean = feedback = traffic = None
    for step in range(steps):
        xs = [_x(r, step, numel, dtype) for r in range(world_size)]
        befores = [records[step][0] for records in results]
        sent = [_sparse(xs[r] + befores[r], k) for r in range(world_size)]
        want = torch.stack(sent).mean(0)              # the mean of what the ranks sent
        for rank, records in enumerate(results):
            _, out, after, nbytes = records[step]
            where = f"rank {rank}, step {step}"
            if isinstance(out, str):
                return Verdict(False, f"{case}: {where}: {out}", 0.0, points)
            mean = mean or _mean_problem(out, want, sent, xs, k, rank, where)
            feedback = feedback or _residual_problem(after, reference[step][rank],
                                                     befores[rank], xs[rank], k, where)
            if world_size > 1 and not 0 < nbytes <= budget:
                traffic = traffic or _traffic_problem(nbytes, budget, k, where)
    if mean:
        traffic = None                # judged only once the mean is right
    earned = points * (POINTS_B["mean"] * (mean is None) + POINTS_B["feedback"] * (feedback is None)
                       + POINTS_B["bytes"] * (mean is None and traffic is None))
    problems = [p for p in (mean, feedback, traffic) if p]
    if problems:
        return Verdict(False, f"{case}: " + "\n".join(problems), round(earned, 6), points)
    dense = 2 * (world_size - 1) * numel * (torch.finfo(dtype).bits // 8) // world_size
    return Verdict(True, f"{case}: every rank got the mean of the sent top-k vectors and "
                         f"kept the right residual at every one of {steps} steps, sending "
                         f"{results[0][-1][3]} bytes per step (a dense all-reduce: {dense})",
                   points, points)


# ----------------------------------------------------------------------------------------
# On each rank: the student's function, step after step, with what it saw and returned.
# ----------------------------------------------------------------------------------------

def _run_student(student_fn, numel, k, steps, dtype, part):
    """``[(residual before, what came back, residual after, bytes sent)]``, one per step."""
    import torch.distributed as dist
    from distlab import comm
    rank = dist.get_rank()
    residual = torch.zeros(numel, dtype=dtype)
    records = []
    for step in range(steps):
        before, sent = residual.clone(), comm.ledger().totals()["bytes_sent"]
        with forbid(*FORBIDDEN, why=WHY):
            returned = student_fn(_x(rank, step, numel, dtype), residual, k)
        sent = comm.ledger().totals()["bytes_sent"] - sent
        returned = _values_and_indices(returned) if part == "a" else _mean(returned)
        records.append((before, returned, residual.detach().clone(), sent))
    return records


def _mean(returned):
    """The tensor part B returned, or a sentence saying what came back instead."""
    if isinstance(returned, torch.Tensor):
        return returned.detach().clone()
    return f"returned a {type(returned).__name__}; return a tensor shaped like x"


def _values_and_indices(returned):
    """``(values, indices)`` as tensors, or a sentence saying what came back instead."""
    if not (isinstance(returned, (tuple, list)) and len(returned) == 2
            and all(isinstance(t, torch.Tensor) for t in returned)):
        what = type(returned).__name__
        if isinstance(returned, (tuple, list)):
            what = f"{what} of {len(returned)} " + ", ".join(type(t).__name__ for t in returned)
        return f"returned a {what}; return a pair of tensors (values, indices)"
    values, indices = (t.detach().clone() for t in returned)
    return values, indices


# ----------------------------------------------------------------------------------------
# What is right, computed in one process.
# ----------------------------------------------------------------------------------------

def _x(rank: int, step: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s vector at ``step``: signs mixed, magnitudes spread (no ties)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    spread = 1 + torch.randperm(numel, generator=g).to(torch.float64) / max(1, numel // 6)
    return (torch.randn(numel, generator=g, dtype=torch.float64) * spread).to(dtype)


def _sparse(c: torch.Tensor, k: int) -> torch.Tensor:
    """``c`` with all but its k largest-magnitude coordinates set to zero: what is sent."""
    out = torch.zeros_like(c)
    idx = c.abs().topk(k).indices
    out[idx] = c[idx]
    return out


def _owed(c: torch.Tensor, k: int) -> torch.Tensor:
    """The residual after sending the top-k of ``c``: ``c`` minus what was sent."""
    return c - _sparse(c, k)


def _unsent(c: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """``c`` with the coordinates the student sent set to zero (with the top-k's when the
    indices are not k distinct valid ones): part A's residual is judged on its own choice."""
    if indices.shape != (k,) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        return _owed(c, k)
    indices = indices.long()
    if indices.min() < 0 or indices.max() >= c.numel() or indices.unique().numel() != k:
        return _owed(c, k)
    out = c.clone()
    out[indices] = 0
    return out


def _reference(world_size, numel, k, steps, dtype) -> list[list[torch.Tensor]]:
    """Every rank's residual after every step: ``[step][rank]``."""
    residuals = [torch.zeros(numel, dtype=dtype) for _ in range(world_size)]
    out = []
    for step in range(steps):
        residuals = [_owed(_x(r, step, numel, dtype) + residuals[r], k)
                     for r in range(world_size)]
        out.append(residuals)
    return out


# ----------------------------------------------------------------------------------------
# Explaining what is wrong: the rank, the step, the element, expected against got.
# ----------------------------------------------------------------------------------------

def _selection_problem(returned, c, k, where, x) -> str | None:
    values, indices = returned
    if values.shape != (k,) or indices.shape != (k,):
        return (f"{where}: returned values of shape {tuple(values.shape)} and indices of shape "
                f"{tuple(indices.shape)}; expected ({k},) each, one per coordinate sent")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        return f"{where}: the indices are {indices.dtype}; return integer indices (int64)"
    indices = indices.long()
    if indices.min() < 0 or indices.max() >= c.numel():
        return f"{where}: index {indices.max().item()} is outside x ({c.numel()} coordinates)"
    if indices.unique().numel() != k:
        return f"{where}: an index appears twice in {sorted(indices.tolist())}"
    want = set(c.abs().topk(k).indices.tolist())
    got = set(indices.tolist())
    if got != want:
        extra, missing = min(got - want), max(want - got, key=lambda i: c[i].abs().item())
        hint = ""
        if got == set(c.topk(k).indices.tolist()):
            hint = (" You kept the k largest values; keep the k largest magnitudes "
                    "(c.abs()): a large negative entry matters as much.")
        elif got == set(x.abs().topk(k).indices.tolist()):
            hint = " That is the top-k of x alone: add the residual first, c = x + residual."
        return (f"{where}: index {extra} was sent (|c| = {c[extra].abs().item():.4g}) but "
                f"index {missing} was not (|c| = {c[missing].abs().item():.4g}), where c = x + "
                f"residual: send the k = {k} largest |c|.{hint}")
    for value, i in zip(values.tolist(), indices.tolist()):
        if abs(value - c[i].item()) > ATOL * (1 + abs(c[i].item())):
            hint = (" That is x alone: send c = x + residual." if
                    abs(value - x[i].item()) <= ATOL * (1 + abs(x[i].item())) else "")
            return (f"{where}: the value sent for index {i} is {value:.6g}; expected "
                    f"c[{i}] = x[{i}] + residual[{i}] = {c[i].item():.6g}.{hint}")
    return None


def _residual_problem(after, want, before, x, k, where) -> str | None:
    """What is wrong with the residual ``after`` a step that started from ``before``."""
    if after.shape != want.shape:
        return f"{where}: the residual changed shape to {tuple(after.shape)}"
    bad = ~torch.isclose(after, want, atol=ATOL)
    if not bad.any():
        return None
    e = int(bad.nonzero()[0])
    c = x + before
    expected = ("0: that coordinate was sent, nothing of it is owed"
                if want[e].item() == 0 and c[e].item() != 0 else
                f"{want[e].item():.6g}, what is still owed there (x + old residual)")
    hint = ""
    if torch.equal(after, before):
        hint = " It did not change: update it in place (residual.copy_(...) or residual[...] =)."
    elif torch.allclose(after, c - want, atol=ATOL):
        hint = " It holds what was sent; it must hold what was NOT sent."
    elif before.abs().sum() > 0 and torch.allclose(after, _owed(x, k), atol=ATOL):
        hint = " It forgot the old residual: it must be x + old residual - sent."
    return (f"{where}, element {e}: the residual is {after[e].item():.6g}; expected "
            f"{expected} ({int(bad.sum())} of {after.numel()} elements differ).{hint}")


def _mean_problem(out, want, sent, xs, k, rank, where) -> str | None:
    if out.shape != want.shape:
        return (f"{where}: returned shape {tuple(out.shape)}; expected {tuple(want.shape)}, "
                "the shape of x")
    out = out.to(want.dtype)
    if torch.allclose(out, want, atol=ATOL):
        return None
    p = len(sent)

    def same(t):
        return torch.allclose(out, t, atol=ATOL)

    hint = ""
    if same(want * p):
        hint = " That is the sum over the ranks: divide by the number of ranks."
    elif p > 1 and same(sent[rank]):
        hint = " That is this rank's own top-k: the others' never arrived."
    elif same(torch.stack(xs).mean(0)):
        hint = " That is the uncompressed mean: nothing was left out."
    elif same(torch.stack([_sparse(x, k) for x in xs]).mean(0)):
        hint = " That is the mean of the top-k of x alone: add the residual first."
    e = int((~torch.isclose(out, want, atol=ATOL)).nonzero()[0])
    senders = [r for r in range(p) if sent[r][e] != 0]
    who = (f"ranks {senders} sent it" if senders else "no rank sent it")
    return (f"{where}, element {e}: the mean is {out[e].item():.6g}; expected "
            f"{want[e].item():.6g} ({who}; the mean is over all {p} ranks).{hint}")


def _traffic_problem(nbytes, budget, k, where) -> str:
    if nbytes == 0:
        return (f"{where}: the mean is right, but this rank sent no bytes through distlab.comm: "
                "communicate with comm.all_gather so the ledger counts what you send")
    return (f"{where}: the mean is right, but this rank sent {nbytes} bytes; the all-gather of "
            f"k = {k} values and indices sends at most {budget}. Send the sparse part only "
            "(comm.all_gather of the values and of the indices), not a dense vector.")


def _case(world_size, numel, k, dtype) -> str:
    return f"{world_size} ranks, {numel} {str(dtype).replace('torch.', '')} coordinates, k = {k}"


def _require_case(world_size, numel, k, steps, dtype, points) -> None:
    require_case(world_size, numel, dtype, points)
    require_arg("k", k, is_int(k) and 1 <= k <= numel, f"an int in 1..numel={numel}")
    require_arg("steps", steps, is_int(steps) and steps >= 1, "an int >= 1")
