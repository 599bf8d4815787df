"""Lab 02's checkers (distlab.exercises.data_parallel): they pass the lab's own solutions and
name the rank, step and parameter of the classic mistakes, with the points each earns."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab import comm
from distlab.course.grading import lab_solutions
from distlab.exercises import data_parallel as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "02_data_parallel_sync_sgd.ipynb"

# The lab's own solutions (the package holds none).
SOLVED = lab_solutions(LAB)
average_gradients, DDP = SOLVED["average_gradients"], SOLVED["DDP"]


# -- part A -------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size, dtype", [(2, torch.float32)])
def test_average_checker_accepts_the_labs_solution(world_size, dtype):
    verdict = exercise.check_average_gradients(average_gradients, points=2,
                                               world_size=world_size, dtype=dtype)
    assert verdict.ok and verdict.points == 2, verdict


def summed_not_averaged(model, group=None):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    comm.all_reduce(flat, group=group)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(part.view_as(p))


def test_average_checker_says_divide_by_the_world_size_when_the_gradients_are_summed():
    verdict = exercise.check_average_gradients(summed_not_averaged, points=2)
    assert not verdict and verdict.points == 0
    assert verdict.message.startswith("rank 0: the gradient of 'inp.weight' is off by up to")
    assert "That is the sum over ranks: divide by the world size." in verdict.message


def one_call_per_parameter(model, group=None):
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            comm.all_reduce(p.grad, group=group)
            p.grad /= dist.get_world_size(group)


def test_average_checker_gives_half_the_points_for_one_all_reduce_per_parameter():
    verdict = exercise.check_average_gradients(one_call_per_parameter, points=2)
    assert not verdict and verdict.points == 1
    assert "rank 0 made 9 all-reduce calls: pack every gradient into one flat buffer" \
        in verdict.message


def skipped_branch_left_without_gradient(model, group=None):
    params = [p for p in model.parameters() if p.grad is not None]   # not the skipped branch
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    comm.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(part.view_as(p))


def test_average_checker_fails_a_rank_that_skips_the_unused_branch():
    verdict = exercise.check_average_gradients(skipped_branch_left_without_gradient, points=2,
                                               world_size=1)
    assert verdict.ok   # one rank uses everything: nothing is skipped
    verdict = exercise.check_average_gradients(skipped_branch_left_without_gradient, points=2,
                                               world_size=2)
    assert not verdict and verdict.points == 0   # rank 1 made fewer calls: it failed or hung


def calls_distlabs_average(model, group=None):
    from distlab.data_parallel import ddp
    ddp.average_gradients(model.parameters(), group)


def test_average_checker_puts_distlabs_averaging_off_limits():
    verdict = exercise.check_average_gradients(calls_distlabs_average, points=2)
    assert not verdict and verdict.points == 0
    assert verdict.message.startswith("distlab.data_parallel.ddp.average_gradients is off limits")


def not_written_yet(model, group=None):
    raise NotImplementedError()


def test_average_checker_says_not_implemented_yet_for_the_stub():
    verdict = exercise.check_average_gradients(not_written_yet, points=2)
    assert not verdict and verdict.points == 0 and "not implemented yet" in verdict.message


def test_average_checker_refuses_what_is_not_a_function():
    verdict = exercise.check_average_gradients(None, points=2)
    assert not verdict and verdict.message == "average_gradients must be a function, got NoneType"


def crashes_on_rank_one(model, group=None):
    if dist.get_rank(group) == 1:
        raise RuntimeError("oops")


def test_average_checker_names_the_rank_that_raised():
    verdict = exercise.check_average_gradients(crashes_on_rank_one, points=2)
    assert not verdict and verdict.points == 0
    assert verdict.message.startswith("rank 1 failed: raised RuntimeError: oops"), verdict


@pytest.mark.parametrize("world_size", [0, 9, 2.0, True])
def test_average_checker_refuses_a_bad_world_size_by_name(world_size):
    with pytest.raises(ValueError, match=rf"world_size={world_size!r} is out of range"):
        exercise.check_average_gradients(average_gradients, points=2, world_size=world_size)


# -- part B -------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size, bucket_bytes, dtype", [(2, 100, torch.float32)])
def test_ddp_checker_accepts_the_labs_solution(world_size, bucket_bytes, dtype):
    verdict = exercise.check_ddp(DDP, points=8, world_size=world_size, bucket_bytes=bucket_bytes,
                                 dtype=dtype)
    assert verdict.ok and verdict.points == 8, verdict


def test_the_bucket_rule_closes_a_bucket_once_it_holds_bucket_bytes():
    params = [torch.zeros(n) for n in (30, 6, 36, 6, 1)]   # reversed: 1, 6, 36, 6, 30 elements
    assert exercise.bucket_numels(params, 100) == [43, 36]   # 4+24+144 >= 100; then the rest
    assert exercise.bucket_numels(params, 0) == [1, 6, 36, 6, 30]
    assert exercise.bucket_numels(params, 10 ** 6) == [79]


class AllReduceInFinish(DDP):
    """Right gradients, but every bucket waits for finish(): nothing overlaps backward."""

    def __init__(self, model, bucket_bytes, group=None):
        super().__init__(model, bucket_bytes, group)
        self.late, self.finishing = [], False

    def on_grad_ready(self, p):
        if self.finishing:
            return super().on_grad_ready(p)
        self.late.append(p)

    def finish(self):
        self.finishing = True
        for p in self.late:
            super().on_grad_ready(p)
        super().finish()
        self.late, self.finishing = [], False


def test_ddp_checker_names_the_rank_and_step_where_nothing_started_during_backward():
    verdict = exercise.check_ddp(AllReduceInFinish, points=8)
    assert not verdict and verdict.points == pytest.approx(6.4)
    assert "rank 0, step 0: only 0 of 3 all-reduces started before backward() returned" \
        in verdict.message


class BlockingDDP(DDP):
    """Launches from the hooks, but each all-reduce blocks until the sum has arrived."""

    def on_grad_ready(self, p):
        real = comm.all_reduce
        comm.all_reduce = lambda tensor, group=None, async_op=False: _Done(real(tensor,
                                                                              group=group))
        try:
            super().on_grad_ready(p)
        finally:
            comm.all_reduce = real


class _Done:
    def __init__(self, _):
        pass

    def wait(self):
        pass


def test_ddp_checker_names_a_blocking_all_reduce():
    verdict = exercise.check_ddp(BlockingDDP, points=8)
    assert not verdict and verdict.points == pytest.approx(6.4)
    assert "rank 0, step 0: an all-reduce was blocking: start each with async_op=True" \
        in verdict.message


class ForwardOrderBuckets(DDP):
    """Buckets in forward order: every rank agrees, so the means are right, but the buckets
    are not the rule's (and the first layers' gradients, the last to be ready, go first)."""

    def __init__(self, model, bucket_bytes, group=None):
        class Reversed(torch.nn.Module):
            def __init__(self, params):
                super().__init__()
                self.ps = torch.nn.ParameterList(list(params)[::-1])
        super().__init__(Reversed(model.parameters()), bucket_bytes, group)


def test_ddp_checker_names_buckets_that_are_not_the_rules():
    verdict = exercise.check_ddp(ForwardOrderBuckets, points=8)
    assert not verdict and verdict.points == pytest.approx(6.4)
    assert "rank 0, step 0: all-reduces of [30, 42, 48, 13] elements, but the buckets of " \
           "bucket_bytes=100 are [49, 48, 36]" in verdict.message


class NoZeroFill(DDP):
    """Forgets the parameters this rank's backward skipped: their bucket never launches."""

    def finish(self):
        for bucket, (work, flat) in zip(self.buckets, self.works):
            work.wait()
            flat /= self.world_size
            for p, part in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad.copy_(part.view_as(p))
        self.missing = [len(bucket) for bucket in self.buckets]
        self.ready, self.works = set(), []


def test_ddp_checker_fails_when_a_skipped_parameter_is_never_launched():
    verdict = exercise.check_ddp(NoZeroFill, points=8)
    assert not verdict and verdict.points == 0
    assert "launch bucket i only after buckets 0..i-1" in verdict.message or \
        "rank 1" in verdict.message, verdict


def uses_distlabs_bucketed_ddp(model, bucket_bytes, group=None):
    from distlab.data_parallel import ddp
    return ddp.BucketedDDP(model, group, bucket_size_mb=bucket_bytes / 2 ** 20)


def test_ddp_checker_puts_distlabs_ddp_off_limits():
    verdict = exercise.check_ddp(uses_distlabs_bucketed_ddp, points=8)
    assert not verdict and verdict.points == 0
    assert "BucketedDDP.__init__ is off limits in this assignment" in verdict.message


def test_ddp_checker_refuses_bad_case_parameters_by_name():
    with pytest.raises(ValueError, match=r"bucket_bytes=-1 is out of range"):
        exercise.check_ddp(DDP, points=8, bucket_bytes=-1)
    with pytest.raises(ValueError, match=r"num_steps=0 is out of range"):
        exercise.check_ddp(DDP, points=8, num_steps=0)
