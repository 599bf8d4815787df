"""Lab 00's checkers (distlab.exercises.first_steps): they pass the lab's own solutions and
name the rank, step and parameter of each classic mistake, with the points each part earns."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab import comm
from distlab.course.grading import lab_solutions
from distlab.exercises import first_steps as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "00_start_here.ipynb"



SOLVED = lab_solutions(LAB)
global_mean, data_parallel_step = SOLVED["global_mean"], SOLVED["data_parallel_step"]


@pytest.mark.parametrize("world_size, numel, dtype", [(3, 3, torch.float32)])
def test_mean_checker_accepts_the_labs_solution(world_size, numel, dtype):
    verdict = exercise.check_global_mean(global_mean, points=2, world_size=world_size,
                                         numel=numel, dtype=dtype)
    assert verdict.ok and verdict.points == 2, verdict


def sum_only(x, group=None):
    total = x.clone()
    comm.all_reduce(total, group=group)
    return total


def mean_in_place(x, group=None):
    comm.all_reduce(x, group=group)
    return x / dist.get_world_size(group)


@pytest.mark.parametrize("mistake, explanation", [
    (sum_only, "rank 0 returned [26, -28, 38]"), (sum_only, "divide by the number of ranks"),
    (lambda x, group=None: x, "no communication happened"),
    (mean_in_place, "rank 0 got the mean, but its x changed"),
    (lambda x, group=None: 3, "rank 0 returned a int, not a torch.Tensor"),
    (lambda x, group=None: 1 / 0, "ZeroDivisionError")])
def test_mean_checker_explains_each_mistake_with_no_points(mistake, explanation):
    verdict = exercise.check_global_mean(mistake, points=2)
    assert not verdict.ok and verdict.points == 0 and explanation in verdict.message, verdict


def test_mean_checker_names_a_wrong_dtype():
    verdict = exercise.check_global_mean(lambda x, group=None: x.float(), points=2,
                                         dtype=torch.float64)
    assert not verdict.ok and "float32; expected (3,), float64" in verdict.message, verdict


@pytest.mark.parametrize("kwargs", [{}])
def test_step_checker_accepts_the_labs_solution(kwargs):
    verdict = exercise.check_data_parallel_step(data_parallel_step, points=8, **kwargs)
    assert verdict.ok and verdict.points == 8, verdict


def mean_of_means(model, X, y, num_examples, lr, group=None):
    params = list(model.parameters())
    grads = torch.autograd.grad(((model(X) - y) ** 2).mean(), params)
    for p, g in zip(params, grads):
        comm.all_reduce(g)
        with torch.no_grad():
            p -= lr * g / dist.get_world_size()
    return 0.0


def no_division(model, X, y, num_examples, lr, group=None):
    params = list(model.parameters())
    grads = torch.autograd.grad(((model(X) - y) ** 2).sum(), params)
    for p, g in zip(params, grads):
        comm.all_reduce(g)
        with torch.no_grad():
            p -= lr * g
    return 0.0


def local_only(model, X, y, num_examples, lr, group=None):
    params = list(model.parameters())
    loss = ((model(X) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
    return loss.item()


@pytest.mark.parametrize("mistake, explanation", [
    (mean_of_means, "the average of the ranks' mean gradients"),
    (no_division, "not divided by num_examples"),
    (local_only, "the step of this rank's own shard only"),
    (local_only, "the loss of this rank's shard only")])
def test_step_checker_names_rank_step_and_parameter_of_each_mistake(mistake, explanation):
    verdict = exercise.check_data_parallel_step(mistake, points=8)
    assert not verdict.ok and verdict.points == 0, verdict
    assert "rank 0, step 0: parameter 'weight'" in verdict.message
    assert explanation in verdict.message, verdict


def test_step_checker_gives_the_parameters_their_points_when_only_the_loss_is_wrong():
    def forgets_the_loss(model, X, y, num_examples, lr, group=None):
        data_parallel_step(model, X, y, num_examples, lr, group)
        return 0.0

    verdict = exercise.check_data_parallel_step(forgets_the_loss, points=8)
    assert not verdict.ok and verdict.points == 6, verdict
    assert "rank 0, step 0: returned the loss 0" in verdict.message


def test_step_checker_refuses_the_library_averaging():
    def library(model, X, y, num_examples, lr, group=None):
        from distlab.data_parallel.ddp import average_gradients
        average_gradients(list(model.parameters()))

    verdict = exercise.check_data_parallel_step(library, points=8)
    assert not verdict.ok and verdict.points == 0
    assert "average_gradients is off limits" in verdict.message


def test_step_checker_says_a_stub_is_not_implemented_yet():
    def stub(model, X, y, num_examples, lr, group=None):
        raise NotImplementedError()

    verdict = exercise.check_data_parallel_step(stub, points=8)
    assert not verdict.ok and "data_parallel_step is not implemented yet" in verdict.message


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), "world_size=0"), (dict(num_examples=2), "num_examples=2"),
    (dict(lr=0), "lr=0"), (dict(num_steps=True), "num_steps=True")])
def test_step_checker_refuses_a_bad_case_before_any_process_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        exercise.check_data_parallel_step(data_parallel_step, points=8, **kwargs)
