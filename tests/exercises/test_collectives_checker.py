"""Lab 01's checkers (distlab.exercises.collectives): they pass the lab's own solutions, name
the rank and chunk of each classic mistake, give the partial points they promise, and refuse
the collectives that are off limits."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab import comm
from distlab.communication import collectives
from distlab.course.grading import lab_solutions
from distlab.exercises import collectives as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "01_collectives_and_communication_cost.ipynb"



SOLVED = lab_solutions(LAB)
reduce_scatter, all_reduce = SOLVED["my_ring_reduce_scatter"], SOLVED["my_ring_all_reduce"]


@pytest.mark.parametrize("world_size, numel, dtype", [(4, 14, torch.float32)])
def test_reduce_scatter_checker_accepts_the_labs_solution(world_size, numel, dtype):
    verdict = exercise.check_ring_reduce_scatter(reduce_scatter, points=2, world_size=world_size,
                                                 numel=numel, dtype=dtype)
    assert verdict.ok and verdict.points == 2, verdict


@pytest.mark.parametrize("world_size, numel, dtype", [(4, 14, torch.float32)])
def test_all_reduce_checker_accepts_the_labs_solution(world_size, numel, dtype):
    verdict = exercise.check_ring_all_reduce(all_reduce, points=8, world_size=world_size,
                                             numel=numel, dtype=dtype)
    assert verdict.ok and verdict.points == 8, verdict


def finishes_chunk_r_plus_one(tensor, group=None):
    """The schedule one step off: rank r ends with chunk r+1 complete."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    chunks = tensor.view(-1).tensor_split(p)
    for step in range(p - 1):
        send, recv = chunks[(rank - step) % p], chunks[(rank - step - 1) % p]
        incoming = torch.empty_like(recv)
        for req in [comm.isend(send, (rank + 1) % p), comm.irecv(incoming, (rank - 1) % p)]:
            req.wait()
        recv += incoming
    return chunks[rank]


def test_reduce_scatter_checker_says_the_schedule_is_one_chunk_off():
    verdict = exercise.check_ring_reduce_scatter(finishes_chunk_r_plus_one, points=2)
    assert not verdict.ok and verdict.points == 0
    assert "rank 0, chunk 0" in verdict.message and "Chunk 1 holds the sum" in verdict.message


def test_all_reduce_checker_gives_half_the_points_for_the_reduce_scatter_alone():
    def reduce_scatter_only(tensor, group=None):
        finishes_chunk_r_plus_one(tensor, group)
        return tensor

    verdict = exercise.check_ring_all_reduce(reduce_scatter_only, points=8)
    assert not verdict.ok and verdict.points == 4, verdict
    assert "rank 0, chunk 0" in verdict.message and "missing" in verdict.message
    assert "chunk(s) [1] on this rank are right" in verdict.message
    assert "the reduce-scatter works, the all-gather does not" in verdict.message


def naive_from_point_to_point(tensor, group=None):
    """Right sums, but everything through rank 0: not a ring."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    if rank == 0:
        for src in range(1, p):
            incoming = torch.empty_like(tensor)
            comm.recv(incoming, src)
            tensor += incoming
        for dst in range(1, p):
            comm.send(tensor, dst)
    else:
        comm.send(tensor, 0)
        comm.recv(tensor, 0)
    return tensor


def test_all_reduce_checker_gives_three_quarters_for_right_sums_without_a_ring():
    verdict = exercise.check_ring_all_reduce(naive_from_point_to_point, points=8)
    assert not verdict.ok and verdict.points == 6, verdict
    assert "the sums are right, but rank 0 sent 3 messages" in verdict.message


@pytest.mark.parametrize("forbidden", [
    lambda tensor, group=None: comm.all_reduce(tensor, group=group),
    lambda tensor, group=None: dist.all_reduce(tensor, group=group),
    lambda tensor, group=None: collectives.ring_all_reduce(tensor, group),
], ids=["comm.all_reduce", "dist.all_reduce", "collectives.ring_all_reduce"])
def test_all_reduce_checker_refuses_the_collectives_that_are_off_limits(forbidden):
    verdict = exercise.check_ring_all_reduce(forbidden, points=8)
    assert not verdict.ok and verdict.points == 0
    assert "is off limits in this assignment: build it from comm.isend" in verdict.message, verdict


def test_all_reduce_checker_says_the_tensor_must_be_written_in_place():
    def returns_a_copy(tensor, group=None):
        out = tensor.clone()
        all_reduce(out, group)
        return out

    verdict = exercise.check_ring_all_reduce(returns_a_copy, points=8)
    assert not verdict.ok and "left its tensor unchanged" in verdict.message


def test_checker_refuses_what_is_not_a_function():
    verdict = exercise.check_ring_all_reduce("ring", points=8)
    assert not verdict.ok and "ring_all_reduce must be a function, got str" in verdict.message


def test_checker_says_a_stub_is_not_implemented_yet():
    def stub(tensor, group=None):
        raise NotImplementedError()

    verdict = exercise.check_ring_reduce_scatter(stub, points=2)
    assert not verdict.ok and verdict.points == 0 and "not implemented yet" in verdict.message


def fails_on_rank_two(tensor, group=None):
    if dist.get_rank(group) == 2:
        raise RuntimeError("chunk index out of range")
    return tensor


def test_checker_names_the_rank_that_raised():
    verdict = exercise.check_ring_all_reduce(fails_on_rank_two, points=8)
    assert not verdict.ok and "rank 2 failed" in verdict.message, verdict
    assert "chunk index out of range" in verdict.message


@pytest.mark.parametrize("world_size", [0, 8, 2.0, True])
def test_checker_refuses_a_world_size_without_one_digit_per_rank(world_size):
    with pytest.raises(ValueError, match=rf"world_size={world_size!r} is out of range; "
                                         r"allowed an int in 1..7"):
        exercise.check_ring_all_reduce(all_reduce, points=8, world_size=world_size)


def test_checker_refuses_fewer_elements_than_ranks():
    with pytest.raises(ValueError, match=r"numel=3 is out of range; allowed an int in 4..10000"):
        exercise.check_ring_all_reduce(all_reduce, points=8, numel=3)


def test_diagnose_names_missing_and_doubled_ranks():
    good = sum(exercise.contribution(r) for r in range(4))
    assert exercise.diagnose(good, 0, 4) is None
    doubled = good.clone()
    doubled[6:9] += exercise.contribution(2)[6:9]
    msg = exercise.diagnose(doubled, 3, 4)
    assert msg.startswith("rank 3, chunk 2 (elements 6..8)") and "[2] added more than once" in msg
