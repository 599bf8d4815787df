"""distlab.course.lab01_collectives: the panel's sweep, its validation, and the lab's figures."""
import math
import os

import pytest
import torch
import torch.distributed as dist

import distlab
from distlab.communication import collectives as C
from distlab.communication import cost_model as cm
from distlab.course import lab01_collectives as lab

pytestmark = pytest.mark.timeout(180)


def test_sweep_config_names_the_bad_field():
    with pytest.raises(ValueError, match=r"SweepConfig.algorithm='tree' is out of range"):
        lab.SweepConfig(algorithm="tree")
    with pytest.raises(ValueError, match="SweepConfig.max_nbytes=100 is out of range"):
        lab.SweepConfig(max_nbytes=100)
    with pytest.raises(ValueError, match="SweepConfig.repeats=True is out of range"):
        lab.SweepConfig(repeats=True)


def test_sweep_sizes_grow_by_four_up_to_the_largest():
    assert lab.SweepConfig(max_nbytes=1 << 20).sizes == [4096, 16384, 65536, 262144, 1 << 20]


@pytest.mark.parametrize("kwargs, match", [
    (dict(inject=True, bandwidth_gbit=0.0), "Network.bandwidth=0.0"),
    (dict(inject=False, latency_us=-1000), "Network.latency=-0.001 is out of range"),
    (dict(latency_us="5"), "start_sweep: latency_us='5' is not a number"),
    (dict(inject=1), "start_sweep: inject=1 is out of range"),
    (dict(max_nbytes=1.5e6), "SweepConfig.max_nbytes=1500000.0 is out of range"),
])
def test_start_sweep_refuses_bad_controls_before_starting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lab.start_sweep(**kwargs)


def test_sweep_reports_live_metrics():
    run = lab.start_sweep(world_size=2, algorithm="naive", max_nbytes=16384, inject=True,
                          latency_us=500, bandwidth_gbit=1.0)
    run.result()
    df = run.metrics()
    assert sorted(df.nbytes.unique()) == [4096, 16384]
    sent = df[df.nbytes == 16384].set_index("rank").bytes_sent_per_call
    assert sent[0] == sent[1] == 16384
    frame = lab.sweep_frame(df.assign(run="r"))
    assert list(frame.columns) == ["run", "algorithm", "world_size", "nbytes", "time"]
    # injected: 2 messages of latency 0.5 ms + 16 KiB at 1 Gbit/s each
    assert frame.time.max() >= 0.9 * 2 * (500e-6 + 16384 * 8 / 1e9)
    assert not math.isnan(frame.time.min())
    assert lab.figure_time_vs_size(frame, cm.fit(frame)).data


def test_sweep_labels_gloos_bytes_model_bytes():
    run = lab.start_sweep(world_size=2, algorithm="gloo", max_nbytes=4096)
    run.result()
    df = run.metrics()
    assert "bytes_sent_per_call" not in df       # nobody sees gloo's sends: booked, not counted
    assert (df.model_bytes_per_call == 4096).all()   # 2(p-1)/p·n on 2 ranks


def test_idle_cores_is_between_none_and_all_of_them():
    assert 0 <= lab.idle_cores(0.1) <= os.cpu_count()
    with pytest.raises(ValueError, match="seconds=0"):
        lab.idle_cores(0)


def traced_ring():
    trace = []
    C.ring_all_reduce(torch.ones(10) * dist.get_rank(), trace=trace)
    return trace


def test_timeline_draws_one_bar_per_step_of_every_rank():
    events = [e for trace in distlab.launch(traced_ring, 3) for e in trace]
    fig = lab.figure_timeline(events)
    assert sum(len(bar.x) for bar in fig.data) == 3 * 2 * (3 - 1)


def test_bytes_per_rank_draws_one_bar_group_per_algorithm():
    fig = lab.figure_bytes_per_rank({"ring": [6, 6], "naive": [8, 8]}, nbytes=8)
    assert [bar.name for bar in fig.data] == ["ring", "naive"]
