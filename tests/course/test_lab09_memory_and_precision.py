"""Lab 09's glue: the panel's config and bars, a measured run, and the 2 + 2 + K bytes."""
import pytest

from distlab.course import lab09_memory_and_precision as lab
from distlab.ui.panel import configure

pytestmark = pytest.mark.timeout(180)
TINY = lab.transformer(hidden=16, batch_size=8, block_size=8, num_steps=3)


@pytest.mark.parametrize("values, match", [
    (dict(stage=4), r"StepConfig.stage=4 is out of range; allowed 0, 1, 2 or 3"),
    (dict(precision="fp8"), r"StepConfig.precision='fp8' is out of range"),
    (dict(recompute="some"), r"StepConfig.recompute='some' is out of range"),
    (dict(accumulation_steps=3), r"StepConfig.accumulation_steps=3 is out of range; allowed "
                                 r"an int >= 1 such that world_size \* k divides"),
    (dict(world_size=True), r"StepConfig.world_size=True is out of range"),
    (dict(num_steps=1), r"StepConfig.workload=.* allowed a transformer Workload with "
                        r"num_steps >= 2"),
])
def test_panel_refuses_bad_control_values_naming_them(values, match):
    with pytest.raises(ValueError, match=match):
        configure(lab.StepConfig(workload=TINY), values)


def test_panel_controls_set_the_config_by_name():
    config = configure(lab.StepConfig(workload=TINY), dict(
        stage=2, precision="bf16", recompute="full", accumulation_steps=2, world_size=4))
    assert (config.stage, config.precision, config.recompute, config.accumulation_steps,
            config.world_size) == (2, "bf16", "full", 2, 4)


def test_bars_draw_each_runs_last_record_largest_rank_stacked_and_clear():
    bars = lab.Bars({"a": "part a", "b": "part b"}, "t", "KiB", scale=0.5)
    on_metrics = bars.callback("run 1")
    on_metrics([{"rank": 0, "step": 0, "loss": 1.0},               # no bar keys: ignored
                {"rank": 0, "a": 4.0, "b": 2.0}, {"rank": 1, "a": 6.0, "b": 1.0}])
    bars.callback("run 2")([{"rank": 0, "a": 2.0, "b": 2.0}])
    bars.draw()
    bars.draw()                                                     # in place, no duplicates
    assert bars.values() == {"run 1": {"a": 3.0, "b": 1.0}, "run 2": {"a": 1.0, "b": 1.0}}
    assert [(t.name, tuple(t.x), tuple(t.y)) for t in bars.figure.data] == [
        ("part a", ("run 1", "run 2"), (3.0, 1.0)), ("part b", ("run 1", "run 2"), (1.0, 1.0))]
    bars.clear()
    assert bars.values() == {} and len(bars.figure.data) == 0


def test_a_measured_run_reports_its_peak_by_part_and_fsdp_holds_half_the_parameters():
    """Stage 3 under bf16 autocast with 2 micro-batches and full recomputation, beside stage
    0 with selective recomputation: the last record carries the measured parts; a stage-3
    rank holds its half of the parameters."""
    peaks = {}
    for stage, recompute in ((0, "selective"), (3, "full")):
        config = lab.StepConfig(stage=stage, precision="bf16", recompute=recompute,
                                accumulation_steps=2, workload=TINY)
        run = lab.start(config, timeout=150)
        run.result()
        last = run.metrics().dropna(subset=["peak"])
        assert sorted(last["rank"]) == [0, 1]
        assert (last.step_time_median > 0).all() and (last.peak > 0).all()
        assert {f"peak_{p}" for p in lab.PARTS} <= set(last.columns)
        peaks[stage] = last.peak_params.max()
    assert peaks[3] * 2 <= peaks[0] * 1.01, peaks


def test_mixed_precision_bytes_are_two_plus_two_plus_k():
    df = lab.mixed_precision_bytes(world_size=2, workload=TINY)
    got = df.groupby(["precision", "stage", "category"])[["measured", "predicted"]].max()
    for (precision, stage, category), row in got.iterrows():
        slack = 4 * 64 if category == "optimizer_state" else 0      # Adam's step counters
        assert row.predicted <= row.measured <= row.predicted + slack, (precision, stage)
    assert got.measured["bf16 + fp32 masters", 2, "grads"] * 2 == got.measured["fp32", 2, "grads"]
