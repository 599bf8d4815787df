"""Lab 03 assignment: the SSP wait condition (part A), then the parameter server's apply
loop (part B), both run on real processes.

Part A, ``may_proceed(clock, clocks, staleness) -> bool``: may a worker that is about to
start ``clock`` go on, given the clocks of the live workers (gradients each has pushed)? (Ho
et al. 2013, section 3.) :func:`check_ssp_wait` asks it a table of cases, then plugs it into
distlab's parameter server (:mod:`distlab.asynchronous.parameter_server`) with a straggler
and replays the server's log of versions to see whether any worker ran too far ahead.

Part B, ``serve(x, num_workers, staleness, lr, num_updates, group=None) -> log``: the server
rank's loop. It sends each worker ``[go, version] + x``, receives pushes ``[worker] + g``
from whichever worker is first, measures the staleness ``tau = version - (the version that
worker was sent)``, applies ``x -= lr / (1 + tau) * g`` (a staleness-aware rate in the
spirit of Zhang et al. 2016, section 3.2), lets each waiting worker go on as soon as the SSP
rule allows, and after ``num_updates`` updates tells every worker to stop. It returns
``[(worker, tau)]``, one entry per update. :func:`check_server` runs it on rank 0 with
checker-written workers on ranks ``1..num_workers`` (worker 0 a straggler); each worker
records every reply it got (version, parameters) and every gradient it pushed. The check
replays the updates in the order of the log: the staleness of each, the parameters every
worker was sent and the final ``x`` must be the replay's, and every worker must have been
released at the first version at which the rule let it go on, never earlier.

Communication: each push is ``alpha + (P+1) beta`` in, each reply ``alpha + (P+2) beta`` out.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, require_arg
from distlab.exercises import ForbiddenCall, Verdict, forbid, launch_student

CASES = [  # (clock, clocks of the live workers, staleness, expected)
    (0, [0, 0, 0], 0, True), (1, [1, 0, 1], 0, False), (1, [1, 1, 1], 0, True),
    (3, [3, 2, 1], 2, True), (4, [4, 2, 1], 2, False), (2, [2, 2, 1], 1, True),
    (3, [3, 3, 1], 1, False), (50, [50, 0, 7], None, True), (5, [5, 5], 3, True),
]
FORBIDDEN = ("distlab.asynchronous.ps_config.may_proceed",
             "distlab.asynchronous.ps_server.ParameterServer.serve",
             "distlab.asynchronous.ps_server.ParameterServer.on_push",
             "distlab.asynchronous.ps_server.ParameterServer.apply")
WHY = "write the rule and the loop yourself"
NUM_FEATURES = 5          # part B's model: least squares, x has 5 entries
TRUE_X = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
STEP_TIME = 0.01          # seconds per gradient; the straggler (worker 0) takes SLOWDOWN x
SLOWDOWN = 4


def check_ssp_wait(student_fn, *, points: float, staleness: int = 1, num_workers: int = 3,
                   timeout: float = 60) -> Verdict:
    """Part A: the cases (half the points), then the real server with a 4x straggler."""
    require_arg("staleness", staleness, is_int(staleness) and staleness >= 0, "an int >= 0")
    require_arg("num_workers", num_workers, is_int(num_workers) and 2 <= num_workers <= 4, "2..4")
    if not callable(student_fn):
        return Verdict(False, f"may_proceed must be a function, got {type(student_fn).__name__}",
                       0.0, points)
    for clock, clocks, s, expected in CASES:
        try:
            with forbid(*FORBIDDEN, why=WHY):
                got = student_fn(clock, list(clocks), s)
        except NotImplementedError:
            return Verdict(False, "may_proceed is not implemented yet: replace `raise "
                                  "NotImplementedError()` with your code", 0.0, points)
        except ForbiddenCall as e:
            return Verdict(False, str(e), 0.0, points)
        except Exception as e:  # noqa: BLE001 - the student's bug, reported as such
            return Verdict(False, f"may_proceed({clock}, {clocks}, {s}) raised "
                                  f"{type(e).__name__}: {e}", 0.0, points)
        if not isinstance(got, (bool, int)) or bool(got) != expected:
            lead = clock - min(clocks)
            why = ("no bound: an asynchronous worker never waits" if s is None else
                   f"the worker is {lead} clock(s) ahead of the slowest (clock {min(clocks)}), "
                   f"{'within' if expected else 'more than'} the bound s={s}, so it "
                   f"{'may go on' if expected else 'must wait'}")
            return Verdict(False, f"may_proceed(clock={clock}, clocks={clocks}, "
                                  f"staleness={s}) returned {got!r}, expected {expected}: "
                                  f"{why}.", 0.0, points)
    from distlab.asynchronous import parameter_server as ps
    from distlab.problems.convex import WORKLOAD
    config = ps.ParameterServerConfig(
        replace(WORKLOAD, lr=0.02, num_steps=45), num_workers=num_workers, staleness=staleness,
        step_time=0.004, slowdown=(1,) * (num_workers - 1) + (4,), wait_rule=student_fn)
    results, verdict = launch_student(
        "may_proceed", student_fn, _train_forbidding, config.world_size, config,
        timeout=timeout, points=points,
        hang_hint="a rule that never lets the slowest worker go on stops every worker")
    if verdict is not None:
        return Verdict(False, f"every case right, but on the real server {verdict.message}",
                       points / 2, points)
    server = results[0]
    pushed, loosest = [0] * num_workers, 0
    for event in server["log"]:
        if event[0] == "push":
            pushed[event[1]] = event[2] + 1
            continue
        _, w, clock, version, _ = event
        gap = clock - min(pushed)
        loosest = max(loosest, gap)
        if gap > staleness:
            return Verdict(False, f"every case right, but on the real server worker {w} "
                                  f"started clock {clock} (at version {version}) while the "
                                  f"slowest had pushed only {min(pushed)} gradients: {gap} "
                                  f"clocks ahead, more than staleness={staleness}.",
                           points / 2, points)
    if staleness > 0 and loosest < staleness:
        return Verdict(False, f"the bound holds, but no worker ever got {staleness} clocks "
                              "ahead: your rule waits more than SSP needs (it behaves like "
                              "BSP); let a worker go on while clock - min(clocks) <= s.",
                       points / 2, points)
    return Verdict(True, f"every case right, and on {num_workers + 1} real processes with a 4x "
                         f"straggler no worker ran more than {staleness} clock(s) ahead "
                         f"({server['version']} updates).", points, points)


def check_server(student_fn, *, points: float, num_workers: int = 3, staleness: int | None = 1,
                 num_updates: int = 30, lr: float = 0.02, timeout: float = 60) -> Verdict:
    """Part B: run ``student_fn`` as the server; replay its log against what workers saw.

    Points: the staleness of every update right, 25%; the parameters (every reply and the
    final ``x``) the replay's with ``lr / (1 + tau)``, 40%; every worker released at the
    first version the SSP rule allows and never earlier, 35%.
    """
    require_arg("num_workers", num_workers, is_int(num_workers) and 1 <= num_workers <= 4, "1..4")
    require_arg("staleness", staleness, staleness is None or (is_int(staleness) and staleness >= 0),
                "an int >= 0 or None")
    require_arg("num_updates", num_updates, is_int(num_updates) and 1 <= num_updates <= 200,
                "1..200")
    results, verdict = launch_student(
        "serve", student_fn, _run_server_loop, num_workers + 1, student_fn, num_workers,
        staleness, lr, num_updates, timeout=timeout, points=points,
        hang_hint="every worker waits for a reply after each push: after num_updates "
                  "updates, send [0, version] + x (stop) to each waiting worker and to each "
                  "worker whose push arrives, and return once all are told")
    if verdict is not None:
        return verdict
    x, log = results[0]
    pulls = results[1:]     # pulls[w][c] = (version, x it was sent, gradient it pushed)
    order, problem = _read_log(log, pulls, num_updates)
    if problem:
        return Verdict(False, problem, 0.0, points)
    checks = [(0.25, _wrong_staleness(order, pulls)),
              (0.40, _wrong_parameters(order, pulls, x, lr)),
              (0.35, _wrong_release(order, pulls, staleness, num_updates))]
    problems = [p for _, p in checks if p]
    earned = points * sum(share for share, p in checks if not p)
    if problems:
        return Verdict(False, "\n".join(problems), earned, points)
    taus = [tau for _, _, tau in order]
    return Verdict(True, f"{num_updates} updates from {num_workers} workers replayed exactly: "
                         f"staleness 0..{max(taus)}, each step lr/(1+tau), every worker "
                         f"released as soon as staleness={staleness} allowed", points, points)


# -- what runs on each rank -------------------------------------------------------------------

def _train_forbidding(config):
    from distlab.asynchronous import parameter_server as ps
    with forbid(*FORBIDDEN[:1], why=WHY):
        return ps.train(config)


def _run_server_loop(student_fn, num_workers, staleness, lr, num_updates):
    rank = dist.get_rank()
    if rank > 0:
        return _work(rank - 1)
    x = torch.zeros(NUM_FEATURES)
    with forbid(*FORBIDDEN, why=WHY):
        log = student_fn(x, num_workers, staleness, lr, num_updates, None)
    return x, log


def _work(w: int) -> list:
    """Worker ``w`` (rank w+1): pull, compute a least-squares gradient, push; until stopped."""
    X, y = _data(w)
    pulls = []
    while True:
        reply = torch.empty(2 + NUM_FEATURES)
        comm.recv(reply, src=0)
        if reply[0].item() == 0:
            return pulls
        x = reply[2:].clone()
        rows = torch.randint(len(y), (8,), generator=torch.Generator().manual_seed(len(pulls)))
        g = 2 * X[rows].T @ (X[rows] @ x - y[rows]) / len(rows)   # (P,)
        pulls.append((int(reply[1].item()), x, g))
        time.sleep(STEP_TIME * (SLOWDOWN if w == 0 else 1))
        comm.send(torch.cat([torch.tensor([float(w)]), g]), 0)


def _data(w: int):
    g = torch.Generator().manual_seed(100 + w)
    X = torch.randn(64, NUM_FEATURES, generator=g)
    return X, X @ TRUE_X + 0.1 * torch.randn(64, generator=g)


# -- the replay -------------------------------------------------------------------------------

def _read_log(log, pulls, num_updates):
    """``[(worker, clock, tau)]`` per update, or a problem with the log itself."""
    if not isinstance(log, (list, tuple)):
        return None, (f"serve returned {type(log).__name__}; it must return the log, a list "
                      "of (worker, staleness), one per update")
    if len(log) != num_updates:
        return None, (f"the log has {len(log)} updates, expected num_updates={num_updates}: "
                      "apply exactly num_updates pushes, then only tell workers to stop")
    counts, order = [0] * len(pulls), []
    for k, entry in enumerate(log):
        try:
            w, tau = int(entry[0]), int(entry[1])
        except (TypeError, ValueError, IndexError):
            return None, f"log entry {k} is {entry!r}; expected (worker, staleness)"
        if not 0 <= w < len(pulls):
            return None, f"log entry {k} names worker {w}; the workers are 0..{len(pulls) - 1}"
        if counts[w] >= len(pulls[w]):
            return None, (f"update {k} is worker {w}'s gradient of clock {counts[w]}, but "
                          f"worker {w} pushed only {len(pulls[w])} gradients")
        order.append((w, counts[w], tau))
        counts[w] += 1
    return order, None


def _wrong_staleness(order, pulls) -> str | None:
    for k, (w, c, tau) in enumerate(order):
        v_read = pulls[w][c][0]
        if tau != k - v_read:
            return (f"update {k}: worker {w}'s gradient of clock {c} was computed on version "
                    f"{v_read} (the version you sent it) and applied at version {k}: staleness "
                    f"{k - v_read}, but the log says {tau}")
    return None


def _replay(order, pulls, x0, rate):
    xs = [x0]
    for k, (w, c, _) in enumerate(order):
        tau = k - pulls[w][c][0]
        xs.append(xs[-1] - rate(tau) * pulls[w][c][2])
    return xs


def _wrong_parameters(order, pulls, x, lr) -> str | None:
    x0 = torch.zeros(NUM_FEATURES)
    xs = _replay(order, pulls, x0, lambda tau: lr / (1 + tau))
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-6)   # noqa: E731
    for w, worker in enumerate(pulls):
        for c, (v, pulled, _) in enumerate(worker):
            if not 0 <= v < len(xs):
                return (f"worker {w} was sent version {v} for clock {c}; versions are "
                        f"0..{len(xs) - 1}")
            if not close(pulled, xs[v]):
                return (f"worker {w} was sent version {v} for clock {c}, but those parameters "
                        f"differ from the replay's version {v} by up to "
                        f"{(pulled - xs[v]).abs().max().item():.3g}"
                        + _which_rate(order, pulls, x0, x, lr))
    if close(x, xs[-1]):
        return None
    if close(x, x0) and not close(xs[-1], x0):
        return "x is unchanged at the end: update it in place (x -= ..., not x = x - ...)"
    return (f"the final x differs from the replay of the log by up to "
            f"{(x - xs[-1]).abs().max().item():.3g}" + _which_rate(order, pulls, x0, x, lr))


def _which_rate(order, pulls, x0, x, lr) -> str:
    for name, rate in (("lr", lambda tau: lr), ("lr / max(tau, 1)", lambda tau: lr / max(tau, 1))):
        if torch.allclose(_replay(order, pulls, x0, rate)[-1], x, rtol=1e-4, atol=1e-6):
            return f"; your updates match a step of {name}: the step is lr / (1 + tau)"
    return "; each update is x -= lr / (1 + tau) * g, with tau the staleness of that gradient"


def _wrong_release(order, pulls, staleness, num_updates) -> str | None:
    W = len(pulls)
    counts = [[0] * W]                       # counts[v]: gradients each worker had applied
    for w, _, _ in order:
        counts.append(counts[-1].copy())
        counts[-1][w] += 1
    applied_at = {(w, c): k for k, (w, c, _) in enumerate(order)}
    for w, worker in enumerate(pulls):
        if worker and worker[0][0] != 0:
            return f"worker {w} was first sent version {worker[0][0]}; the start is version 0"
        for c in range(1, len(worker) + 1):
            k = applied_at.get((w, c - 1))
            got = worker[c][0] if c < len(worker) else None   # None: told to stop
            if k is None:
                if got is not None:
                    return (f"worker {w}'s push of clock {c - 1} was not applied (the run was "
                            f"over), yet it was told to go on: tell it to stop")
                continue
            allowed = [v for v in range(k + 1, num_updates)
                       if staleness is None or c - min(counts[v]) <= staleness]
            want = allowed[0] if allowed else None
            if got == want:
                continue
            if want is None:
                return (f"worker {w} was sent version {got} to start clock {c}, but from update "
                        f"{k} (its push of clock {c - 1}) to the end the rule never let it go on"
                        + ("" if got is None or got < num_updates else
                           f": after {num_updates} updates every worker is told to stop"))
            if got is None or got > want:
                return (f"worker {w} could start clock {c} at version {want} (clocks "
                        f"{counts[want]}, {c} - {min(counts[want])} <= s={staleness}) but "
                        + ("was told to stop" if got is None else f"waited until version {got}")
                        + ": after every update, let each waiting worker go on that the rule "
                          "allows")
            return (f"worker {w} started clock {c} at version {got}, before the rule allowed "
                    + (f"(its own push of clock {c - 1} was applied only at update {k})"
                       if got <= k else
                       f"(clocks {counts[got]}: {c} - {min(counts[got])} > s={staleness})"))
    return None
