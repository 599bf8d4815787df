"""Lab 08's assignment: the example-weighted gradient average (part A), then one gossip round
of decentralized SGD with point-to-point messages (part B).

* ``weighted_average(grad, my_batch, group=None)``: ``grad`` is the mean gradient of this
  rank's ``b_r = my_batch`` examples; it returns ``sum_r b_r·g_r / B``, the global batch's
  gradient, on every rank (``dist.all_reduce`` of ``[b_r·g_r, b_r]``: ``2(p-1)·alpha +
  2(p-1)/p·n·beta``), so ranks with unequal shares still take single-process SGD's step.
* ``gossip(x, neighbours, weights, group=None)``: rank i sends its ``x`` to each neighbour,
  receives theirs and returns ``sum_j W_ij x_j``: one round of D-PSGD's averaging (Lian et
  al. 2017, arXiv 1705.09056, algorithm 1), ``d·(alpha + n·beta)`` per rank for ``d``
  neighbours with ``dist.isend``/``dist.irecv``, whatever the number of ranks.

What is right: single-process SGD on the global batch (part A) and ``W @ X`` with ``W`` the
mixing matrix of :mod:`distlab.decentralized.topology` (part B). distlab's own averaging and
gossip, and every collective in part B, are off limits (see :data:`FORBIDDEN_A`,
:data:`FORBIDDEN_B`). In part B each worker wraps ``dist.isend/irecv/send/recv`` to see every
message (to whom, what) and to wait for a message at most :data:`WAIT` seconds, so a missing
message is named (which rank waited for which neighbour) instead of hanging.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from distlab.checks import is_int, require_arg
from distlab.decentralized import topology as graphs
from distlab.exercises import Verdict, forbid, launch_student, require_case
from distlab.exercises.collectives import FORBIDDEN as COLLECTIVES
from distlab.exercises.messages import MissingMessage, watched

FORBIDDEN_A = ("distlab.data_parallel.ddp.average_gradients",)
"""Part A may not call distlab's gradient averaging."""
WHY_A = "write the weighted average yourself, with dist.all_reduce"
FORBIDDEN_B = COLLECTIVES + ("torch.distributed.all_to_all", "torch.distributed.scatter",
                             "torch.distributed.gather",
                             "distlab.decentralized.topology.gossip_average",
                             "distlab.decentralized.topology.mix")
"""Part B may not call any collective, nor distlab's own gossip round."""
WHY_B = "gossip is point to point: dist.isend to each neighbour, dist.irecv from each"
LR = 0.1
"""Part A's SGD step."""
WAIT = 10.0
"""Seconds a part B rank waits for a message before the check says which one is missing."""
POINTS_B = {"mix": 6 / 8, "traffic": 2 / 8}
"""How part B's points are shared: every rank's mix right, then only neighbours messaged."""


def check_weighted_average(student_fn: Callable, *, points: float, batches=(1, 3),
                           numel: int = 5, steps: int = 3,
                           dtype: torch.dtype = torch.float32) -> Verdict:
    """Part A: ``len(batches)`` ranks train a least-squares model of ``numel`` weights for
    ``steps`` SGD steps; rank r holds ``batches[r]`` examples of each global batch and calls
    ``student_fn(grad, batches[r], None)``; every rank's result must be the global batch's
    mean gradient, single-process SGD's, at every step."""
    require_arg("batches", batches, isinstance(batches, (tuple, list)) and 1 <= len(batches) <= 8
                and all(is_int(b) and b >= 1 for b in batches), "1..8 ints >= 1")
    require_arg("steps", steps, is_int(steps) and 1 <= steps <= 20, "an int in 1..20")
    require_case(len(batches), numel, dtype, points)
    batches = tuple(batches)
    results, failed = launch_student(
        "weighted_average", student_fn, _run_average, len(batches), student_fn, batches,
        numel, steps, dtype, timeout=60, points=points,
        hang_hint="every rank must make the same all-reduce calls, in the same order")
    if failed is not None:
        return failed
    case = (f"{len(batches)} ranks with batches {list(batches)}, {numel} {_name(dtype)} "
            f"weight{'s' * (numel != 1)}")
    w = torch.nn.Parameter(torch.linspace(-1, 1, numel, dtype=dtype))
    optimizer = torch.optim.SGD([w], lr=LR)
    for step in range(steps):
        X, y = _global_batch(step, sum(batches), numel, dtype)
        local = [_gradient(w.detach(), X[s], y[s]) for s in _shards(batches)]
        want = _gradient(w.detach(), X, y)          # single-process SGD's, on the global batch
        for rank, records in enumerate(results):
            got = records[step] if step < len(records) else "stopped early"
            problem = _average_problem(got, want, local, batches, rank)
            if problem:
                return Verdict(False, f"{case}: rank {rank}, step {step}: {problem}", 0, points)
        w.grad = want
        optimizer.step()
    return Verdict(True, f"{case}: every rank got the global batch's gradient at every one of "
                         f"{steps} steps: single-process SGD", points, points)


def check_gossip(student_fn: Callable, *, points: float, topology: str = "ring",
                 world_size: int = 4, numel: int = 6, rounds: int = 2,
                 dtype: torch.dtype = torch.float32) -> Verdict:
    """Part B: ``rounds`` gossip rounds on ``world_size`` ranks over ``topology`` (one of
    ``topology.TOPOLOGIES``, built by ``topology.build``), each round's input the last
    round's output. Every rank's result must be row i of ``W @ X``
    (3/4 of the points); then each rank must have sent exactly one message to each
    neighbour and none to anyone else, per round (1/4)."""
    require_arg("topology", topology, topology in graphs.TOPOLOGIES,
                f"one of {graphs.TOPOLOGIES}")
    require_arg("rounds", rounds, is_int(rounds) and 1 <= rounds <= 10, "an int in 1..10")
    require_case(world_size, numel, dtype, points)
    graph = graphs.build(topology, world_size)
    results, failed = launch_student(
        "gossip", student_fn, _run_gossip, world_size, student_fn, topology, numel, rounds,
        dtype, timeout=rounds * WAIT + 40, points=points,
        hang_hint="every dist.isend needs a matching dist.irecv on the neighbour, and every "
                  "request its wait()")
    if failed is not None:
        return failed
    case = (f"{graph.name} of {world_size} ranks, {numel} {_name(dtype)} "
            f"element{'s' * (numel != 1)}")
    W = graph.mixing_matrix()
    traffic = None
    for k in range(rounds):
        problem = _missing_message(results, k)
        if problem:
            return Verdict(False, f"{case}: round {k}: {problem}", 0, points)
        X = torch.stack([records[k]["x"] for records in results]).double()     # (p, numel)
        want = W @ X
        for i, records in enumerate(results):
            problem = _mix_problem(records[k], want[i], X, W, results, i, k, graph)
            if problem:
                return Verdict(False, f"{case}: round {k}: {problem}", 0, points)
            traffic = traffic or _traffic_problem(records[k], graph, i, k)
    if traffic:
        return Verdict(False, f"{case}: every rank's mix is right, but {traffic}",
                       points * POINTS_B["mix"], points)
    return Verdict(True, f"{case}: every rank got sum_j W_ij x_j in each of {rounds} rounds, "
                         f"one message to each neighbour and none to anyone else",
                   points, points)


# ----------------------------------------------------------------------------------------
# Part A: on each rank, and what is wrong with a result.
# ----------------------------------------------------------------------------------------

def _run_average(student_fn, batches, numel, steps, dtype):
    """Rank r's averaged gradient (or a sentence on what came back), step after step."""
    rank = dist.get_rank()
    w = torch.nn.Parameter(torch.linspace(-1, 1, numel, dtype=dtype))
    optimizer = torch.optim.SGD([w], lr=LR)
    mine = _shards(batches)[rank]
    records = []
    for step in range(steps):
        X, y = _global_batch(step, sum(batches), numel, dtype)
        grad = _gradient(w.detach(), X[mine], y[mine])
        with forbid(*FORBIDDEN_A, why=WHY_A):
            out = student_fn(grad.clone(), batches[rank], None)
        out = _returned(out, grad)
        records.append(out)
        w.grad = out.to(dtype) if isinstance(out, torch.Tensor) else torch.zeros_like(grad)
        optimizer.step()
    return records


def _average_problem(got, want, local, batches, rank) -> str | None:
    if isinstance(got, str):
        return got
    got, want, local = got.double(), want.double(), [g.double() for g in local]
    if torch.allclose(got, want, rtol=1e-4, atol=1e-6):
        return None
    B, p = sum(batches), len(batches)
    candidates = {
        "That is the plain mean of the ranks' gradients: with unequal batches weight rank "
        f"r's by its b_r (here {list(batches)}) and divide by B = {B}": sum(local) / p,
        f"That is sum_r b_r·g_r: divide by the global batch B = sum_r b_r = {B} (all-reduce "
        "my_batch too)": sum(b * g for b, g in zip(batches, local)),
        "That is the sum of the ranks' gradients: weight each by b_r, divide by B": sum(local),
        "That is this rank's own gradient: the other ranks' were not added": local[rank]}
    close = dict(rtol=1e-4, atol=1e-6)
    hint = next((h for h, t in candidates.items() if torch.allclose(got, t, **close)), "")
    e = int((~torch.isclose(got, want, **close)).nonzero()[0])
    return (f"element {e} of the averaged gradient is {got[e].item():.6g}; single-process SGD "
            f"on the global batch of {B} examples has {want[e].item():.6g}. {hint}").strip()


def _global_batch(step, batch_size, numel, dtype):
    """Step ``step``'s global batch ``X (B, numel)``, ``y (B,)`` of a noisy linear model."""
    g = torch.Generator().manual_seed(8000 + step)
    X = torch.randn(batch_size, numel, generator=g, dtype=torch.float64)
    y = X @ torch.arange(1.0, numel + 1, dtype=torch.float64) + torch.randn(
        batch_size, generator=g, dtype=torch.float64)
    return X.to(dtype), y.to(dtype)


def _shards(batches) -> list[slice]:
    """Rank r's rows of the global batch: ``batches[r]`` of them, after the earlier ranks'."""
    ends = torch.tensor(batches).cumsum(0).tolist()
    return [slice(end - b, end) for b, end in zip(batches, ends)]


def _gradient(w, X, y):
    """The mean-squared-error gradient at ``w`` over the examples ``X, y``."""
    w = w.detach().clone().requires_grad_(True)
    torch.nn.functional.mse_loss(X @ w, y).backward()
    return w.grad


# ----------------------------------------------------------------------------------------
# Part B: on each rank, every message seen; what is wrong with a round.
# ----------------------------------------------------------------------------------------

def _run_gossip(student_fn, name, numel, rounds, dtype):
    """Per round: this rank's input ``x``, its result, and the messages it sent and received."""
    rank = dist.get_rank()
    graph = graphs.build(name, dist.get_world_size())
    x = _x(rank, numel, dtype)
    records = []
    for k in range(rounds):
        log = {"x": x, "sent": [], "received": [], "missing": None}
        records.append(log)
        try:
            with watched(log, WAIT), forbid(*FORBIDDEN_B, why=WHY_B):
                out = student_fn(x.clone(), list(graph.neighbours(rank)), graph.weights(rank),
                                 None)
        except MissingMessage as e:
            log["missing"] = (time.monotonic(), e.kind, e.peer, str(e))
            break
        log["out"] = out = _returned(out, x)
        if isinstance(out, torch.Tensor):
            x = out.to(dtype)
    return records


def _missing_message(results, k) -> str | None:
    """The first message of round ``k`` a rank gave up waiting for, with who did not send it."""
    missing = sorted((log["missing"], i) for i, records in enumerate(results)
                     for log in records[k:k + 1] if log["missing"])
    if not missing:
        return None
    (_, kind, peer, message), i = missing[0]
    if kind == "recv" and peer is not None and k < len(results[peer]) and not any(
            dst == i for dst, _ in results[peer][k]["sent"]):
        message += (f": rank {peer} sent nothing to its neighbour rank {i} (each rank sends "
                    "its x to every neighbour)")
    return message


def _mix_problem(log, want, X, W, results, i, k, graph) -> str | None:
    got = log["out"]
    if isinstance(got, str):
        return f"rank {i}: {got}"
    tol = dict(rtol=1e-5, atol=1e-6) if got.dtype == torch.float32 else dict(rtol=1e-9, atol=0)
    if torch.allclose(got.double(), want, **tol):
        return None
    for j in graph.neighbours(i):
        sent = [t for dst, t in results[j][k]["sent"] if dst == i]
        if not sent:
            return f"rank {i}'s result is wrong, and neighbour {j} sent it no message"
        if not torch.allclose(sent[0].double(), X[j], **tol):
            hint = (" It was scaled before it was sent: send x itself." if torch.allclose(
                sent[0].double(), W[j, j] * X[j], **tol) else "")
            return (f"the message rank {j} sent to its neighbour rank {i} is not rank {j}'s x "
                    f"(element 0: {sent[0][0].item():.6g}, x holds {X[j, 0].item():.6g}).{hint}")
        heard = [waited for peer, waited in log["received"] if peer == j]
        if not heard:
            return f"rank {i} never received from its neighbour rank {j}"
        if not any(heard):
            return (f"rank {i} did not wait() for its irecv from neighbour {j}: the buffer may "
                    "still be empty when it is used")
    return f"rank {i}: " + _weights_problem(got.double(), want, X, W, i)


def _weights_problem(got, want, X, W, i) -> str:
    """Whose x has the wrong weight in rank ``i``'s result (least squares over the ranks' x)."""
    e = int((~torch.isclose(got, want, rtol=1e-5, atol=1e-6)).nonzero()[0])
    where = f"element {e} is {got[e].item():.6g}; W @ X has {want[e].item():.6g}"
    p, numel = X.shape
    if numel < p or torch.linalg.matrix_rank(X) < p:
        return where
    c = torch.linalg.lstsq(X.T, got.unsqueeze(1)).solution.squeeze(1)           # (p,)
    if (X.T @ c - got).abs().max() > 1e-4 * (1 + got.abs().max()):
        return f"{where} (it is no weighted sum of the ranks' x)"
    j = int((c - W[i]).abs().argmax())
    who = "its own x" if j == i else f"rank {j}'s x"
    hint = ""
    if torch.allclose(c[W[i] > 0], torch.ones_like(c[W[i] > 0]), atol=1e-4):
        hint = " That is the plain sum: weight each x_j by weights[j]."
    elif j == i and abs(c[i]) < 1e-6:
        hint = " Add this rank's own term, weights[rank] * x."
    weight = round(float(c[j]), 4) + 0.0          # (no -0 or -3e-09 in a sentence)
    return f"{where}: it holds {who} with weight {weight:g}, expected W[{i}, {j}] = {W[i, j]:.4g}.{hint}"


def _traffic_problem(log, graph, i, k) -> str | None:
    to = [dst for dst, _ in log["sent"]]
    for dst in sorted(set(to) - set(graph.neighbours(i))):
        return (f"in round {k} rank {i} sent to rank {dst}, which is not its neighbour on the "
                f"{graph.name} (its neighbours: {list(graph.neighbours(i))}): gossip talks to "
                "neighbours only")
    for j in graph.neighbours(i):
        if to.count(j) != 1:
            return (f"in round {k} rank {i} sent {to.count(j)} messages to neighbour {j} "
                    "through dist.isend/send; one, of its x, is enough")
    return None


def _x(rank, numel, dtype):
    g = torch.Generator().manual_seed(800 + rank)
    return (torch.randn(numel, generator=g, dtype=torch.float64) + rank).to(dtype)


def _returned(out, like):
    """The tensor a student's function returned, or a sentence on what came back instead."""
    if not isinstance(out, torch.Tensor):
        return f"returned a {type(out).__name__}; return a tensor shaped like its input"
    if out.shape != like.shape:
        return f"returned shape {tuple(out.shape)}; expected {tuple(like.shape)}"
    return out.detach().clone()


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")
