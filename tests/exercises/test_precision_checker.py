"""Lab 09's checkers (distlab.exercises.precision): they pass the lab's own solutions and
name the step, the rank and what is wrong in the classic mistakes of a loss scaler."""
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
import torch.distributed as dist

from distlab.data_parallel import ddp

from distlab.course.grading.cells import lab_solutions
from distlab.exercises import precision as exercise

pytestmark = pytest.mark.timeout(300)
cloudpickle.register_pickle_by_value(sys.modules[__name__])
LAB = Path(__file__).resolve().parents[2] / "labs" / "09_memory_and_precision.ipynb"
SOLVED = lab_solutions(LAB)
found_inf, MixedPrecisionOptimizer = SOLVED["found_inf"], SOLVED["MixedPrecisionOptimizer"]


# -- part A -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [dict(), dict(world_size=3, numel=7, dtype=torch.float16)])
def test_found_inf_checker_accepts_the_labs_solution(case):
    verdict = exercise.check_found_inf(found_inf, points=2, **case)
    assert verdict.ok and verdict.points == 2, verdict


def local_only(grads, group=None):
    return any(g is not None and not bool(torch.isfinite(g).all()) for g in grads)


def test_found_inf_checker_names_the_rank_that_did_not_hear_of_the_others_overflow():
    verdict = exercise.check_found_inf(local_only, points=2)
    assert not verdict and verdict.points == 0
    assert ("scenario 2 (rank 1's gradient 1 has inf at element 2): rank 0 returned False, "
            "expected True: its own gradients are finite") in verdict.message
    assert "all-reduce the flag with MAX" in verdict.message


def inf_only(grads, group=None):
    flag = torch.tensor([float(any(g is not None and bool(torch.isinf(g).any())
                                   for g in grads))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def test_found_inf_checker_names_a_missed_nan():
    verdict = exercise.check_found_inf(inf_only, points=2)
    assert not verdict
    assert "scenario 3 (rank 0's gradient 0 has NaN at element 0): rank 0 returned False" \
        in verdict.message


def cleaning(grads, group=None):
    result = found_inf(grads, group)
    for g in grads:
        if g is not None:
            g.nan_to_num_(0.0, 0.0, 0.0)
    return result


def test_found_inf_checker_refuses_changed_gradients_and_a_non_bool():
    verdict = exercise.check_found_inf(cleaning, points=2)
    assert not verdict and "changed gradient" in verdict.message
    verdict = exercise.check_found_inf(lambda grads, group=None: [found_inf(grads, group)],
                                       points=2)
    assert not verdict and "returned a list; return a bool" in verdict.message


def with_gradscaler_kernel(grads, group=None):
    found = torch.zeros(1)
    torch._amp_foreach_non_finite_check_and_unscale_(
        [g for g in grads if g is not None], found, torch.ones(1))
    return bool(found.item())


def test_found_inf_checker_forbids_gradscalers_kernel():
    verdict = exercise.check_found_inf(with_gradscaler_kernel, points=2)
    assert not verdict and verdict.points == 0
    assert "torch._amp_foreach_non_finite_check_and_unscale_ is off limits" in verdict.message


def test_checkers_say_a_stub_is_not_implemented_yet_and_refuse_bad_cases():
    def stub(grads, group=None):
        raise NotImplementedError()
    verdict = exercise.check_found_inf(stub, points=2)
    assert not verdict and "not implemented yet" in verdict.message
    with pytest.raises(ValueError, match=r"world_size=0 is out of range"):
        exercise.check_found_inf(found_inf, points=2, world_size=0)
    with pytest.raises(ValueError, match=r"dtype=torch.int64 is out of range"):
        exercise.check_found_inf(found_inf, points=2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"overflows=\(\(9, 0, 'inf'\),\) is out of range"):
        exercise.check_mixed_precision_step(MixedPrecisionOptimizer, points=8,
                                            overflows=((9, 0, "inf"),))
    with pytest.raises(ValueError, match=r"backoff_factor=1.5 is out of range"):
        exercise.check_mixed_precision_step(MixedPrecisionOptimizer, points=8,
                                            backoff_factor=1.5)


# -- part B -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(),
    dict(world_size=3, numel=7, num_steps=10, optimizer="sgd", init_scale=2.0 ** 10,
         growth_interval=3, overflows=((2, 2, "inf"), (7, 0, "inf")))])
def test_step_checker_accepts_the_labs_solution(case):
    verdict = exercise.check_mixed_precision_step(MixedPrecisionOptimizer, points=8, **case)
    assert verdict.ok and verdict.points == 8, verdict


def test_reference_is_gradscalers_sequence_natural_and_planted_overflows():
    """From 2**16 the first steps overflow by themselves; the planted inf and NaN skip
    steps 3 and 6 (from 0); two clean steps double S."""
    hyper = dict(init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2)
    want = exercise.reference(6, 8, 2, "adam", hyper, ((3, 1, "inf"), (6, 0, "nan")))
    assert [w["skipped"] for w in want] == [True, True, True, True, False, False, True, False]
    assert [w["scale"] for w in want] == [2.0 ** 15, 2.0 ** 14, 2.0 ** 13, 2.0 ** 12,
                                          2.0 ** 12, 2.0 ** 13, 2.0 ** 12, 2.0 ** 12]


class NoBackoff(MixedPrecisionOptimizer):
    def step(self):
        scale = self.loss_scale
        super().step()
        self.loss_scale = max(self.loss_scale, scale)     # never backs off


def test_step_checker_names_the_step_whose_overflow_did_not_back_off():
    verdict = exercise.check_mixed_precision_step(NoBackoff, points=8)
    assert not verdict
    assert ("after step 1, rank 0: loss_scale is 65536, expected 32768 (step 1 overflowed: "
            "S times backoff_factor") in verdict.message


class NotUnscaled(MixedPrecisionOptimizer):
    def step(self):
        scale, self.loss_scale = self.loss_scale, 1.0     # unscales by 1: no unscaling
        try:
            super().step()
        finally:
            self.loss_scale = self.loss_scale * scale


def test_step_checker_names_the_master_weight_of_a_step_not_unscaled():
    """Graded on what the run handed it, the mistake costs the parameters' 3 points only,
    though its weights then overflow every later step."""
    verdict = exercise.check_mixed_precision_step(NotUnscaled, points=8, optimizer="sgd")
    assert not verdict and verdict.points == 5, verdict
    assert "after step 5, rank 0: master weight 0 is" in verdict.message
    assert "unscaled by 1/S" in verdict.message


class NeverSkips(MixedPrecisionOptimizer):
    def step(self):
        """The solution's step, but the optimizer steps on an overflow too."""
        for p, m in zip(self.params, self.masters):
            m.grad = p.grad.float()
        ddp.average_gradients(self.masters, self.group)
        for m in self.masters:
            m.grad.mul_(1.0 / self.loss_scale)
        overflow = found_inf([m.grad for m in self.masters], self.group)
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
        self.clean_steps = 0 if overflow else self.clean_steps + 1
        if overflow:
            self.loss_scale *= self.backoff_factor
        elif self.clean_steps == self.growth_interval:
            self.loss_scale, self.clean_steps = self.loss_scale * self.growth_factor, 0


def test_step_checker_names_a_step_taken_on_an_overflow_and_keeps_the_scales_points():
    """Its weights turn NaN and every later step overflows, but its S follows the rule on
    what it was handed: the scales' 3 points stay."""
    verdict = exercise.check_mixed_precision_step(NeverSkips, points=8)
    assert not verdict and verdict.points == 3, verdict
    assert ("step 1, rank 0: the optimizer stepped, but a gradient was inf or NaN (on some "
            "rank) after the averaging: skip the step") in verdict.message


class NotRefreshed(MixedPrecisionOptimizer):
    def step(self):
        before = [p.detach().clone() for p in self.params]
        super().step()
        with torch.no_grad():
            for p, b in zip(self.params, before):
                p.copy_(b)                                    # the fp16 copy stays stale


def test_step_checker_names_a_stale_fp16_copy():
    verdict = exercise.check_mixed_precision_step(NotRefreshed, points=8)
    assert not verdict
    assert "after step 5, rank 0: fp16 weight 0 is" in verdict.message
    assert "copy the stepped masters into the fp16 parameters" in verdict.message


class NoMasters(MixedPrecisionOptimizer):
    """Steps the fp16 weights themselves: no master weights."""

    def __init__(self, params, optimizer_class, group=None, **kwargs):
        super().__init__(params, optimizer_class, group, **kwargs)
        self.optimizer = optimizer_class(self.params, lr=0.05)

    def step(self):
        ddp.average_gradients(self.params, self.group)
        for p in self.params:
            p.grad.mul_(1.0 / self.loss_scale)
        if found_inf([p.grad for p in self.params], self.group):
            self.loss_scale *= self.backoff_factor
            return
        self.optimizer.step()


def test_step_checker_names_an_optimizer_over_the_fp16_weights():
    verdict = exercise.check_mixed_precision_step(NoMasters, points=8)
    assert not verdict
    assert "the optimizer holds ['torch.float16']; build it over one fp32 master copy" \
        in verdict.message


class GrowthNotReset(MixedPrecisionOptimizer):
    def step(self):
        clean = self.clean_steps
        super().step()
        if self.clean_steps == 0 and clean and self.loss_scale < 2.0 ** 16:
            self.clean_steps = clean                      # an overflow does not reset it


def test_step_checker_names_a_growth_counter_an_overflow_did_not_reset():
    verdict = exercise.check_mixed_precision_step(GrowthNotReset, points=8, num_steps=10,
                                                  overflows=((5, 1, "inf"),))
    assert not verdict
    assert "loss_scale is" in verdict.message and "S changes only on" in verdict.message


def test_step_checker_forbids_distlabs_own_scaler():
    from distlab.precision.loss_scaling import DynamicLossScaler

    class Borrowed(MixedPrecisionOptimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = DynamicLossScaler()
    verdict = exercise.check_mixed_precision_step(Borrowed, points=8)
    assert not verdict and verdict.points == 0
    assert "DynamicLossScaler.__init__ is off limits" in verdict.message


class ConstantScale(MixedPrecisionOptimizer):
    def scale(self, loss):
        return loss.float() * 2.0 ** 16                  # ignores the current S


def test_step_checker_names_a_scale_that_ignores_the_loss_scale():
    verdict = exercise.check_mixed_precision_step(ConstantScale, points=8)
    assert not verdict
    assert ("step 2, rank 0: scale(loss) returned loss x 65536, but loss_scale was 32768"
            in verdict.message)
