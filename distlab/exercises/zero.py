"""Lab 04's assignment: which shard a rank owns (part A) and a whole ZeRO-2 step (part B).

Part A, ``shard_of(flat, rank, world_size) -> Tensor``: the chunk of the flat parameter
vector ``flat`` (n elements) that rank ``rank`` owns, in the layout of PyTorch's FSDP2 and
of :class:`distlab.sharding.layout.ShardLayout`: ``flat`` padded with zeros to N·c elements,
c = ceil(n / N), and cut into N chunks of c; rank r owns chunk r (its last elements, or all
of them, may be padding).

Part B, ``Zero2(param, optimizer_class, group=None, **defaults)`` with ``step(grad)``: ZeRO
stage 2 (Rajbhandari et al. 2020, section 5) for one flat parameter ``param`` (n,), the same
on every rank. ``step(grad)`` takes this rank's own gradient of its own loss, *not*
averaged; it reduce-scatters the gradients so that the rank keeps only the average of its
own chunk (with ``comm.isend``/``comm.irecv``: gloo has no reduce-scatter), steps its chunk
with ``optimizer_class`` built over that chunk alone (its state is 1/N of the whole), then
all-gathers the chunks into ``param``. Cost per step: (N-1)·alpha + (N-1)/N·n·beta for the
reduce-scatter and as much for the all-gather, one all-reduce's worth.

The checker computes what is right from torch alone (``optimizer_class`` on one process over
the whole batch) and hands ``Zero2`` a subclass of ``optimizer_class`` that records what it
is given, so it can say which half is wrong: the gradient each rank's optimizer sees
(the reduce-scatter), its own chunk after the step, and the whole parameter (the all-gather).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from distlab.checks import is_int, require_arg
from distlab.exercises import Verdict, forbid, launch_student, require_case

OPTIMIZERS = {"adam": (torch.optim.Adam, {"lr": 0.05}),
              "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})}
ROWS = 3
"""Examples per rank in every step's batch."""
SHARE = {"reduce_scatter": 3, "shard_step": 2, "all_gather": 3}
"""Part B's points, in eighths: the reduce-scatter, the step of the own chunk, the all-gather."""
OFF_LIMITS = ("distlab.sharding.zero.ShardedOptimizer.__init__",
              "distlab.sharding.zero.NaiveDistributedOptimizer.__init__",
              "distlab.sharding.layout.ShardLayout.__init__",
              "distlab.sharding.layout.reduce_scatter",
              "distlab.sharding.layout.all_gather_rows",
              "distlab.communication.collectives.ring_reduce_scatter",
              "distlab.communication.collectives.ring_all_reduce",
              "distlab.comm.reduce_scatter_tensor",
              "torch.distributed.all_reduce",
              "torch.distributed.reduce_scatter_tensor")
WHY = ("this assignment is ZeRO's own sharding, reduce-scatter and all-gather: write the "
       "reduce-scatter with comm.isend/comm.irecv and all-gather with "
       "comm.all_gather_into_tensor")


def expected_shard(flat: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Chunk ``rank`` of ``flat`` padded to a multiple of ``world_size``: (c,)."""
    c = math.ceil(flat.numel() / world_size)
    padded = torch.zeros(world_size * c, dtype=flat.dtype)
    padded[:flat.numel()] = flat
    return padded.view(world_size, c)[rank]        # (N, c) -> this rank's row


# ----------------------------------------------------------------------------------------
# Part A: which chunk a rank owns.
# ----------------------------------------------------------------------------------------

def check_shard_of(student_fn: Callable, *, points: float, world_size: int = 4,
                   numel: int = 10, dtype: torch.dtype = torch.float32) -> Verdict:
    """Each of ``world_size`` real processes calls ``student_fn(flat, rank, world_size)`` on
    ``flat = 1, 2, ..., numel``; every rank must return its padded chunk of c elements."""
    require_case(world_size, numel, dtype, points)
    results, failed = launch_student("shard_of", student_fn, _run_shard_of, world_size,
                                     student_fn, numel, dtype, points=points)
    if failed is not None:
        return failed
    flat = _flat(numel, dtype)
    c = math.ceil(numel / world_size)
    case = f"{numel} elements on {world_size} ranks (c = ceil({numel}/{world_size}) = {c})"
    for rank, (got, flat_after) in enumerate(results):
        want = expected_shard(flat, rank, world_size)
        problem = _shard_problem(got, want, rank, c, numel, dtype)
        if problem is None and not torch.equal(flat_after, flat):
            problem = f"rank {rank} returned its chunk but changed flat: leave it as it was"
        if problem is not None:
            return Verdict(False, f"{case}: {problem}", 0.0, points)
    return Verdict(True, f"{case}: every rank returned its chunk of {c}, "
                         f"{world_size * c - numel} padding zero(s) at the end", points, points)


def _run_shard_of(student_fn, numel, dtype):
    import torch.distributed as dist
    flat = _flat(numel, dtype)
    with forbid(*OFF_LIMITS, why=WHY):
        got = student_fn(flat, dist.get_rank(), dist.get_world_size())
    got = got.detach().clone() if isinstance(got, torch.Tensor) else type(got).__name__
    return got, flat


def _shard_problem(got, want, rank, c, numel, dtype) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"rank {rank} returned a {got}, not a torch.Tensor"
    if got.shape != want.shape:
        return (f"rank {rank} returned shape {tuple(got.shape)}; every rank's chunk has "
                f"c = {c} elements, padded with zeros where flat runs out, so that the "
                "reduce-scatter and the all-gather move equal chunks")
    if got.dtype != dtype:
        return f"rank {rank} returned {got.dtype}; expected flat's dtype {dtype}"
    bad = (got != want).nonzero()
    if len(bad) == 0:
        return None
    j = int(bad[0])
    where = (f"rank {rank}, element {j} of its chunk (element {rank * c + j} of the padded "
             f"vector)")
    if rank * c + j >= numel:
        return f"{where} is {got[j].item():g}: it lies past the {numel} elements, padding: 0"
    return f"{where} is {got[j].item():g}, expected flat[{rank * c + j}] = {want[j].item():g}"


# ----------------------------------------------------------------------------------------
# Part B: a whole ZeRO-2 step.
# ----------------------------------------------------------------------------------------

def check_zero2(student_cls: Callable, *, points: float, world_size: int = 4, numel: int = 10,
                num_steps: int = 3, optimizer: str = "adam",
                dtype: torch.dtype = torch.float32) -> Verdict:
    """Train a least-squares model with ``student_cls`` on ``world_size`` real processes for
    ``num_steps`` steps (each rank's gradient from its own ``ROWS`` examples of the step's
    batch) and compare, step by step and rank by rank, with ``optimizer`` on one process
    over the whole batch.

    Points: 3/8 for the reduce-scatter (each rank's optimizer sees the average of its chunk,
    and the rank really sent (N-1)·c elements per step through ``comm.isend``), 2/8 for the
    rank's own chunk after the step (its optimizer holds that chunk only), 3/8 for the whole
    parameter on every rank (one all-gather per step).
    """
    require_case(world_size, numel, dtype, points)
    require_arg("num_steps", num_steps, is_int(num_steps) and num_steps >= 1, "an int >= 1")
    require_arg("optimizer", optimizer, optimizer in OPTIMIZERS, f"one of {sorted(OPTIMIZERS)}")
    results, failed = launch_student(
        "Zero2", student_cls, _run_zero2, world_size, student_cls, numel, num_steps, optimizer,
        dtype, points=points, timeout=60,
        hang_hint="in a ring every isend needs the matching irecv on the neighbour, and every "
                  "rank must call the all-gather once per step")
    if failed is not None:
        return failed
    c = math.ceil(numel / world_size)
    case = (f"{optimizer}, {numel} elements on {world_size} ranks (chunks of {c}), "
            f"{num_steps} steps, {str(dtype).replace('torch.', '')}")
    found = {"reduce_scatter": _reduce_scatter_problem(results, c, dtype),
             "shard_step": _shard_step_problem(results, c, numel, optimizer),
             "all_gather": _all_gather_problem(results, c)}
    if not any(found.values()):       # each half right: then the whole must be, too
        found["all_gather"] = _reference_problem(
            results, _reference(numel, num_steps, world_size, optimizer, dtype), c)
    earned = sum(SHARE[k] for k, problem in found.items() if problem is None)
    problems = [p for p in found.values() if p is not None]
    if not problems:
        return Verdict(True, f"{case}: every rank reduce-scattered the gradients, stepped only "
                             f"its chunk of {c} and all-gathered the rest; equal to one-process "
                             f"{optimizer} at every step", points, points)
    return Verdict(False, f"{case}: " + "\n".join(problems), points * earned / 8, points)


def _run_zero2(student_cls, numel, num_steps, optimizer, dtype):
    import torch.distributed as dist
    from distlab import comm
    rank, world_size = dist.get_rank(), dist.get_world_size()
    cls, hyper = OPTIMIZERS[optimizer]
    log = {"numels": None, "grads": []}
    param = _initial(numel, dtype)
    with forbid(*OFF_LIMITS, why=WHY):
        zero = student_cls(param, _recording(cls, log), None, **hyper)
    params, handed, sent, gathers = [], [], [], []
    for step in range(num_steps):
        X, y = _batch(step, numel, world_size, dtype)
        mine = slice(rank * ROWS, (rank + 1) * ROWS)              # this rank's rows
        grad = _gradient(param, X[mine], y[mine])                  # of its own mean loss
        handed.append(grad.clone())
        comm.ledger().reset()
        with forbid(*OFF_LIMITS, why=WHY):
            zero.step(grad)
        ops = comm.ledger().by_op()
        sent.append(ops.get("send", {}).get("bytes_sent", 0))
        gathers.append(ops.get("all_gather", {}).get("calls", 0))
        params.append(param.detach().clone())
    return {"params": params, "handed": handed, "sent": sent, "gathers": gathers, **log}


def _recording(cls, log: dict):
    """``cls`` that notes the elements it is built over and the gradients it steps with."""
    class Recorded(cls):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            log["numels"] = [p.numel() for g in self.param_groups for p in g["params"]]

        def step(self, closure=None):
            log["grads"].append([None if p.grad is None else p.grad.detach().clone()
                                 for g in self.param_groups for p in g["params"]])
            return super().step(closure)
    Recorded.__name__ = Recorded.__qualname__ = cls.__name__
    return Recorded


def _reduce_scatter_problem(results, c, dtype) -> str | None:
    world_size = len(results)
    for step in range(len(results[0]["params"])):
        handed = torch.stack([r["handed"][step] for r in results])          # (N, n)
        average, total = handed.mean(0), handed.sum(0)
        for rank, res in enumerate(results):
            if res["numels"] is None or len(res["grads"]) <= step:
                return (f"rank {rank}'s optimizer_class was not built or not stepped by "
                        f"step {step + 1}: build optimizer_class(...) over this rank's chunk "
                        "once, in __init__, and call its step() in every step")
            grads = res["grads"][step]
            if len(grads) != 1 or grads[0] is None:
                return (f"step {step + 1}, rank {rank}: its optimizer holds {len(grads)} "
                        "tensor(s), with .grad " + ("missing" if None in grads else "set") +
                        "; build it over one, this rank's chunk, and set the chunk's .grad")
            got = grads[0].reshape(-1)
            want = expected_shard(average, rank, world_size)[:got.numel()]
            if got.numel() == 0 or torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                continue
            j = int((~torch.isclose(got, want, rtol=1e-4, atol=1e-6)).nonzero()[0])
            hint = ""
            if torch.allclose(got, expected_shard(total, rank, world_size)[:got.numel()]):
                hint = " That is the sum over the ranks: divide by N for the average."
            elif torch.allclose(got, expected_shard(res["handed"][step], rank,
                                                    world_size)[:got.numel()]):
                hint = " That is this rank's own gradient: no reduce-scatter happened."
            return (f"step {step + 1}, rank {rank}: its optimizer saw gradient element {j} of "
                    f"its chunk (element {rank * c + j} of the parameter) = {got[j].item():.6g}, "
                    f"expected the average over the {world_size} ranks, {want[j].item():.6g}."
                    f"{hint}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        ring = (world_size - 1) * c * itemsize
        for rank, res in enumerate(results):
            if res["sent"][step] != ring:
                return (f"step {step + 1}, rank {rank}: the gradients are right, but it sent "
                        f"{res['sent'][step]} bytes through comm.isend; a ring reduce-scatter "
                        f"of N·c = {world_size * c} elements sends (N-1)·c·{itemsize} = "
                        f"{ring} bytes per rank per step")
    return None


def _shard_step_problem(results, c, numel, optimizer) -> str | None:
    """Replays each rank's optimizer on the gradients it saw: the chunk's step alone."""
    world_size, (cls, hyper) = len(results), OPTIMIZERS[optimizer]
    for rank, res in enumerate(results):
        owned = max(0, min(c, numel - rank * c))            # its chunk without the padding
        if res["numels"] is None or len(res["grads"]) < len(res["params"]):
            return f"rank {rank}'s optimizer_class was not built, or not stepped every step"
        if len(res["numels"]) != 1 or res["numels"][0] not in (c, owned):
            return (f"rank {rank}'s optimizer holds {sum(res['numels'])} elements; ZeRO keeps "
                    f"the optimizer state of its own chunk only, {c} elements (1/{world_size})")
        initial = _initial(numel, res["params"][0].dtype)
        chunk = expected_shard(initial, rank, world_size)[:res["numels"][0]].requires_grad_()
        replay = cls([chunk], **hyper)
        lo, hi = min(rank * c, numel), min((rank + 1) * c, numel)
        for step, got in enumerate(res["params"]):
            seen = res["grads"][step][0]
            if seen is None:
                return f"step {step + 1}, rank {rank}: its optimizer stepped without a .grad"
            chunk.grad = seen.reshape(chunk.shape)
            replay.step()
            problem = _first_wrong(got[lo:hi], chunk.detach()[:hi - lo], lo, rank, c)
            if problem:
                return (f"after step {step + 1}, rank {rank}: in its own chunk, {problem}, "
                        "what its optimizer makes of the gradient it saw: write the stepped "
                        "chunk into param")
    return None


def _all_gather_problem(results, c) -> str | None:
    """Every rank must hold, in each chunk, what the chunk's owner stepped."""
    numel = results[0]["params"][0].numel()
    for step in range(len(results[0]["params"])):
        owners = torch.cat([res["params"][step][min(k * c, numel):min((k + 1) * c, numel)]
                            for k, res in enumerate(results)])                   # (n,)
        for rank, res in enumerate(results):
            problem = _first_wrong(res["params"][step], owners, 0, rank, c, "its owner holds")
            if problem:
                before = (_initial(numel, owners.dtype) if step == 0
                          else res["params"][step - 1])
                hint = (" param did not change: write the gathered chunks into it, in place"
                        if torch.equal(res["params"][step], before) else
                        " did every rank all-gather the stepped chunks?")
                return f"after step {step + 1}, rank {rank}: {problem}.{hint}"
            if res["gathers"][step] != 1 and len(results) > 1:
                return (f"step {step + 1}, rank {rank}: the parameters are right but it made "
                        f"{res['gathers'][step]} all-gather calls through distlab.comm; one "
                        "comm.all_gather_into_tensor per step is all ZeRO needs")
    return None


def _reference_problem(results, want, c) -> str | None:
    for step, expected in enumerate(want):
        for rank, res in enumerate(results):
            problem = _first_wrong(res["params"][step], expected, 0, rank, c)
            if problem:
                return (f"after step {step + 1}, rank {rank}: {problem}, from one-process "
                        "training on the whole batch")
    return None


def _first_wrong(got, want, offset, rank, c, expected="expected") -> str | None:
    bad = (~torch.isclose(got, want, rtol=1e-4, atol=1e-5)).nonzero()
    if len(bad) == 0:
        return None
    i = offset + int(bad[0])
    owner = i // c
    return (f"parameter element {i} (rank {owner}'s chunk, its element {i - owner * c}) is "
            f"{got[i - offset].item():.6g}, {expected} {want[i - offset].item():.6g}")


def _reference(numel, num_steps, world_size, optimizer, dtype) -> list[torch.Tensor]:
    """The parameter after each step of ``optimizer`` on one process over the whole batch."""
    cls, hyper = OPTIMIZERS[optimizer]
    w = _initial(numel, dtype).requires_grad_()
    opt = cls([w], **hyper)
    out = []
    for step in range(num_steps):
        X, y = _batch(step, numel, world_size, dtype)
        w.grad = _gradient(w.detach(), X, y)
        opt.step()
        out.append(w.detach().clone())
    return out


def _gradient(w, X, y) -> torch.Tensor:
    """The gradient of the mean squared error of ``X @ w`` against ``y``: (n,)."""
    return 2 / len(y) * X.T @ (X @ w - y)


def _batch(step, numel, world_size, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    X = torch.randn(world_size * ROWS, numel, generator=g, dtype=torch.float64)   # (N·R, n)
    y = torch.randn(world_size * ROWS, generator=g, dtype=torch.float64)
    return X.to(dtype), y.to(dtype)


def _initial(numel, dtype) -> torch.Tensor:
    return torch.linspace(-1, 1, numel, dtype=dtype)


def _flat(numel, dtype) -> torch.Tensor:
    return torch.arange(1, numel + 1, dtype=dtype)
