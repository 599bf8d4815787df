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
                                     rank, p)
            loss = stage.train_step(X, y, wl.loss, pp.PipelineConfig(p, m, sched))
            if rank == p - 1:
                assert_close(loss, wl.loss(full(X), y).item(), msg=f"{sched} loss")
            for i in layers:
                for (n, a), b in zip(model[i].named_parameters(), full[i].parameters()):
                    assert_close(a.grad, b.grad, msg=f"{wl.model} {sched} layer {i} {n}")
        for sched in pp.SCHEDULES:
            out.append(pp.train(pp.PipelineConfig(p, 4, sched), wl)["losses"])
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_pipeline_matches_unsplit_model(world_size):
    # Loaded here, not at import: the workers import this module to find check_pipeline,
    # and loading the digits there would import scikit-learn in every one (seconds).
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


def test_timeline_memory_and_bubble():
    # 2 stages, m in (1, 4), both schedules, one launch; compute_delay makes the schedule
    # (not the shared machine's noise) set the timing.
    wl = Workload("mlp", hidden=16, depth=1, batch_size=16, num_steps=2).loaded()
    configs = [pp.PipelineConfig(2, m, s, compute_delay=0.01) for s in pp.SCHEDULES
               for m in (1, 4)]
    per_rank = distlab.launch(pp.sweep, 2, configs, wl, timeout=120)
    runs = [[per_rank[r][k] for r in range(2)] for k in range(len(configs))]
    df = pp.summary(runs)
    kinds = {e["kind"] for e in runs[0][1]["events"]}
    assert kinds == {"forward", "backward", "send", "recv", "idle"}
    b = df.groupby(["schedule", "num_microbatches"])["measured_bubble"].first()
    for s in pp.SCHEDULES:
        assert b[s, 4] < b[s, 1], "the bubble shrinks with more microbatches"
        assert b[s, 1] >= pp.bubble_fraction(2, 1) - 0.05
    peak = df.set_index(["schedule", "num_microbatches", "rank"])["peak_activations"]
    assert peak["gpipe", 4, 0] == 4 and peak["gpipe", 4, 1] == 4
    assert peak["1f1b", 4, 0] == 2 and peak["1f1b", 4, 1] == 1     # p - stage
    # The lab's figures draw from these results. (Imported here: the workers import this
    # test module to find check_pipeline, and need not import plotly.)
    from distlab.course.lab05_model_parallel import bubble_figure, gantt_figure, memory_figure
    gantt = gantt_figure(runs[1])
    assert {t.name for t in gantt.data} == kinds
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


def test_partition_handles_uneven_layer_counts():
    assert [list(r) for r in pp.partition(7, 4)] == [[0, 1], [2, 3], [4, 5], [6]]
    assert [len(r) for r in pp.partition(5, 2)] == [3, 2]
    with pytest.raises(ValueError, match="num_stages=4 is more than the model's 3 layers"):
        pp.partition(3, 4)
    # Refused before launch.
    with pytest.raises(ValueError, match="num_stages=4 is more than"):
        pp.start(pp.PipelineConfig(4, 2), Workload("mlp", depth=1))
    with pytest.raises(ValueError, match="num_microbatches=8 is more than batch_size=4"):
        pp.start(pp.PipelineConfig(2, 8), Workload("mlp", batch_size=4))
    with pytest.raises(ValueError, match="schedule='zigzag'"):
        pp.PipelineConfig(2, 4, "zigzag")
    assert pp.bubble_fraction(4, 8) == pytest.approx(3 / 11)
