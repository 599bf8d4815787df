"""Lab 03's glue: the panel's start function, the simulated sweep, the figures (headless)."""
import pytest

from distlab.asynchronous import parameter_server as ps
from distlab.course import lab03_async_sgd as lab

pytestmark = pytest.mark.timeout(120)


def test_the_sweep_marks_only_large_lr_with_large_staleness_as_diverged():
    df = lab.sweep([0, 8], [0.05, 0.5], num_steps=60)
    assert len(df) == 4 and df["diverged"].tolist() == [False, False, False, True]
    assert len(lab.sweep_heatmap(df).data) == 1


def test_an_async_mode_run_gives_per_worker_throughput_and_staleness():
    handle = lab.start_mode("async", workers=2, num_steps=30, step_time=0.002, timeout=60)
    result = ps.collect(handle)
    df = result.metrics.assign(run="async")
    rates = lab.throughput(df)
    assert sorted(rates["worker"]) == [0, 1] and (rates["updates_per_s"] > 0).all()
    assert len(lab.throughput_figure(df).data) == 1
    assert len(lab.staleness_histogram(df).data) == 1


def test_run_names_say_the_mode_and_its_knobs():
    assert lab.run_name(dict(mode="SSP", staleness=2, workers=3, lr=0.1, straggler=3.0)) == \
        "SSP s=2 · 3 workers · lr=0.1 · straggler ×3"
    assert lab.run_name(dict(mode="simulated", staleness=8, workers=3, lr=0.5,
                             staleness_aware=True)) == "simulated τ=8 · lr=0.5 · lr/τ"


@pytest.mark.parametrize("kwargs,match", [
    (dict(workers=0), r"start_mode: workers=0"), (dict(straggler=0.5), r"straggler=0.5"),
    (dict(lr=True), r"lr=True"), (dict(num_steps=0), r"num_steps=0"),
    (dict(staleness=-1), r"staleness=-1"), (dict(step_time=-0.1), r"step_time=-0.1")])
def test_start_mode_refuses_bad_numbers_by_their_own_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lab.start_mode("SSP", **kwargs)


def test_start_mode_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode='gossip'"):
        lab.start_mode("gossip")
