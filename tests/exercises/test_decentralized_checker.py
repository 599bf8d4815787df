"""Lab 08's checkers (distlab.exercises.decentralized): they pass the lab's own solutions, and
name the rank, step, round and neighbour of the classic mistakes, with the points each earns."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab.course.grading import lab_solutions
from distlab.exercises import decentralized as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "08_heterogeneous_decentralized_hybrid.ipynb"

SOLVED = lab_solutions(LAB)
weighted_average, gossip = SOLVED["weighted_average"], SOLVED["gossip"]


# -- part A -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [dict()])
def test_part_a_checker_accepts_the_labs_solution(case):
    verdict = exercise.check_weighted_average(weighted_average, points=2, **case)
    assert verdict.ok and verdict.points == 2, verdict


def plain_mean(grad, my_batch, group=None):
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad / dist.get_world_size(group)


def test_part_a_checker_says_the_plain_mean_ignores_the_batch_sizes():
    verdict = exercise.check_weighted_average(plain_mean, points=2)
    assert not verdict and verdict.points == 0, verdict
    assert "rank 0, step 0: element 0 of the averaged gradient" in verdict.message
    assert "That is the plain mean of the ranks' gradients" in verdict.message


def test_part_a_checker_says_to_divide_by_the_global_batch():
    def weighted_sum(grad, my_batch, group=None):
        grad = grad * my_batch
        dist.all_reduce(grad, group=group)
        return grad
    verdict = exercise.check_weighted_average(weighted_sum, points=2)
    assert not verdict and "divide by the global batch B = sum_r b_r = 4" in verdict.message


def test_part_a_checker_refuses_distlabs_gradient_averaging():
    def library(grad, my_batch, group=None):
        from distlab.data_parallel import ddp
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad * my_batch
        ddp.average_gradients([p], group)
        return p.grad
    verdict = exercise.check_weighted_average(library, points=2)
    assert not verdict and verdict.points == 0
    assert "average_gradients is off limits in this assignment" in verdict.message


def test_part_a_checker_says_a_stub_is_not_implemented_yet():
    def stub(grad, my_batch, group=None):
        raise NotImplementedError()
    verdict = exercise.check_weighted_average(stub, points=2)
    assert not verdict and "not implemented yet" in verdict.message and verdict.max_points == 2


# -- part B -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [dict()])
def test_part_b_checker_accepts_the_labs_solution(case):
    verdict = exercise.check_gossip(gossip, points=8, **case)
    assert verdict.ok and verdict.points == 8, verdict


def summed(x, neighbours, weights, group=None):
    return gossip(x, neighbours, {j: 1.0 for j in weights}, group)


def test_part_b_checker_names_the_weight_of_a_plain_sum():
    verdict = exercise.check_gossip(summed, points=8)
    assert not verdict and verdict.points == 0, verdict
    assert "round 0: rank 0: element 0 is" in verdict.message
    assert "with weight 1, expected W[0, 3] = 0.3333" in verdict.message
    assert "That is the plain sum" in verdict.message


def test_part_b_checker_names_a_missing_own_term():
    def without_self(x, neighbours, weights, group=None):
        return gossip(x, neighbours, {**weights, dist.get_rank(group): 0.0}, group)
    verdict = exercise.check_gossip(without_self, points=8, world_size=3)
    assert not verdict and "it holds its own x with weight 0" in verdict.message
    assert "Add this rank's own term" in verdict.message


def scaled_before_sending(x, neighbours, weights, group=None):
    rank = dist.get_rank(group)
    x = x * weights[rank]                         # mixed in place of x: the neighbours get it
    received = {j: torch.empty_like(x) for j in neighbours}
    requests = [dist.irecv(received[j], j) for j in neighbours]
    requests += [dist.isend(x, j) for j in neighbours]
    for r in requests:
        r.wait()
    return x + sum(weights[j] * received[j] for j in neighbours)


def test_part_b_checker_names_the_neighbour_whose_message_is_wrong():
    verdict = exercise.check_gossip(scaled_before_sending, points=8)
    assert not verdict and verdict.points == 0
    assert "round 0: the message rank 1 sent to its neighbour rank 0 is not rank 1's x" \
        in verdict.message
    assert "It was scaled before it was sent" in verdict.message


def test_part_b_checker_names_the_rank_and_neighbour_of_a_missing_message():
    def forgot_one(x, neighbours, weights, group=None):
        if dist.get_rank(group) == 1:                  # never sends to rank 2
            neighbours = [j for j in neighbours if j != 2]
            received = {j: torch.empty_like(x) for j in (0, 2)}
            requests = [dist.irecv(received[j], j) for j in (0, 2)] + [dist.isend(x, 0)]
            for r in requests:
                r.wait()
            return weights[1] * x + weights[0] * received[0] + weights[2] * received[2]
        return gossip(x, neighbours, weights, group)
    verdict = exercise.check_gossip(forgot_one, points=8)
    assert not verdict and verdict.points == 0
    assert ("round 0: rank 2 waited 10 s for the message from rank 1, which never came: "
            "rank 1 sent nothing to its neighbour rank 2") in verdict.message


def test_part_b_checker_gives_the_mix_share_to_messages_sent_to_everyone():
    def to_everyone(x, neighbours, weights, group=None):
        rank, p = dist.get_rank(group), dist.get_world_size(group)
        others = [j for j in range(p) if j != rank]
        received = {j: torch.empty_like(x) for j in others}
        requests = [dist.irecv(received[j], j) for j in others]
        requests += [dist.isend(x, j) for j in others]
        for r in requests:
            r.wait()
        return weights[rank] * x + sum(weights[j] * received[j] for j in neighbours)
    verdict = exercise.check_gossip(to_everyone, points=8)
    assert not verdict and verdict.points == 6, verdict
    assert ("in round 0 rank 0 sent to rank 2, which is not its neighbour on the ring "
            "(its neighbours: [1, 3])") in verdict.message


@pytest.mark.parametrize("name", ["torch.distributed.all_gather",
                                  "distlab.decentralized.topology.gossip_average"])
def test_part_b_checker_refuses_collectives_and_distlabs_gossip(name):
    def library(x, neighbours, weights, group=None):
        from distlab.decentralized import topology
        if name.endswith("gossip_average"):
            return topology.gossip_average(x.clone(), topology.ring(4), dist.get_rank(), group)
        everyone = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, x)
        return sum(w * everyone[j] for j, w in weights.items())
    verdict = exercise.check_gossip(library, points=8)
    assert not verdict and verdict.points == 0
    assert f"{name} is off limits in this assignment" in verdict.message


def test_part_b_checker_names_the_rank_that_fails():
    def rank_two_fails(x, neighbours, weights, group=None):
        if dist.get_rank() == 2:
            raise RuntimeError("my bug")
        return gossip(x, neighbours, weights, group)
    verdict = exercise.check_gossip(rank_two_fails, points=8)
    assert not verdict and verdict.points == 0 and "my bug" in verdict.message


@pytest.mark.parametrize("check, kwargs, match", [
    (exercise.check_weighted_average, dict(batches=(2, 0)), r"batches=\(2, 0\) is out of range"),
    (exercise.check_weighted_average, dict(steps=0), r"steps=0 is out of range"),
    (exercise.check_gossip, dict(topology="star"), r"topology='star' is out of range"),
    (exercise.check_gossip, dict(rounds=True), r"rounds=True is out of range"),
    (exercise.check_gossip, dict(dtype=torch.int64), r"dtype=torch.int64 is out of range"),
])
def test_checkers_refuse_bad_cases_before_any_process_starts(check, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check(gossip, points=8, **kwargs)
