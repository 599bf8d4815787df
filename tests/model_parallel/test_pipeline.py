"""Pipeline parallelism: schedules, partitions, and the pipelined model against the unsplit one.

One launch per world size checks gradients of one step and a whole loss curve, for both
schedules and for both models (launches are the slow part).
"""
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import distlab
from distlab.model_parallel import pipeline as pp
from distlab.problems.workloads import Workload, train_reference

pytestmark = pytest.mark.timeout(150)

MLP = Workload("mlp", hidden=16, depth=3, batch_size=24, num_steps=3)           # 7 layers
LM = Workload("transformer", hidden=16, num_heads=2, depth=3, block_size=8, batch_size=6,
              num_steps=2, lr=0.3)                                              # 5 layers


def check_pipeline(workloads):
    """Runs on every rank: one step's gradients, then whole loss curves, both schedules."""
    rank, p = dist.get_rank(), dist.get_world_size()
    out = []
    for wl in workloads:
        X, y = next(wl.batches())
        full = wl.build_model()
        wl.loss(full(X), y).backward()
        layers = pp.partition(len(full), p)[rank]
        for sched, m in (("gpipe", 5), ("1f1b", 3)):     # m not dividing the batch, too
            model = wl.build_model()
            stage = pp.PipelineStage(nn.Sequential(*list(model)[layers.start: layers.stop]),
                                     rank, pp.PipelineConfig(wl, p, m, sched))
            loss = stage.train_step(X, y, wl.loss)
            if rank == p - 1:
                assert_close(loss, wl.loss(full(X), y).item(), msg=f"{sched} loss")
            for i in layers:
                for (n, a), b in zip(model[i].named_parameters(), full[i].parameters()):
                    assert_close(a.grad, b.grad, msg=f"{wl.model} {sched} layer {i} {n}")
        for sched in pp.SCHEDULES:
            out.append(pp.train(pp.PipelineConfig(wl, p, 4, sched))["losses"])
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_pipeline_matches_unsplit_model(world_size):
    # Loaded here, once, and sent to the workers with the workloads.
    # At 4 ranks, a depth-2 MLP (5 layers: 2, 1, 1, 1) gives stage 2 a ReLU alone.
    workloads = [w.loaded() for w in ([MLP, LM] if world_size == 2
                                      else [MLP, replace(MLP, depth=2)])]
    results = distlab.launch(check_pipeline, world_size, workloads, timeout=120)
    curves = iter(results[-1])             # the last stage holds the losses
    for wl in workloads:
        ref = torch.tensor(train_reference(wl))
        for sched in pp.SCHEDULES:
            assert_close(torch.tensor(next(curves), dtype=torch.float32), ref,
                         rtol=1e-5, atol=1e-5, msg=f"{wl.model} {sched}")
    assert all(curve == [] for r in results[:-1] for curve in r)


@pytest.fixture(scope="module")
def sweep_runs():
    """2 stages, m in (1, 4), both schedules, one launch; compute_delay makes the schedule
    (not the shared machine's noise) set the timing. Per config, every rank's result."""
    wl = Workload("mlp", hidden=16, depth=1, batch_size=16, num_steps=2).loaded()
    configs = [pp.PipelineConfig(wl, 2, m, s, compute_delay=0.01) for s in pp.SCHEDULES
               for m in (1, 4)]
    per_rank = distlab.launch(pp.sweep, 2, configs, timeout=120)
    return [[per_rank[r][k] for r in range(2)] for k in range(len(configs))]


def summary_of(runs):
    # Imported here: the workers import this test module to find check_pipeline, and need
    # not import plotly.
    from distlab.course.lab05_model_parallel import pipeline_summary
    return pipeline_summary(runs)


def test_timeline_records_every_kind_of_event(sweep_runs):
    kinds = {e["kind"] for e in sweep_runs[1][0]["events"]}
    assert kinds == {"forward", "backward", "send", "recv", "idle"}


def test_bubble_shrinks_with_more_microbatches_and_stays_above_the_ideal(sweep_runs):
    b = summary_of(sweep_runs).groupby(["schedule", "num_microbatches"])["measured_bubble"].first()
    for s in pp.SCHEDULES:
        assert b[s, 4] < b[s, 1], "the bubble shrinks with more microbatches"
        assert b[s, 1] >= pp.bubble_fraction(2, 1) - 0.05


def test_gpipe_keeps_every_microbatch_and_1f1b_at_most_p_minus_s(sweep_runs):
    peak = summary_of(sweep_runs).set_index(["schedule", "num_microbatches", "rank"])[
        "peak_activations"]
    assert peak["gpipe", 4, 0] == 4 and peak["gpipe", 4, 1] == 4
    assert peak["1f1b", 4, 0] == 2 and peak["1f1b", 4, 1] == 1     # p - stage


def test_lab_figures_draw_from_the_runs(sweep_runs):
    from distlab.course.lab05_model_parallel import bubble_figure, gantt_figure, memory_figure
    df = summary_of(sweep_runs)
    gantt = gantt_figure(sweep_runs[1])
    assert {t.name for t in gantt.data} == {"forward", "backward", "send", "recv", "idle"}
    assert len(bubble_figure(df).data) == 3 and len(memory_figure(df).data) == 2


@pytest.mark.parametrize("p,m", [(1, 3), (2, 1), (3, 5), (4, 8), (4, 2)])
def test_schedules_are_complete_and_bounded(p, m):
    for s in range(p):
        gpipe, f1b = pp.schedule("gpipe", p, m, s), pp.schedule("1f1b", p, m, s)
        for ops in (gpipe, f1b):
            every = [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
            assert sorted(ops) == sorted(every)
            assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(m))
        in_flight = max(sum(1 for o in f1b[:k + 1] if o[0] == "F")
                        - sum(1 for o in f1b[:k + 1] if o[0] == "B") for k in range(2 * m))
        assert in_flight == min(p - s, m)


def test_partition_gives_the_first_stages_the_remainder():
    assert [list(r) for r in pp.partition(7, 4)] == [[0, 1], [2, 3], [4, 5], [6]]
    assert [len(r) for r in pp.partition(5, 2)] == [3, 2]
    assert pp.bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_more_stages_than_layers_are_refused():
    with pytest.raises(ValueError, match="num_stages=4 is more than the model's 3 layers"):
        pp.partition(3, 4)
    with pytest.raises(ValueError, match="num_stages=4 is more than"):
        pp.PipelineConfig(Workload("mlp", depth=1), num_stages=4, num_microbatches=2)


def test_bad_pipeline_configs_are_refused_when_made():
    with pytest.raises(ValueError, match="num_microbatches=8 is out of range; allowed at "
                                         "most batch_size=4"):
        pp.PipelineConfig(Workload("mlp", batch_size=4), num_stages=2, num_microbatches=8)
    with pytest.raises(ValueError, match="schedule='zigzag'"):
        pp.PipelineConfig(Workload(), 2, 4, "zigzag")
    with pytest.raises(ValueError, match="num_stages=True"):
        pp.PipelineConfig(Workload(), num_stages=True)
    with pytest.raises(ValueError, match="compute_delay=-0.1"):
        pp.PipelineConfig(Workload(), compute_delay=-0.1)
    with pytest.raises(ValueError, match="workload=None"):
        pp.PipelineConfig(None)


def test_bad_numbers_to_the_pipeline_helpers_are_refused():
    with pytest.raises(ValueError, match=r"num_microbatches=0 is out of range; allowed an int >= 1"):
        pp.bubble_fraction(2, 0)
    with pytest.raises(ValueError, match=r"num_layers=2.5 is out of range"):
        pp.partition(2.5, 2)
    with pytest.raises(ValueError, match=r"stage=2 is out of range; allowed an int in 0..1"):
        pp.schedule("1f1b", 2, 4, 2)
    with pytest.raises(ValueError, match=r"name='zigzag' is not a schedule"):
        pp.schedule("zigzag", 2, 4, 0)
    with pytest.raises(ValueError, match=r"stage=-1 is out of range"):
        pp.PipelineStage(nn.Linear(2, 2), -1, pp.PipelineConfig(Workload(), 2, 4))


def pipeline_on_ranks_1_and_2(config):
    """Rank 0 stays out: the stages are ranks 0 and 1 of a subgroup of the world."""
    group = dist.new_group([1, 2])
    return None if dist.get_rank() == 0 else pp.train(config, group)["losses"]


def test_pipeline_trains_inside_a_subgroup_of_the_world():
    config = pp.PipelineConfig(MLP.loaded(), num_stages=2, num_microbatches=3)
    results = distlab.launch(pipeline_on_ranks_1_and_2, 3, config, timeout=120)
    assert results[0] is None and results[1] == []
    assert_close(torch.tensor(results[2], dtype=torch.float32),
                 torch.tensor(pp.reference(config)), rtol=1e-5, atol=1e-5)
