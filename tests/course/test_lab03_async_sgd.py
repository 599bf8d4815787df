"""Lab 03's glue: the panels' choices and legends, the simulated sweep, the figures (headless)."""
from dataclasses import replace

import ipywidgets as W
import pytest

from distlab.asynchronous import parameter_server as ps
from distlab.asynchronous import simulated_staleness as simulated
from distlab.course import lab03_async_sgd as lab
from distlab.problems.convex import WORKLOAD
from distlab.ui.figures import LiveFigure
from distlab.ui.panel import RunPanel, configure

pytestmark = pytest.mark.timeout(120)


def test_the_sweep_marks_only_large_lr_with_large_staleness_as_diverged():
    df = lab.sweep([0, 8], [0.05, 0.5], num_steps=60)
    assert len(df) == 4 and df["diverged"].tolist() == [False, False, False, True]
    assert len(lab.sweep_heatmap(df).data) == 1


def test_the_sweep_refuses_a_setting_that_is_not_a_field():
    with pytest.raises(ValueError, match="control 'steps' is not a setting"):
        lab.sweep([0], [0.1], steps=60)


def test_an_async_run_gives_per_worker_throughput_and_staleness():
    config = ps.ParameterServerConfig(replace(WORKLOAD, num_steps=30), num_workers=2,
                                      staleness=None, step_time=0.002)
    df = ps.run(config, timeout=60).metrics.assign(run="async")
    rates = lab.throughput(df)
    assert sorted(rates["worker"]) == [0, 1] and (rates["updates_per_s"] > 0).all()
    assert len(lab.throughput_figure(df).data) == 1
    assert len(lab.staleness_histogram(df).data) == 1


def test_the_bound_choice_keeps_async_selected():
    choice = lab.BoundChoice(value=1)
    choice.value = None
    assert choice.value is None and choice.label == "async (no bound)"
    choice.index = 0
    assert choice.value == 0
    assert lab.BoundChoice().label == "async (no bound)"


@pytest.mark.parametrize("num_workers", [1, 4])
def test_every_bound_and_straggler_choice_is_a_valid_config(num_workers):
    base = ps.ParameterServerConfig()
    for _, bound in lab.BOUNDS:
        for _, slowdown in lab.STRAGGLERS:
            config = configure(base, dict(num_workers=num_workers, staleness=bound,
                                          slowdown=slowdown, lr=0.2))
            assert (config.staleness, config.slowdown, config.workload.lr) == \
                (bound, slowdown, 0.2)


def test_the_panel_starts_the_parameter_server_with_its_controls_as_config_fields():
    figure = LiveFigure(x="step", y="loss")
    base = ps.ParameterServerConfig(replace(WORKLOAD, num_steps=10), num_workers=2,
                                    staleness=0)
    panel = RunPanel({"num_workers": W.IntSlider(value=2, min=1, max=4),
                      "staleness": lab.BoundChoice(value=0),
                      "lr": W.FloatSlider(value=0.05, min=0.01, max=1.0)},
                     ps.start, [figure], config=base, name=lab.run_name)
    run = panel.run(staleness=None, lr=0.1)
    result = ps.collect(panel.wait())
    assert result.servers[0]["version"] == 10
    applied = result.metrics.dropna(subset=["staleness"])
    assert applied["lr"].eq(0.1).all() and run.world_size == 3
    assert list(figure.lines()) == ["async · 2 workers · lr=0.1"]


def test_run_names_say_the_mode_and_its_knobs():
    assert lab.run_name(dict(staleness=2, num_workers=3, lr=0.1, slowdown=(3.0,))) == \
        "SSP s=2 · 3 workers · lr=0.1 · straggler ×3"
    assert lab.run_name(dict(staleness=None, num_workers=2, lr=0.5, staleness_aware=True,
                             slowdown=())) == "async · 2 workers · lr=0.5 · lr/τ"
    assert lab.run_name(dict(staleness=0, num_workers=4, lr=0.1, staleness_aware=True)) == \
        "sync · 4 workers · lr=0.1"
    assert lab.simulated_name(dict(staleness=8, lr=0.5, staleness_aware=True)) == \
        "simulated τ=8 · lr=0.5 · lr/τ"
    assert lab.simulated_name(dict(staleness=4, distribution="geometric", lr=0.1)) == \
        "simulated τ=4 (geometric) · lr=0.1"


def test_the_simulated_panel_runs_the_simulation_with_its_controls():
    base = simulated.SimulatedStalenessConfig(replace(WORKLOAD, num_steps=12))
    panel = RunPanel({"staleness": W.IntSlider(value=3), "lr": W.FloatSlider(value=0.1)},
                     simulated.start, [], config=base, name=lab.simulated_name)
    panel.run(staleness=2, lr=0.2)
    out = panel.wait().result()[0]
    want = simulated.reference(configure(base, dict(staleness=2, lr=0.2)))
    assert out["params"].equal(want)
