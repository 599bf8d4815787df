"""Lab 03 exercise: write the wait condition of Stale Synchronous Parallel.

The student writes ``may_proceed(clock, clocks, staleness) -> bool``: may a worker that is
about to start ``clock`` go on, given the clocks of the live workers (how many gradients
each has pushed), or must it wait for the slowest? (Ho et al. 2013, section 3.)
:func:`check_ssp_wait` first asks it a table of small cases, then plugs it into the real
parameter server (:mod:`distlab.asynchronous.parameter_server`) on 4 processes with a straggler and
replays the server's log to see whether any worker ran too far ahead.
"""
from __future__ import annotations

from dataclasses import replace

from distlab.exercises import Verdict, launch_student, register

CASES = [  # (clock, clocks of the live workers, staleness, expected)
    (0, [0, 0, 0], 0, True), (1, [1, 0, 1], 0, False), (1, [1, 1, 1], 0, True),
    (3, [3, 2, 1], 2, True), (4, [4, 2, 1], 2, False), (2, [2, 2, 1], 1, True),
    (3, [3, 3, 1], 1, False), (50, [50, 0, 7], None, True), (5, [5, 5], 3, True),
]


@register("ssp_wait")
def may_proceed(clock: int, clocks: list[int], staleness: int | None) -> bool:
    """Reference solution: go on unless more than ``staleness`` clocks ahead of the slowest."""
    if staleness is None:          # fully asynchronous: never wait
        return True
    return clock - min(clocks) <= staleness


def check_ssp_wait(student_fn, staleness: int = 1, num_workers: int = 3,
                   timeout: float = 60) -> Verdict:
    """Check the student's SSP wait condition on cases, then on a real parameter server."""
    for clock, clocks, s, expected in CASES:
        try:
            got = student_fn(clock, list(clocks), s)
        except Exception as e:  # noqa: BLE001 - the student's bug, reported as such
            return Verdict(False, f"may_proceed({clock}, {clocks}, {s}) raised "
                                  f"{type(e).__name__}: {e}")
        if not isinstance(got, (bool, int)) or bool(got) != expected:
            lead = clock - min(clocks)
            why = ("no bound: an asynchronous worker never waits" if s is None else
                   f"the worker is {lead} clock(s) ahead of the slowest (clock {min(clocks)}), "
                   f"{'within' if expected else 'more than'} the bound s={s}, so it "
                   f"{'may go on' if expected else 'must wait'}")
            return Verdict(False, f"may_proceed(clock={clock}, clocks={clocks}, "
                                  f"staleness={s}) returned {got!r}, expected {expected}: {why}.")

    from distlab.asynchronous import parameter_server as ps
    from distlab.problems.convex import WORKLOAD
    config = ps.ParameterServerConfig(
        replace(WORKLOAD, lr=0.02, num_steps=45), num_workers=num_workers,
        staleness=staleness, step_time=0.004, slowdown=(1,) * (num_workers - 1) + (4,), wait_rule=student_fn)
    results, verdict = launch_student(
        "may_proceed", student_fn, ps.train, config.world_size, config, timeout=timeout,
        hang_hint="a rule that never lets the slowest worker go on stops every worker")
    if verdict is not None:
        return Verdict(False, f"on the real server, {verdict.message}")
    server = results[0]
    pushed, loosest = [0] * num_workers, 0
    for event in server["log"]:
        if event[0] == "push":
            pushed[event[1]] = event[2] + 1
            continue
        _, w, clock, _, _ = event
        gap = clock - min(pushed)
        loosest = max(loosest, gap)
        if gap > staleness:
            return Verdict(False, f"on the real server, worker {w} (rank {w + 1}) started "
                                  f"clock {clock} while the slowest had pushed only "
                                  f"{min(pushed)} gradients: {gap} clocks ahead, more than "
                                  f"staleness={staleness}.")
    if staleness > 0 and loosest < staleness:
        return Verdict(False, f"the bound holds, but no worker ever got {staleness} clocks "
                              f"ahead: your rule waits more than SSP needs (it behaves like "
                              f"BSP); let a worker go on while clock - min(clocks) <= s.")
    return Verdict(True, f"every case right, and on {num_workers + 1} real processes with a 4x "
                         f"straggler no worker ran more than {staleness} clock(s) ahead "
                         f"({server['version']} updates).")
