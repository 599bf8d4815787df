"""Lab 06's checkers (distlab.exercises.compression): they pass the lab's own solutions, and
name the rank, step and element of the classic mistakes, with the points each share earns."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab import comm
from distlab.course.grading import lab_solutions
from distlab.exercises import compression as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "06_communication_efficient_training.ipynb"



SOLVED = lab_solutions(LAB)
topk_with_feedback, topk_all_reduce = SOLVED["topk_with_feedback"], SOLVED["topk_all_reduce"]


# -- part A -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [dict()])
def test_part_a_checker_accepts_the_labs_solution(case):
    verdict = exercise.check_topk_with_feedback(topk_with_feedback, points=3, **case)
    assert verdict.ok and verdict.points == 3, verdict


def largest_values(x, residual, k):
    c = x + residual
    indices = c.topk(k).indices                     # by value: large negatives are dropped
    residual.copy_(c)
    residual[indices] = 0
    return c[indices], indices


def test_part_a_checker_names_the_index_chosen_by_value_not_magnitude():
    verdict = exercise.check_topk_with_feedback(largest_values, points=3)
    assert not verdict and verdict.points == 1, verdict       # the residual share is right
    assert "rank 0, step 0: index" in verdict.message
    assert "keep the k largest magnitudes" in verdict.message


def residual_rebound(x, residual, k):
    c = x + residual
    indices = c.abs().topk(k).indices
    residual = c.clone()                            # a new tensor: the caller's is untouched
    residual[indices] = 0
    return c[indices], indices


def test_part_a_checker_says_the_residual_was_not_updated_in_place():
    verdict = exercise.check_topk_with_feedback(residual_rebound, points=3)
    assert not verdict and verdict.points == 2, verdict       # the selection share is right
    assert "rank 0, step 0, element" in verdict.message
    assert "It did not change: update it in place" in verdict.message


def residual_is_what_was_sent(x, residual, k):
    c = x + residual
    indices = c.abs().topk(k).indices
    residual.zero_()
    residual[indices] = c[indices]
    return c[indices], indices


def test_part_a_checker_names_the_element_of_a_residual_holding_what_was_sent():
    verdict = exercise.check_topk_with_feedback(residual_is_what_was_sent, points=3)
    assert not verdict and verdict.points == 2, verdict
    assert "It holds what was sent; it must hold what was NOT sent" in verdict.message


def values_of_x(x, residual, k):
    c = x + residual
    indices = c.abs().topk(k).indices
    residual.copy_(c)
    residual[indices] = 0
    return x[indices], indices


def test_part_a_checker_names_a_value_taken_from_x_instead_of_x_plus_residual():
    verdict = exercise.check_topk_with_feedback(values_of_x, points=3)
    assert not verdict and verdict.points == 1, verdict
    assert "step 1: the value sent for index" in verdict.message    # step 0: residual is 0
    assert "That is x alone" in verdict.message


def test_part_a_checker_says_what_came_back_instead_of_a_pair():
    verdict = exercise.check_topk_with_feedback(lambda x, residual, k: x, points=3)
    assert not verdict and verdict.points == 0
    assert "rank 0, step 0: returned a Tensor; return a pair of tensors" in verdict.message


def test_part_a_checker_refuses_distlabs_own_compressor():
    def library(x, residual, k):
        from distlab.communication_efficient import compression
        payload, _ = compression.compress_with_feedback(x, compression.TopK(k / x.numel()),
                                                        residual)
        return payload, payload
    verdict = exercise.check_topk_with_feedback(library, points=3)
    assert not verdict and verdict.points == 0
    assert "compress_with_feedback is off limits in this assignment" in verdict.message


def test_part_a_checker_says_a_stub_is_not_implemented_yet():
    def stub(x, residual, k):
        raise NotImplementedError()
    verdict = exercise.check_topk_with_feedback(stub, points=3)
    assert not verdict and "not implemented yet" in verdict.message and verdict.max_points == 3


# -- part B -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [dict()])
def test_part_b_checker_accepts_the_labs_solution(case):
    verdict = exercise.check_topk_all_reduce(topk_all_reduce, points=7, **case)
    assert verdict.ok and verdict.points == 7, verdict


def no_feedback(x, residual, k, group=None):          # fills the residual, never uses it
    fresh = torch.zeros_like(residual)
    out = topk_all_reduce(x, fresh, k, group)
    residual.copy_(fresh)
    return out


def test_part_b_checker_names_the_step_where_the_residual_was_not_added():
    verdict = exercise.check_topk_all_reduce(no_feedback, points=7)
    assert not verdict and verdict.points == 0, verdict
    assert "rank 0, step 1, element" in verdict.message
    assert "add the residual first" in verdict.message
    assert "It forgot the old residual" in verdict.message


def dense(x, residual, k, group=None):
    c = x + residual
    idx = c.abs().topk(k).indices
    out = torch.zeros_like(c)
    out[idx] = c[idx]
    residual.copy_(c - out)
    comm.all_reduce(out, group=group)
    return out / dist.get_world_size(group)


def test_part_b_checker_gives_all_but_the_bytes_share_to_a_dense_all_reduce():
    verdict = exercise.check_topk_all_reduce(dense, points=7)
    assert not verdict and verdict.points == 6, verdict
    assert "rank 0, step 0: the mean is right, but this rank sent" in verdict.message
    assert "comm.all_gather" in verdict.message


def test_part_b_checker_names_traffic_that_goes_around_the_ledger():
    def around_the_ledger(x, residual, k, group=None):
        values, indices = topk_with_feedback(x, residual, k)
        out = torch.zeros_like(x)
        out[indices] = values
        dist.all_reduce(out, group=group)               # torch.distributed, not distlab.comm
        return out / dist.get_world_size(group)
    verdict = exercise.check_topk_all_reduce(around_the_ledger, points=7)
    assert not verdict and verdict.points == 6, verdict
    assert "sent no bytes through distlab.comm" in verdict.message


def test_part_b_checker_says_the_sum_is_not_the_mean():
    def summed(x, residual, k, group=None):
        return topk_all_reduce(x, residual, k, group) * dist.get_world_size(group)
    verdict = exercise.check_topk_all_reduce(summed, points=7)
    assert not verdict and verdict.points == 2, verdict       # the feedback share is right
    assert "rank 0, step 0, element" in verdict.message
    assert "That is the sum over the ranks: divide by the number of ranks" in verdict.message


def test_part_b_checker_names_a_rank_that_kept_its_own_top_k():
    def alone(x, residual, k, group=None):
        values, indices = topk_with_feedback(x, residual, k)
        return torch.zeros_like(x).index_add_(0, indices, values)
    verdict = exercise.check_topk_all_reduce(alone, points=7)
    assert not verdict and "That is this rank's own top-k" in verdict.message


def test_part_b_checker_names_the_rank_whose_residual_was_not_updated():
    def forgot_update(x, residual, k, group=None):
        return topk_all_reduce(x, residual.clone(), k, group)
    verdict = exercise.check_topk_all_reduce(forgot_update, points=7)
    assert not verdict and verdict.points == 5, verdict       # the mean is judged on its state
    assert "rank 0, step 0, element" in verdict.message and "did not change" in verdict.message


def test_part_b_checker_names_the_rank_that_fails():
    def rank_two_fails(x, residual, k, group=None):
        if dist.get_rank() == 2:
            raise RuntimeError("my bug")
        return topk_all_reduce(x, residual, k, group)
    verdict = exercise.check_topk_all_reduce(rank_two_fails, points=7)
    assert not verdict and verdict.points == 0 and "my bug" in verdict.message


def test_part_b_checker_refuses_distlabs_compressed_all_reduce():
    def library(x, residual, k, group=None):
        from distlab.communication_efficient import compression
        return compression.all_reduce_compressed(x, compression.TopK(k / x.numel()), residual,
                                                 group)
    verdict = exercise.check_topk_all_reduce(library, points=7)
    assert not verdict and verdict.points == 0
    assert "all_reduce_compressed is off limits in this assignment" in verdict.message


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), r"world_size=0 is out of range"),
    (dict(numel=True), r"numel=True is out of range"),
    (dict(k=61), r"k=61 is out of range"),
    (dict(steps=0), r"steps=0 is out of range"),
    (dict(dtype=torch.int64), r"dtype=torch.int64 is out of range"),
])
def test_checkers_refuse_bad_cases_before_any_process_starts(kwargs, match):
    for check in (exercise.check_topk_with_feedback, exercise.check_topk_all_reduce):
        with pytest.raises(ValueError, match=match):
            check(topk_all_reduce, points=7, **{"numel": 60, **kwargs})
