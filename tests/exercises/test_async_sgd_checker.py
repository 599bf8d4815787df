"""Lab 03's checkers (distlab.exercises.async_sgd): they pass the lab's own solutions and
name the worker, clock and version of the classic mistakes, with the points each earns."""
from pathlib import Path

import pytest
import torch

from distlab import comm
from distlab.course.grading import lab_solutions
from distlab.exercises import async_sgd as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "03_async_sgd_and_staleness.ipynb"

# The lab's own solutions (the package holds none).
SOLVED = lab_solutions(LAB)
may_proceed, serve = SOLVED["may_proceed"], SOLVED["serve"]


# -- part A -------------------------------------------------------------------------------

@pytest.mark.parametrize("staleness, num_workers", [(1, 3)])
def test_wait_checker_accepts_the_labs_solution(staleness, num_workers):
    verdict = exercise.check_ssp_wait(may_proceed, points=2, staleness=staleness,
                                      num_workers=num_workers)
    assert verdict.ok and verdict.points == 2, verdict


def test_wait_checker_explains_a_rule_that_compares_with_the_fastest():
    verdict = exercise.check_ssp_wait(lambda c, cl, s: s is None or c - max(cl) <= s, points=2)
    assert not verdict and verdict.points == 0
    assert "may_proceed(clock=1, clocks=[1, 0, 1], staleness=0) returned True, expected False" \
        in verdict.message and "must wait" in verdict.message


def test_wait_checker_names_a_case_where_a_rule_that_never_waits_must_wait():
    verdict = exercise.check_ssp_wait(lambda clock, clocks, s: True, points=2)
    assert not verdict and verdict.points == 0 and "must wait" in verdict.message


def test_wait_checker_names_a_case_where_a_too_strict_rule_may_go_on():
    verdict = exercise.check_ssp_wait(lambda c, cl, s: s is None or c - min(cl) < s, points=2)
    assert not verdict and "may_proceed(clock=0, clocks=[0, 0, 0], staleness=0) returned False, " \
        "expected True" in verdict.message and "may go on" in verdict.message


def test_wait_checker_refuses_what_is_not_a_function():
    verdict = exercise.check_ssp_wait("rule", points=2)
    assert not verdict and verdict.message == "may_proceed must be a function, got str"


def calls_distlabs_rule(clock, clocks, staleness):
    from distlab.asynchronous import ps_config
    return ps_config.may_proceed(clock, clocks, staleness)


def test_wait_checker_puts_distlabs_rule_off_limits():
    verdict = exercise.check_ssp_wait(calls_distlabs_rule, points=2)
    assert not verdict and verdict.points == 0
    assert verdict.message.startswith("distlab.asynchronous.ps_config.may_proceed is off limits")


def not_written_yet(*args):
    raise NotImplementedError()


def test_wait_checker_says_not_implemented_yet_for_the_stub():
    verdict = exercise.check_ssp_wait(not_written_yet, points=2)
    assert not verdict and verdict.points == 0 and "not implemented yet" in verdict.message


# -- part B -------------------------------------------------------------------------------

@pytest.mark.parametrize("staleness, num_workers", [(1, 3)])
def test_server_checker_accepts_the_labs_solution(staleness, num_workers):
    verdict = exercise.check_server(serve, points=8, staleness=staleness, num_workers=num_workers)
    assert verdict.ok and verdict.points == 8, verdict


def serve_variant(*, rate=None, in_place=True, wait=True, log_tau=True):
    """The lab's loop with one thing changed: the step ``rate(lr, tau)``, rebinding ``x``
    instead of updating it, no wait at all, or a log that says staleness 0."""
    def variant(x, num_workers, staleness, lr, num_updates, group=None):
        box = [x]
        version, clocks, sent = 0, [0] * num_workers, [0] * num_workers
        waiting, stopped, log = set(), set(), []

        def reply(w, go):
            sent[w] = version
            comm.send(torch.cat([torch.tensor([1.0 if go else 0.0, float(version)]), box[0]]),
                      w + 1, group=group)
            if not go:
                stopped.add(w)

        for w in range(num_workers):
            reply(w, go=True)
        while len(stopped) < num_workers:
            push = torch.empty(1 + x.numel())
            comm.recv(push, group=group)
            w, g = int(push[0]), push[1:]
            if version == num_updates:
                reply(w, go=False)
                continue
            tau = version - sent[w]
            step = (rate or (lambda lr, tau: lr / (1 + tau)))(lr, tau) * g
            if in_place:
                box[0] -= step
            else:
                box[0] = box[0] - step
            version += 1
            clocks[w] += 1
            log.append((w, tau if log_tau else 0))
            waiting.add(w)
            for v in sorted(waiting):
                if version == num_updates or not wait or \
                        staleness is None or clocks[v] - min(clocks) <= staleness:
                    waiting.discard(v)
                    reply(v, go=version < num_updates)
        return log
    return variant


def test_server_checker_names_a_step_that_ignores_the_staleness():
    verdict = exercise.check_server(serve_variant(rate=lambda lr, tau: lr), points=8,
                                    staleness=None)
    assert not verdict and verdict.points == pytest.approx(8 * 0.6)
    assert "your updates match a step of lr: the step is lr / (1 + tau)" in verdict.message


def test_server_checker_says_update_x_in_place():
    verdict = exercise.check_server(serve_variant(in_place=False), points=8)
    assert not verdict and verdict.points == pytest.approx(8 * 0.6)
    assert "x is unchanged at the end: update it in place" in verdict.message


def test_server_checker_names_the_worker_released_before_the_rule_allowed():
    verdict = exercise.check_server(serve_variant(wait=False), points=8, staleness=0)
    assert not verdict and verdict.points == pytest.approx(8 * 0.65)
    assert "before the rule allowed" in verdict.message and "s=0" in verdict.message


def test_server_checker_names_the_update_whose_staleness_the_log_gets_wrong():
    verdict = exercise.check_server(serve_variant(log_tau=False), points=8, staleness=None,
                                    num_workers=3)
    assert not verdict and verdict.points == pytest.approx(8 * 0.75)
    assert "was computed on version" in verdict.message and "but the log says 0" in verdict.message


def never_stops(x, num_workers, staleness, lr, num_updates, group=None):
    for w in range(num_workers):
        comm.send(torch.cat([torch.tensor([1.0, 0.0]), x]), w + 1, group=group)
    return []


def test_server_checker_says_how_to_stop_when_workers_are_left_waiting():
    verdict = exercise.check_server(never_stops, points=8, timeout=10)
    assert not verdict and verdict.points == 0
    # (the launcher notices either the timeout or a rank waiting on one that has returned)
    assert "send [0, version] + x (stop) to each waiting worker" in verdict.message


def test_server_checker_refuses_bad_case_parameters_by_name():
    with pytest.raises(ValueError, match=r"num_workers=5 is out of range"):
        exercise.check_server(serve, points=8, num_workers=5)
    with pytest.raises(ValueError, match=r"staleness=-1 is out of range"):
        exercise.check_server(serve, points=8, staleness=-1)
