"""Lab 06 exercise: a top-k all-reduce with error feedback.

The student writes ``topk_all_reduce(x, residual, k, group=None) -> torch.Tensor``. Every
rank passes its own vector ``x`` and its own error-feedback ``residual`` (same shape). The
function must

1. add the residual: ``c = x + residual`` (what this rank still owes the others);
2. keep the k coordinates of ``c`` of largest *magnitude*;
3. update ``residual`` in place to ``c`` with those k coordinates set to zero (the residual
   carries exactly what was not sent);
4. send only the k values and their indices, with ``comm.all_gather``;
5. return, on every rank, the mean over the ranks of the sparse vectors that were sent.

The checker runs it on 3 real processes for 3 steps and compares every rank's output and
residual with its own simulation, naming the first rank and step that differ and what the
difference looks like.
"""
from __future__ import annotations

from typing import Callable

import torch

from distlab.exercises import Verdict, launch_student, register

WORLD_SIZE, NUMEL, K, STEPS = 3, 24, 4, 3


@register("topk_all_reduce")
def topk_all_reduce(x: torch.Tensor, residual: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """Reference solution: error feedback, top-k by magnitude, all-gather values and indices."""
    import torch.distributed as dist
    from distlab import comm
    c = x + residual                                  # what this rank owes
    indices = c.abs().topk(k).indices                 # the k largest magnitudes
    values = c[indices]
    residual.copy_(c)
    residual[indices] = 0                             # keep exactly what is not sent
    p = dist.get_world_size(group)
    all_values = [torch.empty_like(values) for _ in range(p)]
    all_indices = [torch.empty_like(indices) for _ in range(p)]
    comm.all_gather(all_values, values, group=group)
    comm.all_gather(all_indices, indices, group=group)
    out = torch.zeros_like(x)
    for v, i in zip(all_values, all_indices):
        out.index_add_(0, i, v)                       # ranks may pick the same coordinate
    return out / p


def _x(rank: int, step: int) -> torch.Tensor:
    # Distinct magnitudes (no ties in top-k), signs mixed, different on every rank and step.
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(NUMEL, generator=g) * (1 + torch.randperm(NUMEL, generator=g) / 4)


def _run_student(student_fn: Callable):
    import torch.distributed as dist
    from distlab import comm
    rank = dist.get_rank()
    residual = torch.zeros(NUMEL)
    steps = []
    for step in range(STEPS):
        before = comm.ledger().totals()["bytes_sent"]
        out = student_fn(_x(rank, step), residual, K)
        sent = comm.ledger().totals()["bytes_sent"] - before
        if not isinstance(out, torch.Tensor):
            return ("type", step, type(out).__name__)
        steps.append((out.detach().float().clone(), residual.clone(), sent))
    return ("ok", steps)


def _sparse(c: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(c)
    out[idx] = c[idx]
    return out


def _simulate(add_residual=True, by_magnitude=True):
    """What every rank should get at every step: [(outputs per rank, residuals per rank)]."""
    residuals = [torch.zeros(NUMEL) for _ in range(WORLD_SIZE)]
    steps = []
    for step in range(STEPS):
        sent = []
        for r in range(WORLD_SIZE):
            c = _x(r, step) + (residuals[r] if add_residual else 0)
            idx = (c.abs() if by_magnitude else c).topk(K).indices
            sent.append(_sparse(c, idx))
            residuals[r] = c - sent[-1]
        steps.append((torch.stack(sent).mean(0), [t.clone() for t in residuals], sent))
    return steps


def _close(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def check_topk_all_reduce(student_fn: Callable) -> Verdict:
    """Run ``student_fn`` on 3 real processes for 3 steps and say what, if anything, is wrong."""
    results, verdict = launch_student(
        "topk_all_reduce", student_fn, _run_student, WORLD_SIZE, student_fn, timeout=60,
        hang_hint="every rank must make the same collective calls, with tensors of the same "
                  "shape (k values and k indices each)")
    if verdict is not None:
        return verdict
    want = _simulate()
    no_feedback, by_value = _simulate(add_residual=False), _simulate(by_magnitude=False)
    budget = (WORLD_SIZE - 1) * K * (4 + 8)   # all-gather of k float32 values + k int64 indices
    for step in range(STEPS):
        mean, residuals, sent = want[step]
        for rank, res in enumerate(results):
            if res[0] == "type":
                return Verdict(False, f"rank {rank} returned a {res[2]} at step {res[1]}, "
                                      "not a torch.Tensor")
            out, residual, nbytes = res[1][step]
            where = f"rank {rank}, step {step}"
            if out.shape != mean.shape:
                return Verdict(False, f"{where}: returned shape {tuple(out.shape)}; expected "
                                      f"{tuple(mean.shape)}, the shape of x")
            if not _close(out, mean):
                if _close(out, no_feedback[step][0]):
                    hint = (" That is the top-k of x alone: add the residual to x before "
                            "choosing the k coordinates.")
                elif _close(out, by_value[step][0]):
                    hint = (" You kept the k largest values; keep the k largest magnitudes "
                            "(x.abs()), a large negative entry matters as much.")
                elif _close(out, mean * WORLD_SIZE):
                    hint = " That is the sum over the ranks: divide by the number of ranks."
                elif _close(out, sent[rank]):
                    hint = " That is this rank's own top-k: the others' never arrived."
                elif _close(out, torch.stack([_x(r, step) for r in range(WORLD_SIZE)]).mean(0)):
                    hint = " That is the uncompressed mean: nothing was left out."
                else:
                    n_bad = (~torch.isclose(out, mean, atol=1e-5)).sum().item()
                    hint = f" {n_bad} of {NUMEL} coordinates differ."
                return Verdict(False, f"{where}: the mean of the sent top-k vectors is wrong."
                                      + hint)
            if not _close(residual, residuals[rank]):
                previous = torch.zeros(NUMEL) if step == 0 else want[step - 1][1][rank]
                if _close(residual, previous):
                    hint = " It did not change: update it in place (residual.copy_(...))."
                elif _close(residual, sent[rank]):
                    hint = (" It holds what was sent; it must hold what was NOT sent "
                            "(x + residual minus the sent coordinates).")
                elif _close(residual, _x(rank, step) - sent[rank]):
                    hint = " It forgot the old residual: it must be x + old residual - sent."
                else:
                    n_bad = (~torch.isclose(residual, residuals[rank], atol=1e-5)).sum().item()
                    hint = f" {n_bad} of {NUMEL} coordinates differ."
                return Verdict(False, f"{where}: the residual is wrong; it must carry exactly "
                                      f"what was not sent.{hint}")
            if nbytes > budget:
                return Verdict(False, f"{where}: right answer, but this rank sent {nbytes} "
                                      f"bytes; an all-gather of k={K} values and indices "
                                      f"sends at most {budget}. Send the sparse part only "
                                      "(comm.all_gather), not a dense vector.")
    return Verdict(True, f"all {WORLD_SIZE} ranks got the right mean and residual at every "
                         f"one of {STEPS} steps, sending {results[0][1][-1][2]} bytes per "
                         f"step instead of {2 * (WORLD_SIZE - 1) * 4 * NUMEL // WORLD_SIZE} "
                         "for a float32 all-reduce")
