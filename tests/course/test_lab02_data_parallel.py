"""Lab 02's glue: the panel on sync_sgd.start, the timeline runs, the scaling sweep (headless)."""
import ipywidgets as W
import pytest
import torch

from distlab.course import lab02_data_parallel as lab
from distlab.data_parallel import sync_sgd
from distlab.data_parallel.sync_sgd import SyncSGDConfig
from distlab.problems.workloads import Workload
from distlab.ui.figures import LiveFigure
from distlab.ui.panel import RunPanel, configure

pytestmark = pytest.mark.timeout(180)

TINY = SyncSGDConfig(workload=Workload(model="linear", batch_size=32, num_steps=4), world_size=1,
                     eval_every=2)


def test_the_panel_starts_sync_sgd_with_its_controls_set_on_the_config_and_its_workload():
    panel = RunPanel({"world_size": W.IntSlider(value=2, min=1, max=4),
                      "variant": W.Dropdown(options=["flat", "bucketed"], value="flat"),
                      "lr": W.FloatText(value=0.2), "batch_size": W.IntText(value=16)},
                     sync_sgd.start, [LiveFigure(x="step", y="loss")], config=TINY)
    panel.run()
    out = panel.wait().result()
    assert len(out) == 2 and len(out[0]["losses"]) == TINY.workload.num_steps
    config = configure(TINY, panel.values())
    assert (config.world_size, config.variant, config.workload.lr,
            config.workload.batch_size) == (2, "flat", 0.2, 16)
    torch.testing.assert_close(out[0]["params"], sync_sgd.reference(config)["params"])


def test_a_bad_control_value_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.world_size=0"):
        configure(TINY, {"world_size": 0})
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.world_size=3 .*batch_size=32"):
        configure(TINY, {"world_size": 3})


def test_the_bucketed_timeline_starts_all_reduces_during_backward_and_flat_does_not():
    base = SyncSGDConfig(workload=Workload(model="mlp", num_steps=4), world_size=2,
                         bucket_size_mb=0.01)
    flat = lab.timeline(base, steps=2, variant="flat")
    bucketed = lab.timeline(base, steps=2, variant="bucketed")
    assert {e["step"] for e in flat} == {1, 2} and {e["rank"] for e in flat} == {0, 1}
    assert lab.all_reduces_during_backward(flat) == 0
    assert lab.all_reduces_during_backward(bucketed) > 0


def test_the_scaling_sweep_has_one_row_per_run_and_the_one_node_efficiency_is_1():
    sweep = lab.scaling_sweep(TINY, nodes=(1, 2))
    assert sweep[["nodes", "lr_scaling"]].values.tolist() == [[1, False], [2, False], [2, True]]
    assert sweep.loc[0, "efficiency"] == 1.0 and (sweep["model_bytes_per_step"][1:] > 0).all()
    assert len(lab.efficiency_figure(sweep).data) == 1


def test_the_scaling_sweep_keeps_the_per_node_batch_and_grows_the_global_one():
    base = SyncSGDConfig(workload=Workload(model="linear", batch_size=48, num_steps=4),
                         world_size=2)   # 24 examples per node
    sweep = lab.scaling_sweep(base, nodes=(1, 4))
    step_time_s = sweep["step_time_ms"] / 1e3
    assert (sweep["examples_per_s"] * step_time_s).round().tolist() == [24, 96, 96]


def test_the_scaling_sweep_compares_runs_at_equal_epochs():
    base = SyncSGDConfig(workload=Workload(model="linear", batch_size=32, num_steps=8),
                         world_size=1, warmup_steps=4)
    figure = LiveFigure(x="epoch", y="val_loss")
    sweep = lab.scaling_sweep(base, nodes=(1, 2, 4), figure=figure)
    assert sweep["num_steps"].tolist() == [8, 4, 4, 2, 2]        # N nodes: 1/N of the steps
    assert sweep["epochs"].nunique() == 1                        # the same examples seen
    assert sweep["epochs"].iloc[0] == 8 * 32 / len(base.workload.loaded().dataset.y)
    assert len(list(figure.lines())) == 5
    with pytest.raises(ValueError, match=r"nodes=\(1, 3\) .*dividing workload\.num_steps=8"):
        lab.scaling_sweep(base, nodes=(1, 3))


@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_the_ring_traffic_is_counted_from_real_sends_2_n_minus_1_times_the_gradient(nodes):
    base = SyncSGDConfig(workload=Workload(model="mlp", batch_size=12, num_steps=2),
                         world_size=1)
    traffic = lab.ring_traffic(base, nodes=(nodes,))
    n = traffic["gradient_bytes"].iloc[0]
    assert traffic["rank"].tolist() == list(range(nodes))
    assert traffic["bytes_sent"].sum() == 2 * (nodes - 1) * n     # counted, not booked
    assert (traffic["bytes_sent"] - 2 * (nodes - 1) * n / nodes).abs().max() <= 8
    assert (traffic["model_bytes"] > 0).all()


def test_a_counted_run_gives_each_ranks_calls_per_operation():
    base = SyncSGDConfig(workload=Workload(model="mlp", batch_size=16, num_steps=3),
                         world_size=2, variant="naive")
    out = lab.run_counted(base)
    tensors = len(list(base.workload.build_model().parameters()))
    assert [rank_out["ops"]["all_reduce"]["calls"] for rank_out in out] == [3 * tensors] * 2
    torch.testing.assert_close(out[1]["params"], sync_sgd.reference(base)["params"])


@pytest.mark.parametrize("call,match", [
    (lambda: lab.timeline(TINY, steps=0), r"timeline: steps=0"),
    (lambda: lab.scaling_sweep(TINY, nodes=()), r"nodes=\(\)"),
    (lambda: lab.scaling_sweep(TINY, nodes=(1, 0)), r"nodes=\(1, 0\)"),
    (lambda: lab.ring_traffic(TINY, nodes=()), r"ring_traffic: nodes=\(\)")])
def test_bad_numbers_are_refused_by_their_own_names(call, match):
    with pytest.raises(ValueError, match=match):
        call()
