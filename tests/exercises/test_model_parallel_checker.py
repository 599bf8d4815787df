"""Lab 05's checkers (distlab.exercises.model_parallel): they pass the lab's own solutions,
check f and g forward *and* backward, and name the layer, gradient or stage that is wrong."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distlab import comm
from distlab.course.grading import lab_solutions
from distlab.exercises import model_parallel as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "05_model_parallel.ipynb"



SOLVED = lab_solutions(LAB)
F_CLS, G_CLS = SOLVED["CopyToParallel"], SOLVED["ReduceFromParallel"]
COLUMN, ROW, ONE_F_ONE_B, STEP = (SOLVED["column_parallel_linear"],
                                  SOLVED["row_parallel_linear"], SOLVED["one_f_one_b"],
                                  SOLVED["pipeline_step"])


# -- part A -------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size, numel", [(2, 6)])
def test_f_and_g_checker_accepts_the_labs_solution(world_size, numel):
    verdict = exercise.check_f_and_g(F_CLS, G_CLS, points=3, world_size=world_size, numel=numel)
    assert verdict.ok and verdict.points == 3, verdict


class IdentityBackward(torch.autograd.Function):      # f without its all-reduce
    @staticmethod
    def forward(ctx, x, group):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class AllReduceBothWays(torch.autograd.Function):     # g that also all-reduces backward
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        comm.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        comm.all_reduce(grad)
        return grad, None


def test_f_and_g_checker_names_fs_missing_backward_all_reduce():
    """f's forward (1/6) and all of g (1/2) are right: 2 of the 3 points."""
    verdict = exercise.check_f_and_g(IdentityBackward, G_CLS, points=3)
    assert not verdict and verdict.points == pytest.approx(2), verdict
    assert ("rank 0: f (CopyToParallel) backward gave [-0.5, -1, -1.5, -2, ...], which is "
            "this rank's own value; its backward is the all-reduce (sum) of the gradient"
            in verdict.message), verdict.message


def test_f_and_g_checker_names_gs_backward_that_sums():
    verdict = exercise.check_f_and_g(F_CLS, AllReduceBothWays, points=3)
    assert not verdict and verdict.points == pytest.approx(2), verdict
    assert "g (ReduceFromParallel) backward gave" in verdict.message
    assert "which is the sum over the ranks; its backward is the identity" in verdict.message


def test_f_and_g_checker_names_a_forward_that_is_swapped():
    """f and g exchanged: every direction wrong, 0 points."""
    verdict = exercise.check_f_and_g(G_CLS, F_CLS, points=3)
    assert not verdict and verdict.points == 0, verdict
    assert "f (CopyToParallel) forward gave" in verdict.message
    assert "which is the sum over the ranks; its forward is the identity" in verdict.message


class InPlace(torch.autograd.Function):               # g that all-reduces its input itself
    @staticmethod
    def forward(ctx, x, group):
        comm.all_reduce(x, group=group)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def test_f_and_g_checker_names_an_input_changed_in_place():
    verdict = exercise.check_f_and_g(F_CLS, InPlace, points=3)
    assert not verdict
    assert ("g (ReduceFromParallel) forward is right but changed its input x in place"
            in verdict.message)


def test_f_and_g_checker_refuses_the_librarys_f():
    from distlab.model_parallel.tensor_parallel import CopyToParallelRegion
    verdict = exercise.check_f_and_g(CopyToParallelRegion, G_CLS, points=3)
    assert not verdict and verdict.points == 0
    assert "CopyToParallelRegion.forward is off limits in this assignment" in verdict.message


def test_f_and_g_checker_says_a_stub_is_not_implemented_yet():
    class Stub(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            raise NotImplementedError()
    verdict = exercise.check_f_and_g(Stub, Stub, points=3)
    assert not verdict and "is not implemented yet" in verdict.message


# -- part B -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [dict()])
def test_model_parallel_checker_accepts_the_labs_solution(case):
    verdict = exercise.check_model_parallel(COLUMN, ROW, ONE_F_ONE_B, STEP, points=7, **case)
    assert verdict.ok and verdict.points == 7, verdict


def bias_before_the_sum(x_shard, weight_shard, bias, group=None):
    return G_CLS.apply(x_shard @ weight_shard.T + bias, group)


def test_model_parallel_checker_names_a_bias_added_before_the_sum():
    verdict = exercise.check_model_parallel(COLUMN, bias_before_the_sum, ONE_F_ONE_B, STEP,
                                            points=7)
    assert not verdict and verdict.points == 5.5, verdict
    assert "rank 0, row-parallel layer: the row-parallel output Y is wrong" in verdict.message
    assert "the bias added once, after the sum" in verdict.message


def column_without_f(x, weight_shard, bias_shard, group=None):
    return F.linear(x, weight_shard, bias_shard)


def test_model_parallel_checker_names_the_input_gradient_without_f():
    verdict = exercise.check_model_parallel(column_without_f, ROW, ONE_F_ONE_B, STEP, points=7)
    assert not verdict and verdict.points == 5.5, verdict
    assert ("rank 0, column-parallel layer: the gradient of the input X (f's backward) is wrong"
            in verdict.message)


def gpipe(num_stages, num_microbatches, stage):
    return ([("F", i) for i in range(num_microbatches)]
            + [("B", i) for i in range(num_microbatches)])


def test_model_parallel_checker_names_the_first_step_that_is_not_1f1b():
    verdict = exercise.check_model_parallel(COLUMN, ROW, gpipe, STEP, points=7)
    assert not verdict and verdict.points == 6, verdict
    assert ("p=4, m=6, stage 0: step 4 of its order is ('F', 4), expected ('B', 0). Under 1F1B "
            "stage s first runs min(p-s-1, m) = 3 warm-up forwards" in verdict.message)


def test_model_parallel_checker_refuses_the_librarys_schedule():
    from distlab.model_parallel import pipeline
    verdict = exercise.check_model_parallel(
        COLUMN, ROW, lambda p, m, s: pipeline.schedule("1f1b", p, m, s), STEP, points=7)
    assert not verdict and "pipeline.schedule is off limits" in verdict.message


def test_model_parallel_checker_refuses_bad_cases_before_any_process_starts():
    with pytest.raises(ValueError, match=r"hidden=6 is out of range; allowed a multiple of "
                                         r"world_size=4"):
        exercise.check_model_parallel(COLUMN, ROW, ONE_F_ONE_B, STEP, points=7, world_size=4,
                                      hidden=6)
    with pytest.raises(ValueError, match=r"num_stages=9 is out of range; allowed an int in 1..8"):
        exercise.check_model_parallel(COLUMN, ROW, ONE_F_ONE_B, STEP, points=7, num_stages=9)
    with pytest.raises(ValueError, match=r"world_size=0 is out of range"):
        exercise.check_f_and_g(F_CLS, G_CLS, points=3, world_size=0)


def test_model_parallel_checker_names_an_order_that_is_no_list_of_pairs():
    verdict = exercise.check_model_parallel(COLUMN, ROW, lambda p, m, s: "F0 B0", STEP,
                                            points=7)
    assert not verdict and verdict.points == 6, verdict
    assert ("p=4, m=6, stage 0: the order must be a list of (\"F\" or \"B\", microbatch) pairs, "
            "got 'F0 B0'" in verdict.message)


def step_without_the_received_gradient(layers, order, inputs, loss_fn, group=None):
    """Every stage backpropagates ones instead of the gradient the next stage sends."""
    import torch.distributed as dist
    stage, p = dist.get_rank(group), dist.get_world_size(group)
    kept, sends, total = {}, [], 0.0
    for op, i in order:
        if op == "F":
            x = inputs[i] if stage == 0 else torch.empty_like(inputs[i])
            if stage > 0:
                comm.recv(x, stage - 1)
            out = layers(x)
            if stage == p - 1:
                out = loss_fn(out, i)
                total += out.item()
            else:
                sends.append(comm.isend(out.detach(), stage + 1))
            kept[i] = out
        else:
            out = kept.pop(i)
            out.backward() if stage == p - 1 else out.backward(torch.ones_like(out))
    for request in sends:
        request.wait()
    return total if stage == p - 1 else None


def test_model_parallel_checker_names_the_stage_whose_gradient_is_wrong():
    verdict = exercise.check_model_parallel(COLUMN, ROW, ONE_F_ONE_B,
                                            step_without_the_received_gradient, points=7)
    assert not verdict and verdict.points == 4, verdict
    assert ("1F1B step, 4 stages, 3 microbatches: stage 0, layer 0's weight's gradient is"
            in verdict.message), verdict.message


def test_model_parallel_checker_says_which_stub_is_not_implemented():
    def stub(*args):
        raise NotImplementedError()
    verdict = exercise.check_model_parallel(COLUMN, ROW, ONE_F_ONE_B, stub, points=7)
    assert not verdict and verdict.points == 4, verdict
    assert "pipeline_step is not implemented yet" in verdict.message
