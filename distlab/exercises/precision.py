"""Lab 09's assignment: overflow detection (part A) and a dynamic loss scaler's step with
fp32 master weights (part B).

Part A, ``found_inf(grads, group=None) -> bool``: True on *every* rank of ``group`` when any
gradient of ``grads`` (a list of tensors, None entries skipped) holds an inf or a NaN on
*any* rank. Each rank checks its own, then one all-reduce (MAX) of a one-element flag makes
them agree, so that every rank skips the same step: alpha + 4·beta, latency only.

Part B, ``MixedPrecisionOptimizer(params, optimizer_class, group=None, *, init_scale,
growth_factor, backoff_factor, growth_interval, **defaults)`` (Micikevicius et al. 2018,
arXiv 1710.03740, sections 3.1-3.2): fp16 ``params`` stepped through fp32 masters;
``scale(loss)`` is ``loss * S``; ``step()`` averages the gradients in fp32 (distlab's one
averaging), unscales, checks (part A), steps and refreshes the fp16 params or skips, and
updates S. Each part is graded on what the run handed it (a replay of the rank's inputs),
then the whole run against ``torch.amp.GradScaler("cpu")`` on one process. GradScaler and
distlab's :class:`~distlab.precision.loss_scaling.DynamicLossScaler` are off limits.
"""
from __future__ import annotations

from typing import Callable

import torch

from distlab.checks import is_int, is_number, require_arg
from distlab.exercises import Verdict, forbid, launch_student

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OPTIMIZERS = {"adam": (torch.optim.Adam, {"lr": 0.05}),
              "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})}
ROWS = 3
"""Examples per rank in every step's batch."""
SHARE = {"scales": 3, "skips": 2, "params": 3}
"""Part B's points, in eighths: the loss scales, the skipped steps, the parameters."""
OFF_LIMITS = ("torch.amp.GradScaler.__init__", "torch.amp.GradScaler.scale",
              "torch.amp.GradScaler.unscale_", "torch.amp.GradScaler.step",
              "torch.amp.GradScaler.update", "torch._amp_update_scale_",
              "torch._amp_foreach_non_finite_check_and_unscale_", "distlab.precision.mixed."
              "fp16_step", *(f"distlab.precision.loss_scaling.DynamicLossScaler.{m}"
                             for m in ("__init__", "unscale_and_check", "update")))
WHY = ("this assignment is the loss scaler itself: check with torch.isfinite, agree with "
       "dist.all_reduce, and keep the scale yourself")


# -- Part A: overflow detection, agreed over the ranks ------------------------------------

def scenarios(world_size: int) -> list[tuple[str, dict]]:
    """``(what it is, {(rank, tensor, element): value})``: the non-finite values planted
    in each scenario's gradients, in the order every rank checks them."""
    last = world_size - 1
    return [("every gradient finite", {}),
            (f"rank {last}'s gradient 1 has inf at element 2", {(last, 1, 2): float("inf")}),
            ("rank 0's gradient 0 has NaN at element 0", {(0, 0, 0): float("nan")}),
            (f"rank {last}'s gradient 2 has -inf at element 1", {(last, 2, 1): float("-inf")}),
            ("every gradient finite, some as large as the dtype allows", {"large": True})]


def check_found_inf(student_fn: Callable, *, points: float, world_size: int = 2,
                    numel: int = 5, dtype: torch.dtype = torch.float32) -> Verdict:
    """Every rank calls ``student_fn(grads, None)`` on its own gradients (three tensors of
    about ``numel`` elements and a None) in each of :func:`scenarios`; each rank must
    return True exactly when some rank's gradients hold an inf or a NaN, and leave the
    gradients as they were."""
    _require_case(world_size, numel, dtype, points)
    results, failed = launch_student(
        "found_inf", student_fn, _run_found_inf, world_size, student_fn, numel, dtype,
        points=points, hang_hint="every rank must join the same all-reduce, once per call")
    if failed is not None:
        return failed
    case = f"{world_size} ranks, {str(dtype).replace('torch.', '')} gradients"
    for k, (what, planted) in enumerate(scenarios(world_size)):
        want = bool(planted) and "large" not in planted
        where = f"{case}, scenario {k + 1} ({what}): rank"
        for rank, (got, changed) in enumerate(res[k] for res in results):
            problem = (f"returned {got}; return a bool" if isinstance(got, str) else
                       f"changed gradient {changed}; only look at them" if changed is not None
                       else None if got == want else f"returned {got}, expected {want}")
            if problem and got is False and want and not any(p[0] == rank for p in planted):
                problem += (": its own gradients are finite, another rank's are not; the ranks "
                            "must agree (all-reduce the flag with MAX) so that all skip the "
                            "step together")
            elif problem and got is True and not want:
                problem += ": a large finite value is no overflow (torch.isfinite)"
            if problem:
                return Verdict(False, f"{where} {rank} {problem}", 0.0, points)
    return Verdict(True, f"{case}: every rank agreed in all {len(scenarios(world_size))} "
                         "scenarios (inf, -inf, NaN on one rank; finite values)",
                   points, points)


def _run_found_inf(student_fn, numel, dtype):
    import torch.distributed as dist
    rank = dist.get_rank()
    out = []
    for _, planted in scenarios(dist.get_world_size()):
        grads = [torch.linspace(-1, 1, numel + i, dtype=dtype) for i in range(3)]
        if "large" in planted:
            grads[1][0] = torch.finfo(dtype).max
            grads[2][-1] = -torch.finfo(dtype).max
        for (r, i, j), value in ((k, v) for k, v in planted.items() if k != "large"):
            if r == rank:
                grads[i][j] = value
        before = [g.clone() for g in grads]
        with forbid(*OFF_LIMITS, why=WHY):
            got = student_fn([grads[0], None, grads[1], grads[2]], None)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = bool(got.item())
        elif not isinstance(got, bool):
            got = f"a {type(got).__name__}"
        changed = next((i for i, (g, b) in enumerate(zip(grads, before))
                        if not torch.equal(g.view(-1).nan_to_num(7.0),
                                           b.view(-1).nan_to_num(7.0))), None)
        out.append((got, changed))
    return out


# -- Part B: the loss scaler's step with fp32 master weights ------------------------------

def check_mixed_precision_step(student_cls: Callable, *, points: float, world_size: int = 2,
                               numel: int = 6, num_steps: int = 8, optimizer: str = "adam",
                               init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                               backoff_factor: float = 0.5, growth_interval: int = 2,
                               overflows=((3, 1, "inf"), (6, 0, "nan"))) -> Verdict:
    """Train fp16 least squares (``numel`` weights, ``ROWS`` examples per rank and step) with
    ``student_cls`` on ``world_size`` real processes for ``num_steps`` steps, planting an inf
    or a NaN in a rank's fp16 gradient at each ``(step, rank, kind)`` of ``overflows``.
    Points (:data:`SHARE`): 3/8 the loss scales, 2/8 the skipped steps (the optimizer did
    not step), 3/8 the master and fp16 weights, each replayed on the run's own gradients.
    """
    _require_case(world_size, numel, torch.float16, points)
    for name, value, ok, allowed in (
            ("num_steps", num_steps, is_int(num_steps) and num_steps >= 1, "an int >= 1"),
            ("optimizer", optimizer, optimizer in OPTIMIZERS, f"one of {sorted(OPTIMIZERS)}"),
            ("init_scale", init_scale, is_number(init_scale) and init_scale > 0, "a number > 0"),
            ("growth_factor", growth_factor, is_number(growth_factor) and growth_factor > 1,
             "a number > 1"),
            ("backoff_factor", backoff_factor, is_number(backoff_factor)
             and 0 < backoff_factor < 1, "a number in (0, 1)"),
            ("growth_interval", growth_interval, is_int(growth_interval)
             and growth_interval >= 1, "an int >= 1")):
        require_arg(name, value, ok, allowed)
    overflows = tuple(tuple(o) for o in overflows)
    require_arg("overflows", overflows, all(
        len(o) == 3 and is_int(o[0]) and 0 <= o[0] < num_steps and is_int(o[1])
        and 0 <= o[1] < world_size and o[2] in ("inf", "nan") for o in overflows),
        "(step, rank, 'inf' or 'nan') triples within num_steps and world_size")
    hyper = dict(init_scale=float(init_scale), growth_factor=float(growth_factor),
                 backoff_factor=float(backoff_factor), growth_interval=growth_interval)
    results, failed = launch_student(
        "MixedPrecisionOptimizer", student_cls, _run_step, world_size, student_cls, numel,
        num_steps, optimizer, hyper, overflows, points=points, timeout=60,
        hang_hint="every rank must join the same collectives in every step, skipped or not")
    if failed is not None:
        return failed
    case = (f"{optimizer}, {numel} fp16 weights on {world_size} ranks, {num_steps} steps, "
            f"S from {init_scale:g}, growth x{growth_factor:g} every {growth_interval} "
            f"clean steps, backoff x{backoff_factor:g}")
    # Each part is graded on what this run handed it (a replay), so one mistake costs
    # its own part; once all are right, the whole run must be GradScaler's.
    replayed = [replay(results, rank, numel, optimizer, hyper) for rank in range(world_size)]
    found = {"scales": _scale_problem(results, replayed, hyper),
             "skips": _skip_problem(results, replayed),
             "params": _param_problem(results, replayed)}
    want = reference(numel, num_steps, world_size, optimizer, hyper, overflows)
    if not any(found.values()):
        found["params"] = _param_problem(results, [want] * world_size, "GradScaler's")
    earned = sum(SHARE[k] for k, problem in found.items() if problem is None)
    problems = [p for p in found.values() if p is not None]
    if not problems:
        skipped = [s for s, w in enumerate(want) if w["skipped"]]
        return Verdict(True, f"{case}: loss scales, skipped steps {skipped} and parameters "
                             "equal GradScaler's at every step on every rank", points, points)
    return Verdict(False, f"{case}: " + "\n".join(problems), points * earned / 8, points)


def reference(numel, num_steps, world_size, optimizer, hyper, overflows) -> list[dict]:
    """``torch.amp.GradScaler("cpu")`` on one process, every rank's fp16 gradient averaged
    in fp32: after each step the scale, the skip, the master and the fp16 weights."""
    cls, opt_hyper = OPTIMIZERS[optimizer]
    w16 = _initial(numel).requires_grad_()
    master = w16.detach().float().requires_grad_()
    opt = cls([master], **opt_hyper)
    scaler = torch.amp.GradScaler("cpu", **hyper)
    out = []
    for step in range(num_steps):
        grads = []
        for rank in range(world_size):
            w16.grad = None
            scaler.scale(_loss(w16, step, rank, world_size)).backward()
            grads.append(_planted(w16.grad.clone(), step, rank, overflows))
        master.grad = torch.stack([g.float() for g in grads]).sum(0) / world_size
        skipped = not bool(torch.isfinite(master.grad).all())
        scaler.step(opt)
        scaler.update()
        if not skipped:
            with torch.no_grad():
                w16.copy_(master)
        out.append({"scale": scaler.get_scale(), "skipped": skipped,
                    "master": master.detach().clone(), "w16": w16.detach().clone()})
    return out


def replay(results: list, rank: int, numel, optimizer, hyper) -> list[dict]:
    """What rank ``rank``'s steps should have made of the gradients the ranks were handed:
    the fp32 average, unscaled by the S the rank used, its overflow, the step or the skip,
    and S updated by the rule from ``init_scale``."""
    cls, opt_hyper = OPTIMIZERS[optimizer]
    master = _initial(numel).float().requires_grad_()
    opt = cls([master], **opt_hyper)
    scale, clean, out = hyper["init_scale"], 0, []
    w16 = _initial(numel)
    for step, row in enumerate(results[rank]):
        average = torch.stack([res[step]["handed"].float() for res in results]).mean(0)
        overflow = not bool(torch.isfinite(average).all())
        if not overflow:
            master.grad = average * (1.0 / row["used"])
            opt.step()
            w16 = master.detach().half()
        clean = 0 if overflow else clean + 1
        if overflow:
            scale *= hyper["backoff_factor"]
        elif clean == hyper["growth_interval"]:
            scale, clean = scale * hyper["growth_factor"], 0
        out.append({"scale": scale, "skipped": overflow, "master": master.detach().clone(),
                    "w16": w16.clone()})
    return out


def _run_step(student_cls, numel, num_steps, optimizer, hyper, overflows):
    import torch.distributed as dist
    rank, world_size = dist.get_rank(), dist.get_world_size()
    cls, opt_hyper = OPTIMIZERS[optimizer]
    log = {"params": None, "steps": 0}
    w16 = _initial(numel).requires_grad_()
    with forbid(*OFF_LIMITS, why=WHY):
        trainer = student_cls([w16], _recording(cls, log), None, **hyper, **opt_hyper)
    rows = []
    for step in range(num_steps):
        loss = _loss(w16, step, rank, world_size)
        with forbid(*OFF_LIMITS, why=WHY):
            scaled = trainer.scale(loss)
        scaled.backward()
        w16.grad = _planted(w16.grad, step, rank, overflows)
        handed, used = w16.grad.clone(), float(getattr(trainer, "loss_scale", "nan"))
        before = log["steps"]
        with forbid(*OFF_LIMITS, why=WHY):
            trainer.step()
        w16.grad = None
        masters = log["params"] or []
        rows.append({"scale": float(getattr(trainer, "loss_scale", "nan")), "used": used, "handed": handed,
                     "ratio": float(scaled.detach()) / float(loss.detach()),
                     "stepped": log["steps"] > before, "w16": w16.detach().clone(),
                     "masters": [m.detach().clone() for m in masters]})
    return rows



def _recording(cls, log: dict):
    """``cls`` that keeps the tensors it steps and counts its steps."""
    class Recorded(cls):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            log["params"] = [p for g in self.param_groups for p in g["params"]]

        def step(self, closure=None):
            log["steps"] += 1
            return super().step(closure)
    Recorded.__name__ = Recorded.__qualname__ = cls.__name__
    return Recorded


def _scale_problem(results, want, hyper) -> str | None:
    for step in range(len(results[0])):
        for rank, res in enumerate(results):
            row, w = res[step], want[rank][step]
            if row["scale"] != row["scale"]:
                return ("there is no loss_scale attribute holding S (a float): keep it "
                        "in self.loss_scale")
            if abs(row["ratio"] - row["used"]) > 1e-6 * row["used"]:
                return (f"step {step + 1}, rank {rank}: scale(loss) returned loss x "
                        f"{row['ratio']:g}, but loss_scale was {row['used']:g}: return "
                        "loss.float() * S")
            if abs(row["scale"] - w["scale"]) <= 1e-6 * w["scale"]:
                continue
            before = hyper["init_scale"] if step == 0 else want[rank][step - 1]["scale"]
            why = (f"step {step + 1} overflowed: S times backoff_factor" if w["skipped"] else
                   f"after {hyper['growth_interval']} clean steps in a row S grows"
                   if w["scale"] > before else "S changes only on an overflow or a growth")
            return (f"after step {step + 1}, rank {rank}: loss_scale is {row['scale']:g}, "
                    f"expected {w['scale']:g} ({why}; it was {before:g})")
    return None


def _skip_problem(results, want) -> str | None:
    for step in range(len(results[0])):
        for rank, res in enumerate(results):
            skipped = want[rank][step]["skipped"]
            if res[step]["stepped"] == skipped:
                return (f"step {step + 1}, rank {rank}: " + (
                    "the optimizer stepped, but a gradient was inf or NaN (on some rank) "
                    "after the averaging: skip the step" if skipped else
                    "the step was skipped, but every gradient was finite"))
    return None


def _param_problem(results, want, source: str = "the step on the averaged gradient, "
                                                "unscaled by 1/S") -> str | None:
    for step in range(len(results[0])):
        for rank, res in enumerate(results):
            w = want[rank][step]
            masters = res[step]["masters"]
            if len(masters) != 1 or masters[0].dtype != torch.float32:
                return (f"rank {rank}: the optimizer holds {[str(m.dtype) for m in masters]}; "
                        "build it over one fp32 master copy of each fp16 parameter")
            j = _first_off(masters[0].reshape(-1), w["master"], 1e-4, 1e-5)
            if j is not None:
                return (f"after step {step + 1}, rank {rank}: master weight {j} is "
                        f"{masters[0].reshape(-1)[j].item():.6g}, expected "
                        f"{w['master'][j].item():.6g} ({source})")
            j = _first_off(res[step]["w16"].float(), w["w16"].float(), 1e-3, 1e-3)
            if j is not None:
                return (f"after step {step + 1}, rank {rank}: fp16 weight {j} is "
                        f"{res[step]['w16'][j].item():.5g}, expected {w['w16'][j].item():.5g}: "
                        "copy the stepped masters into the fp16 parameters, in place")
    return None


def _first_off(got, want, rtol, atol) -> int | None:
    bad = (~torch.isclose(got, want, rtol=rtol, atol=atol)).nonzero()
    return int(bad[0]) if len(bad) else None


def _loss(w16, step, rank, world_size) -> torch.Tensor:
    """Rank ``rank``'s fp32 mean squared error of its fp16 predictions in ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    X = torch.randn(world_size * ROWS, w16.numel(), generator=g)     # (N·R, n)
    y = torch.randn(world_size * ROWS, generator=g)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    prediction = (X[mine].half() @ w16).float()                     # fp16 compute, (R,)
    return ((prediction - y[mine]) ** 2).mean()


def _planted(grad, step, rank, overflows):
    for s, r, kind in overflows:
        if (s, r) == (step, rank):
            grad = grad.clone()
            grad[0] = float(kind)
    return grad


def _initial(numel) -> torch.Tensor:
    return torch.linspace(-1, 1, numel).half()


def _require_case(world_size, numel, dtype, points) -> None:
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= 8,
                "an int in 1..8")
    require_arg("numel", numel, is_int(numel) and numel >= 3, "an int >= 3")
    require_arg("dtype", dtype, dtype in DTYPES, f"one of {DTYPES}")
    require_arg("points", points, is_number(points) and points >= 0, "a number >= 0")
