"""Lab 10's checkers (distlab.exercises.diloco): they pass the lab's own solutions, and name
the round, rank and parameter of the classic mistakes, with the points each share earns."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab.course.grading import lab_solutions
from distlab.exercises import diloco as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "10_low_communication_frontier.ipynb"

SOLVED = lab_solutions(LAB)
outer_gradient, diloco_round = SOLVED["outer_gradient"], SOLVED["diloco_round"]


# -- part A -------------------------------------------------------------------------------

def test_part_a_checker_accepts_the_labs_solution():
    verdict = exercise.check_outer_gradient(outer_gradient, points=2)
    assert verdict.ok and verdict.points == 2, verdict


def test_part_a_checker_says_the_sum_is_not_the_average():
    def summed(start, worker, group=None):
        return [d * dist.get_world_size(group) for d in outer_gradient(start, worker, group)]
    verdict = exercise.check_outer_gradient(summed, points=2)
    assert not verdict and verdict.points == 0, verdict
    assert "rank 0: inp.weight[0, 0] is" in verdict.message
    assert "That is the sum over the ranks" in verdict.message


def test_part_a_checker_gives_half_the_points_for_one_all_reduce_per_parameter():
    def per_parameter(start, worker, group=None):
        out = []
        for s, w in zip(start, worker):
            d = s.detach() - w.detach()
            dist.all_reduce(d, group=group)
            out.append(d / dist.get_world_size(group))
        return out
    verdict = exercise.check_outer_gradient(per_parameter, points=2)
    assert not verdict and verdict.points == 1, verdict
    assert "rank 0 made 4 all-reduce calls" in verdict.message


def test_part_a_checker_refuses_distlabs_gradient_averaging():
    def library(start, worker, group=None):
        from distlab.data_parallel.ddp import average_gradients
        for s, w in zip(start, worker):
            s.grad = s.detach() - w.detach()
        average_gradients(start, group)
        return [s.grad for s in start]
    verdict = exercise.check_outer_gradient(library, points=2)
    assert not verdict and verdict.points == 0
    assert "average_gradients is off limits in this assignment" in verdict.message


def test_part_a_checker_says_a_stub_is_not_implemented_yet():
    def outer_gradient(start, worker, group=None):
        raise NotImplementedError()
    verdict = exercise.check_outer_gradient(outer_gradient, points=2)
    assert not verdict and "not implemented yet" in verdict.message and verdict.max_points == 2


# -- part B -------------------------------------------------------------------------------

def test_part_b_checker_accepts_the_labs_solution():
    verdict = exercise.check_diloco_round(diloco_round, points=8)
    assert verdict.ok and verdict.points == 8, verdict


def _round(model, inner_opt, batches, loss_fn):
    for X, y in batches:
        inner_opt.zero_grad()
        loss_fn(model(X), y).backward()
        inner_opt.step()


def _reset(model, start):
    with torch.no_grad():
        for w, theta in zip(model.parameters(), start):
            w.copy_(theta)


def test_part_b_checker_names_the_round_rank_and_parameter_of_a_summed_delta():
    def summed(model, inner_opt, outer_opt, start, batches, loss_fn, group=None):
        _round(model, inner_opt, batches, loss_fn)
        for theta, d in zip(start, outer_gradient(start, model.parameters(), group)):
            theta.grad = d * dist.get_world_size(group)
        outer_opt.step()
        _reset(model, start)
    verdict = exercise.check_diloco_round(summed, points=8)
    assert not verdict and verdict.points == 2, verdict       # the reset share is right
    assert "round 0, rank 0: θ (start): inp.weight[0, 0] is" in verdict.message
    assert "That is the sum over the ranks of the pseudo-gradients" in verdict.message


def test_part_b_checker_says_the_delta_has_the_wrong_sign():
    def wrong_sign(model, inner_opt, outer_opt, start, batches, loss_fn, group=None):
        _round(model, inner_opt, batches, loss_fn)
        for theta, d in zip(start, outer_gradient(start, model.parameters(), group)):
            theta.grad = -d                                  # θ_worker − θ_start
        outer_opt.step()
        _reset(model, start)
    verdict = exercise.check_diloco_round(wrong_sign, points=8)
    assert not verdict and verdict.points == 2, verdict
    assert "round 0, rank 0: θ (start)" in verdict.message
    assert "the pseudo-gradient is θ_start − θ_worker" in verdict.message


def test_part_b_checker_says_the_workers_were_not_reset():
    def no_reset(model, inner_opt, outer_opt, start, batches, loss_fn, group=None):
        _round(model, inner_opt, batches, loss_fn)
        for theta, d in zip(start, outer_gradient(start, model.parameters(), group)):
            theta.grad = d
        outer_opt.step()
    verdict = exercise.check_diloco_round(no_reset, points=8)
    assert not verdict and verdict.points == 0, verdict       # θ goes wrong from round 1
    assert "round 0, rank 0: the model after the round: inp.weight" in verdict.message
    assert "The model still holds its inner-step parameters" in verdict.message
    assert "round 1, rank 0: θ (start)" in verdict.message


def test_part_b_checker_says_the_outer_step_came_before_the_average():
    def step_first(model, inner_opt, outer_opt, start, batches, loss_fn, group=None):
        _round(model, inner_opt, batches, loss_fn)
        outer_opt.step()                                     # last round's Δ, or none
        for theta, d in zip(start, outer_gradient(start, model.parameters(), group)):
            theta.grad = d
        _reset(model, start)
    verdict = exercise.check_diloco_round(step_first, points=8)
    assert not verdict and verdict.points == 2, verdict
    assert "round 0, rank 0: θ (start)" in verdict.message
    assert "BEFORE outer_opt.step()" in verdict.message


def test_part_b_checker_names_an_all_reduce_at_every_inner_step():
    def chatty(model, inner_opt, outer_opt, start, batches, loss_fn, group=None):
        for X, y in batches:
            dist.all_reduce(torch.zeros(1), group=group)     # a needless sync per inner step
        diloco_round(model, inner_opt, outer_opt, start, batches, loss_fn, group)
    verdict = exercise.check_diloco_round(chatty, points=8)
    assert not verdict and verdict.points == 7, verdict
    assert "round 0, rank 0: all-reduced 47 values" in verdict.message


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), r"world_size=0 is out of range"),
    (dict(inner_steps=True), r"inner_steps=True is out of range"),
    (dict(outer_momentum=1), r"outer_momentum=1 is out of range"),
    (dict(dtype=torch.int64), r"dtype=torch.int64 is out of range"),
])
def test_part_b_checker_refuses_bad_cases_before_any_process_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        exercise.check_diloco_round(diloco_round, points=8, **kwargs)
