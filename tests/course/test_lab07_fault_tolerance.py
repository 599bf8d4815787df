"""Lab 07's glue: the demo runs, the parameter server's lost worker, Young's formula."""
import math

import pytest

import distlab
from distlab.asynchronous import parameter_server
from distlab.course import lab07_fault_tolerance as recovery
from distlab.fault_tolerance.faults import Fault

pytestmark = pytest.mark.timeout(120)


def test_the_parameter_server_finishes_with_a_worker_lost():
    config = recovery.parameter_server_config(Fault("kill", rank=2, step=4), num_workers=3,
                                              num_steps=40, worker_timeout=1.0)
    result = parameter_server.run(config, timeout=60)
    assert list(result.lost) == [1]                  # rank 2 is worker 1 (rank 0 serves)
    assert result.servers[0]["version"] == 40        # every update applied, by the others


@pytest.mark.parametrize("kwargs, message", [
    (dict(fault=Fault("kill", rank=0, step=4)), "fault.rank=0"),
    (dict(fault=Fault("kill", rank=1, step=4), num_workers=True), "num_workers=True")])
def test_parameter_server_config_refuses_a_fault_off_the_workers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recovery.parameter_server_config(**kwargs)


def test_plain_sync_demo_ends_with_an_error_naming_the_killed_rank():
    run = recovery.start_demo("sync", fault_kind="kill", fail_rank=1, fail_step=5,
                              world_size=2, num_steps=10, step_time=0.0)
    run.wait()
    assert isinstance(run.error, distlab.WorkerError) and run.error.rank == 1
    assert "SIGKILL" in run.error.reason


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=1), "world_size=1"), (dict(world_size="3"), "world_size='3'"),
    (dict(fail_rank=3, world_size=3), "fail_rank=3"), (dict(fail_rank=True), "fail_rank=True"),
    (dict(algorithm="async"), "algorithm='async'"), (dict(fail_step=-1), "step=-1"),
    (dict(num_steps=0), "num_steps=0"), (dict(checkpoint_every=-1), "checkpoint_every=-1")])
def test_start_demo_refuses_bad_settings_before_any_process_starts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recovery.start_demo(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(intervals=(0, 5)), "intervals="), (dict(intervals=()), "intervals="),
    (dict(num_steps=1), "num_steps=1"), (dict(world_size=1), "world_size=1"),
    (dict(step_time=-1), "step_time=-1")])
def test_lost_work_sweep_refuses_bad_settings_before_any_process_starts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recovery.lost_work_sweep(**kwargs)


def test_young_interval_minimizes_the_expected_waste():
    C, t, N = 0.05, 0.01, 200
    best = recovery.young_interval(C, N * t) / t
    assert best == pytest.approx(math.sqrt(2 * C * N * t) / t)
    waste = lambda tau: recovery.expected_waste(tau, N, C, t)
    assert waste(best) < min(waste(best * 0.9), waste(best * 1.1))


@pytest.mark.parametrize("args, message", [((-1, 1), "checkpoint_cost=-1"),
                                           ((1, 0), "mtbf=0"), ((True, 1), "checkpoint_cost=True")])
def test_young_interval_refuses_a_bad_argument_naming_it(args, message):
    with pytest.raises(ValueError, match=message):
        recovery.young_interval(*args)


@pytest.mark.parametrize("checkpoint_cost, mtbf", [(1.0, 50.0), (1.0, 400.0), (0.005, 2.0)])
def test_young_interval_lies_in_the_band_of_the_best_interval_under_random_failures(
        checkpoint_cost, mtbf):
    low, best, high = recovery.best_interval(
        recovery.failure_sweep(checkpoint_cost, mtbf, runs=5_000))
    assert low < recovery.young_interval(checkpoint_cost, mtbf) < high, (low, best, high)


def test_the_band_of_the_best_interval_rejects_the_formula_for_a_wrong_mtbf():
    # The check can fail: Young's interval for a quarter of the true MTBF lies outside.
    low, _, high = recovery.best_interval(recovery.failure_sweep(1.0, 400.0, runs=5_000))
    assert not low < recovery.young_interval(1.0, 100.0) < high
    assert not low < recovery.young_interval(1.0, 1600.0) < high


def test_failure_sweep_waste_grows_with_the_failure_rate_and_the_checkpoint_cost():
    base = recovery.failure_sweep(1.0, 400.0, work=8000.0, runs=2_000)
    more_failures = recovery.failure_sweep(1.0, 200.0, work=8000.0, runs=2_000)
    assert base.failures.mean() == pytest.approx(8000.0 / 400.0, rel=0.25)
    assert more_failures.wasted_time.min() > base.wasted_time.min()


@pytest.mark.parametrize("kwargs, message", [
    (dict(checkpoint_cost=0, mtbf=10), "checkpoint_cost=0"),
    (dict(checkpoint_cost=1, mtbf=3), "mtbf=3"),
    (dict(checkpoint_cost=1, mtbf=10, work=5), "work=5"),
    (dict(checkpoint_cost=1, mtbf=10, factor=1), "factor=1"),
    (dict(checkpoint_cost=1, mtbf=10, runs=0), "runs=0")])
def test_failure_sweep_refuses_a_bad_argument_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recovery.failure_sweep(**kwargs)


def test_failure_figure_draws_the_simulated_waste_the_band_and_young():
    sweep = recovery.failure_sweep(1.0, 400.0, runs=500)
    fig = recovery.failure_figure(sweep, 1.0, 400.0)
    assert list(fig.data[0].x) == sweep.interval.tolist()
    assert "Young" in str(fig.layout.annotations) and len(fig.layout.shapes) == 2
