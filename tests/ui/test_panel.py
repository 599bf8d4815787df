"""distlab.ui: the run panel and the live figures, driven headless as a notebook would."""
from dataclasses import dataclass, field

import pytest
import ipywidgets as W

import distlab
from distlab.checks import is_number, require
from distlab.ui.figures import LiveFigure, timeline_figure
from distlab.ui.panel import RunPanel, configure, describe


@dataclass(frozen=True)
class Inner:
    lr: float = 0.1

    def __post_init__(self):
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")


@dataclass(frozen=True)
class Toy:
    world_size: int = 2
    num_steps: int = 3
    inner: Inner = field(default_factory=Inner)


def toy_worker(config: Toy):
    import torch.distributed as dist
    for step in range(config.num_steps):
        distlab.report(step=step, loss=config.inner.lr * (config.num_steps - step) + dist.get_rank())
    return dist.get_rank()


def toy_start(config: Toy, **launch):
    return distlab.start(toy_worker, config.world_size, config, **launch)


def test_configure_sets_top_level_and_nested_fields_and_validates():
    c = configure(Toy(), {"world_size": 3, "lr": 0.5})
    assert c.world_size == 3 and c.inner.lr == 0.5
    with pytest.raises(ValueError, match="Inner.lr=-1"):
        configure(Toy(), {"lr": -1})
    with pytest.raises(ValueError, match="not a setting of Toy"):
        configure(Toy(), {"momentum": 0.9})


def test_panel_runs_any_config_through_its_start_and_draws_every_run():
    loss = LiveFigure("step", "loss")
    panel = RunPanel({"world_size": W.IntSlider(value=2, min=1, max=4),
                      "lr": W.FloatSlider(value=0.1, min=0.01, max=1.0)},
                     toy_start, [loss], config=Toy())
    panel.run()
    assert panel.wait().result() == [0, 1]
    panel.run(world_size=3, lr=0.5)
    assert panel.wait().result() == [0, 1, 2]
    lines = loss.lines()
    assert set(lines) == {"world_size=2 lr=0.1", "world_size=3 lr=0.5"}
    steps, losses = lines["world_size=3 lr=0.5"]
    assert steps == [0, 1, 2]
    assert losses == pytest.approx([0.5 * 3 + 1, 0.5 * 2 + 1, 0.5 * 1 + 1])   # mean of 3 ranks
    assert set(panel.metrics()["run"]) == set(lines)
    panel.clear()
    assert loss.lines() == {} and panel.metrics().empty


def test_panel_refuses_a_second_run_while_one_is_going_and_stop_ends_it():
    def slow(config):
        import time
        time.sleep(60)

    panel = RunPanel({}, lambda c, **kw: distlab.start(slow, 2, c, **kw), [], config=Toy())
    run = panel.run()
    with pytest.raises(RuntimeError, match="press Stop first"):
        panel.run()
    panel.stop()
    assert run.wait(10) and "stopped" in str(run.error)


def test_a_bad_control_value_shows_in_the_status_line_and_starts_nothing():
    started = []
    panel = RunPanel({"lr": W.FloatText(value=-1.0)},
                     lambda c, **kw: started.append(c), [], config=Toy())
    panel._click_run()
    assert "Inner.lr=-1.0" in panel.status.value and not started


def test_describe_names_a_run_by_its_control_values():
    assert describe({"world_size": 4, "lr": 0.1, "algo": "ring"}) == "world_size=4 lr=0.1 algo=ring"


def test_live_figure_averages_ranks_per_step_or_keeps_them_apart():
    mean, apart = LiveFigure("step", "loss"), LiveFigure("step", "loss", per_rank=True)
    records = [{"rank": r, "step": s, "loss": float(r + s)} for r in (0, 1) for s in (0, 1)]
    for fig in (mean, apart):
        fig.callback("a")(records)
        fig.draw()
    assert mean.lines() == {"a": ([0, 1], [0.5, 1.5])}
    assert apart.lines() == {"a · rank 0": ([0, 1], [0.0, 1.0]), "a · rank 1": ([0, 1], [1.0, 2.0])}
    assert [t.name for t in mean.figure.data] == ["a"]
    assert list(mean.figure.data[0].y) == [0.5, 1.5]


def test_live_figure_ignores_records_without_its_metric_or_with_nan():
    fig = LiveFigure("step", "loss")
    fig.callback("a")([{"rank": 0, "step": 0, "loss": float("nan")},
                       {"rank": 0, "step": 1, "bytes_sent": 8},
                       {"rank": 0, "step": 2, "loss": 1.0}])
    assert fig.lines() == {"a": ([2], [1.0])}


def test_timeline_puts_communication_and_compute_on_separate_rows_per_rank():
    fig = timeline_figure([{"rank": 0, "kind": "forward", "start": 0.0, "end": 0.01},
                           {"rank": 0, "kind": "all_reduce", "start": 0.005, "end": 0.02},
                           {"rank": 1, "kind": "backward", "start": 0.0, "end": 0.015}])
    rows = {y for trace in fig.data for y in trace.y}
    assert rows == {"rank 0 · compute", "rank 0 · comm", "rank 1 · compute"}
    bar = next(t for t in fig.data if t.name == "all_reduce")
    assert list(bar.base) == pytest.approx([5.0]) and list(bar.x) == pytest.approx([15.0])
