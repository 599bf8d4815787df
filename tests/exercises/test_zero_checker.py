"""Lab 04's checkers (distlab.exercises.zero): they pass the lab's own solutions and name
what is wrong in the classic mistakes, with the points each half earns."""
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab import comm
from distlab.course.grading import lab_solutions
from distlab.exercises import zero as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "04_distributed_adam_and_zero.ipynb"



SOLVED = lab_solutions(LAB)
shard_of, Zero2 = SOLVED["shard_of"], SOLVED["Zero2"]


# -- part A -------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size, numel", [(4, 10)])
def test_shard_checker_accepts_the_labs_solution(world_size, numel):
    verdict = exercise.check_shard_of(shard_of, points=2, world_size=world_size, numel=numel)
    assert verdict.ok and verdict.points == 2, verdict


def floor_split(flat, rank, world_size):
    n = flat.numel() // world_size
    return flat[rank * n:(rank + 1) * n].clone()


def test_shard_checker_names_a_chunk_cut_without_padding():
    verdict = exercise.check_shard_of(floor_split, points=2)
    assert not verdict and verdict.points == 0
    assert "rank 0 returned shape (2,); every rank's chunk has c = 3 elements" in verdict.message


def padding_with_ones(flat, rank, world_size):
    c = math.ceil(flat.numel() / world_size)
    padded = flat.new_ones(world_size * c)
    padded[:flat.numel()] = flat
    return padded.view(world_size, c)[rank].clone()


def test_shard_checker_names_the_padding_element_that_is_not_zero():
    verdict = exercise.check_shard_of(padding_with_ones, points=2)
    assert not verdict
    assert ("rank 3, element 1 of its chunk (element 10 of the padded vector) is 1"
            in verdict.message)
    assert "padding: 0" in verdict.message


def test_shard_checker_says_a_stub_is_not_implemented_yet():
    def stub(flat, rank, world_size):
        raise NotImplementedError()
    verdict = exercise.check_shard_of(stub, points=2)
    assert not verdict and "not implemented yet" in verdict.message and verdict.max_points == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), r"world_size=0 is out of range"),
    (dict(numel=True), r"numel=True is out of range"),
    (dict(dtype=torch.int64), r"dtype=torch.int64 is out of range"),
])
def test_checkers_refuse_bad_cases_before_any_process_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        exercise.check_shard_of(shard_of, points=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        exercise.check_zero2(Zero2, points=8, **kwargs)


# -- part B -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [dict()])
def test_zero2_checker_accepts_the_labs_solution(case):
    verdict = exercise.check_zero2(Zero2, points=8, **case)
    assert verdict.ok and verdict.points == 8, verdict


class SummedNotAveraged(Zero2):
    def step(self, grad):
        super().step(grad * self.world_size)     # as if the ring's sum were not divided by N


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_zero2_checker_names_a_sum_that_is_not_averaged_and_gives_the_other_halves(optimizer):
    """Each half is graded on what it was given: the step of the chunk is replayed on the
    gradient its optimizer saw, the all-gather on what the owners hold, so the sum costs the
    reduce-scatter's 3 points only (Adam is nearly blind to it; SGD is not)."""
    verdict = exercise.check_zero2(SummedNotAveraged, points=8, world_size=2,
                                   optimizer=optimizer)
    assert not verdict and verdict.points == 5, verdict
    assert "step 1, rank 0: its optimizer saw gradient element 0" in verdict.message
    assert "That is the sum over the ranks: divide by N" in verdict.message


class NoAllGather(Zero2):
    def step(self, grad):
        N, me = self.world_size, self.rank
        chunks = [shard_of(grad, r, N) for r in range(N)]
        right, left = (me + 1) % N, (me - 1) % N
        for s in range(N - 1):
            send, into = (me - s - 1) % N, (me - s - 2) % N
            incoming = torch.empty_like(chunks[into])
            reqs = [comm.isend(chunks[send], right), comm.irecv(incoming, left)]
            for r in reqs:
                r.wait()
            chunks[into] += incoming
        with torch.no_grad():
            self.chunk.grad = chunks[me] / N
            self.optimizer.step()
            c = self.chunk.numel()
            lo, hi = min(me * c, grad.numel()), min((me + 1) * c, grad.numel())
            self.param[lo:hi] = self.chunk[:hi - lo]     # only its own chunk: no all-gather


def test_zero2_checker_names_the_missing_all_gather_and_gives_the_first_halves():
    verdict = exercise.check_zero2(NoAllGather, points=8)
    assert not verdict and verdict.points == 5, verdict
    assert ("after step 1, rank 0: parameter element 3 (rank 1's chunk, its element 0)"
            in verdict.message)
    assert "did every rank all-gather the stepped chunks?" in verdict.message


class OwnGradientOnly(Zero2):
    def step(self, grad):
        with torch.no_grad():
            self.chunk.grad = shard_of(grad, self.rank, self.world_size)   # never reduced
            self.optimizer.step()
            out = self.chunk.new_empty(self.world_size * self.chunk.numel())
            comm.all_gather_into_tensor(out, self.chunk.detach())
            self.param.copy_(out[:self.param.numel()])


def test_zero2_checker_names_a_gradient_that_was_never_reduced():
    verdict = exercise.check_zero2(OwnGradientOnly, points=8)
    assert not verdict and verdict.points == 5, verdict        # the step and gather are right
    assert "That is this rank's own gradient: no reduce-scatter happened" in verdict.message


class AllReduceInstead(Zero2):
    def step(self, grad):
        g = grad.clone()
        dist.all_reduce(g)
        super().step(g / self.world_size)


def test_zero2_checker_refuses_the_all_reduce():
    verdict = exercise.check_zero2(AllReduceInstead, points=8, world_size=2)
    assert not verdict and verdict.points == 0
    assert "torch.distributed.all_reduce is off limits in this assignment" in verdict.message


class WholeOptimizer(Zero2):
    def __init__(self, param, optimizer_class, group=None, **defaults):
        super().__init__(param, optimizer_class, group, **defaults)
        self.optimizer = optimizer_class([self.chunk, torch.zeros(param.numel(),
                                                                  requires_grad=True)],
                                         **defaults)


def test_zero2_checker_names_an_optimizer_over_more_than_the_chunk():
    verdict = exercise.check_zero2(WholeOptimizer, points=8, world_size=2)
    assert not verdict
    assert ("its optimizer holds 2 tensor(s), with .grad missing; build it over one"
            in verdict.message)


def test_zero2_checker_says_a_stub_is_not_implemented_yet():
    class Stub:
        def __init__(self, param, optimizer_class, group=None, **defaults):
            raise NotImplementedError()
    verdict = exercise.check_zero2(Stub, points=8, world_size=2)
    assert not verdict and "Zero2 is not implemented yet" in verdict.message
    assert verdict.points == 0 and verdict.max_points == 8
