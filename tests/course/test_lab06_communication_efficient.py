"""Lab 06's glue, headless: the panel drives local_sgd.start with no adapter, sweeps refuse
mixed world sizes, the bytes-to-target table, the bytes of one compressed all-reduce against
N (measured on real sends and by formula), and the static figures (one trace per run)."""
import math
from dataclasses import replace

import ipywidgets as W
import pandas as pd
import pytest
import torch

from distlab.communication_efficient import local_sgd
from distlab.communication_efficient.compression import Sign, TopK, make_compressor
from distlab.communication_efficient.fedavg import FedAvgConfig
from distlab.communication_efficient.local_sgd import LocalSGDConfig
from distlab.course import lab06_communication_efficient as lab
from distlab.ui.panel import RunPanel, configure

RECORDS = pd.DataFrame([
    {"run": "a", "rank": 0, "step": 0, "loss": 2.0, "accuracy": 0.1, "bytes_sent": 0},
    {"run": "a", "rank": 0, "step": 1, "loss": 0.9, "accuracy": 0.5, "bytes_sent": 100},
    {"run": "a", "rank": 0, "step": 2, "loss": 0.4, "accuracy": 0.8, "bytes_sent": 200},
    {"run": "a", "rank": 1, "step": 2, "loss": None, "accuracy": None, "bytes_sent": 200},
    {"run": "b", "rank": 0, "step": 0, "loss": 2.0, "accuracy": 0.1, "bytes_sent": 0},
    {"run": "b", "rank": 0, "step": 1, "loss": 1.5, "accuracy": 0.3, "bytes_sent": 10},
])


BASE = LocalSGDConfig(workload=replace(local_sgd.WORKLOAD, num_steps=4), world_size=2)


@pytest.mark.timeout(120)
def test_the_panel_starts_local_sgd_with_its_controls_set_on_the_config():
    panel = RunPanel({"period": W.IntSlider(value=1), "world_size": W.IntSlider(value=2),
                      "lr": W.FloatText(value=0.3)}, local_sgd.start, [], config=BASE)
    run = panel.run(world_size=4)
    panel.wait()
    config = configure(BASE, panel.values())
    assert config.world_size == 4 and config.workload.lr == 0.3
    want, _ = local_sgd.reference(config)
    got = run.metrics().dropna(subset=["loss"]).sort_values("step")
    assert run.world_size == 4
    torch.testing.assert_close(torch.tensor(got["loss"].tolist()), torch.tensor(want))


@pytest.mark.parametrize("values, message", [
    ({"period": 0}, "LocalSGDConfig.period=0"),
    ({"world_size": 3}, "LocalSGDConfig.workload.batch_size=32 .* multiple of world_size=3"),
    ({"lr": -1.0}, "Workload.lr=-1.0")])
def test_a_bad_control_value_is_refused_before_any_process(values, message):
    with pytest.raises(ValueError, match=message):
        configure(BASE, values)


def test_compare_refuses_configurations_of_different_world_sizes():
    with pytest.raises(ValueError, match=r"world sizes \[2, 4\]: give them one world_size"):
        lab.compare({"two": LocalSGDConfig(world_size=2),
                     "four": FedAvgConfig(world_size=4)})


def test_bytes_to_reach_is_the_first_bytes_at_the_target_or_inf():
    assert lab.bytes_to_reach(RECORDS, 1.0) == {"a": 100.0, "b": math.inf}


@pytest.mark.parametrize("target", [-1.0, True, float("nan")])
def test_bytes_to_reach_refuses_a_target_that_is_not_a_loss(target):
    with pytest.raises(ValueError, match=f"target_loss={target!r} is out of range"):
        lab.bytes_to_reach(RECORDS, target)


def test_figures_draw_one_trace_per_run():
    curves = lab.curves_figure(RECORDS, x="bytes_sent", y="loss", log_x=True)
    assert [t.name for t in curves.data] == ["a", "b"]
    assert list(curves.data[0].y) == [2.0, 0.9, 0.4]
    assert curves.layout.xaxis.type == "log"
    frontier = lab.frontier_figure(RECORDS)
    assert list(frontier.data[0].text) == ["a", "b"]
    assert list(frontier.data[0].y) == [0.8, 0.3]


SCHEMES = {"dense": make_compressor("none"), "top-k 1%": TopK(0.01), "sign": Sign()}


@pytest.mark.timeout(240)
def test_bytes_against_world_size_counts_real_sends_equal_to_the_model_bytes():
    measured = lab.bytes_against_world_size(SCHEMES, 1001, world_sizes=(2, 3))
    model = lab.model_bytes_against_world_size(SCHEMES, 1001, world_sizes=(2, 3))
    assert list(measured["scheme"]) == ["dense", "top-k 1%", "sign"] * 2
    both = measured.merge(model, on=["scheme", "world_size"])
    assert ((both["bytes_sent"] - both["model_bytes"]).abs() <= 1).all(), both
    # 1001 float32 on 3 ranks: ring chunks of 334, 334 and 333 elements, so rank 0 sends two
    # 333-element chunks and two of 334, the others one of 333 and three of 334
    dense3 = both[(both["scheme"] == "dense") & (both["world_size"] == 3)].iloc[0]
    assert (dense3["bytes_sent_min"], dense3["bytes_sent_max"]) == (4 * 1334, 4 * 1335)
    topk = measured[measured["scheme"] == "top-k 1%"].set_index("world_size")["bytes_sent"]
    assert topk[3] == 2 * topk[2] == 2 * 8 * 10, "an all-gather of (N-1) payloads of 8k bytes"


def test_top_k_saves_100_over_n_and_nothing_at_100_ranks():
    model = lab.model_bytes_against_world_size(SCHEMES, 10_000, world_sizes=(2, 4, 100, 200))
    bytes_ = model.pivot(index="world_size", columns="scheme", values="model_bytes")
    saving = bytes_["dense"] / bytes_["top-k 1%"]
    for n in (2, 4, 100, 200):
        assert saving[n] == pytest.approx(100 / n, rel=1e-3)
    assert (bytes_["dense"] / bytes_["sign"])[4] == pytest.approx(64 / 4, rel=0.02)


@pytest.mark.parametrize("kwargs, message", [
    (dict(compressors={}), "compressors={} is out of range"),
    (dict(compressors={"a": "topk"}), "compressors=.* is out of range"),
    (dict(numel=0), "numel=0 is out of range"),
    (dict(world_sizes=(1, 2)), r"world_sizes=\(1, 2\) is out of range"),
    (dict(world_sizes=(2, 1000)), r"world_sizes=\(2, 1000\) is out of range")])
def test_bytes_against_world_size_refuses_bad_arguments_before_any_process(kwargs, message):
    args = {"compressors": SCHEMES, "numel": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        lab.bytes_against_world_size(**args)


def test_bytes_figure_draws_a_model_line_and_measured_markers_per_scheme():
    model = lab.model_bytes_against_world_size(SCHEMES, 1000, world_sizes=(2, 8, 64))
    measured = pd.DataFrame([{"scheme": "dense", "world_size": 2, "bytes_sent": 4000.0}])
    fig = lab.bytes_against_world_size_figure(measured, model)
    assert [(t.name, t.mode) for t in fig.data][:2] == [("dense", "lines"),
                                                        ("dense: bytes sent (measured)", "markers")]
    assert len(fig.data) == 6 and fig.layout.xaxis.type == "log"
    assert "model bytes" in fig.layout.title.text
