"""distlab.exercises.collectives: the ring all-reduce checker on the shared skeleton."""
import pytest
import torch.distributed as dist

from distlab.exercises import collectives as exercise

pytestmark = pytest.mark.timeout(120)


def test_checker_refuses_what_is_not_a_function():
    verdict = exercise.check_ring_all_reduce("ring")
    assert not verdict.ok and verdict.message == "ring_all_reduce must be a function, got str"


@pytest.mark.parametrize("world_size", [0, 8, 2.0, True])
def test_checker_refuses_a_world_size_without_one_digit_per_rank(world_size):
    with pytest.raises(ValueError, match=rf"world_size={world_size!r} is out of range; "
                                         r"allowed an int in 1..7"):
        exercise.check_ring_all_reduce(exercise.ring_all_reduce, world_size=world_size)


def fails_on_rank_two(tensor, group=None):
    if dist.get_rank(group) == 2:
        raise RuntimeError("chunk index out of range")
    return tensor


def test_checker_names_the_rank_that_raised():
    verdict = exercise.check_ring_all_reduce(fails_on_rank_two)
    assert not verdict.ok and verdict.message.startswith("rank 2 failed"), verdict
    assert "chunk index out of range" in verdict.message


def test_checker_accepts_the_solution_on_three_ranks():
    verdict = exercise.check_ring_all_reduce(exercise.ring_all_reduce, world_size=3)
    assert verdict.ok and "every one of 3 ranks holds the sum" in verdict.message, verdict
