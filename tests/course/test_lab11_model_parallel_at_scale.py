"""Lab 11's glue, headless: several runs in one launch (each equal to its reference), ring
attention and Ulysses against full attention, the schedule panel's live Gantt chart, and the
figures and the volume table (from the modules' formulas)."""
import ipywidgets as W
import pandas as pd
import pytest
import torch

from distlab.communication.all_to_all import model_bytes
from distlab.course import lab11_model_parallel_at_scale as lab
from distlab.model_parallel import context_parallel, crossover, pipeline, schedules, three_d
from distlab.model_parallel.experts import capacity
from distlab.problems.workloads import Workload
from distlab.ui.panel import RunPanel

pytestmark = pytest.mark.timeout(180)


def test_runs_together_equal_their_references_and_keep_every_ranks_result():
    configs = {m: context_parallel.ContextParallelConfig(method=m, seq_len=8, num_steps=2)
               for m in context_parallel.METHODS}
    runs = lab.run_together({m: (context_parallel.train, c) for m, c in configs.items()},
                            world_size=2)
    assert [len(res) for res in runs.values()] == [2, 2]
    for m, res in runs.items():
        want = context_parallel.reference(configs[m])["losses"]
        for r in res:
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(want))


def test_ring_attention_and_ulysses_equal_full_attention_on_every_rank():
    errors = lab.attention_errors(world_size=2, seq_len=8, heads=2, head_dim=4)
    assert sorted(map(tuple, errors[["method", "causal"]].values.tolist())) == sorted(
        (m, c) for m in ("ring", "ring, zigzag", "ulysses") for c in (True, False))
    assert (errors[["output", "gradients"]] < 1e-12).all().all(), errors


def test_the_schedule_panel_draws_the_last_step_of_every_stage():
    config = pipeline.PipelineConfig(Workload("mlp", hidden=8, depth=2, batch_size=4,
                                              num_steps=2), num_stages=2, num_microbatches=2)
    gantt = lab.LiveGantt()
    panel = RunPanel({"schedule": W.Dropdown(options=schedules.ALL_SCHEDULES, value="1f1b")},
                     lab.start_schedule, [gantt], config=config)
    results = panel.run(schedule="zb-h1").result()
    panel.wait()
    last = [[e for e in r["events"] if e["step"] == 1] for r in results]
    assert gantt.lines() == {0: len(last[0]), 1: len(last[1])}
    drawn = {t.name for t in gantt.figure.data}
    assert {"F", "B", "W"} <= drawn and "zb-h1" in gantt.figure.layout.title.text
    torch.testing.assert_close(torch.tensor(results[-1]["losses"]),
                               torch.tensor(pipeline.reference(config)))
    panel.clear()
    assert gantt.lines() == {} and not gantt.figure.data


def test_gantt_figure_numbers_each_pass_and_lightens_the_second_chunk():
    fig = lab.gantt_figure(schedules.simulate("interleaved", 2, 2, 2), "interleaved")
    bars = {t.name: t for t in fig.data}
    assert set(bars) == {"F", "B"} and len(bars["F"].x) == 2 * 2 * 2      # p · m · v forwards
    assert sorted(set(bars["F"].marker.opacity)) == [0.55, 1.0]
    assert sorted(set(bars["F"].text)) == ["0", "1"]


def test_expert_histogram_sums_the_ranks_and_the_figure_stacks_kept_on_dropped():
    results = [{"kept": [3, 1], "dropped": [0, 2]}, {"kept": [2, 2], "dropped": [1, 0]}]
    hist = lab.expert_histogram(results)
    assert hist.to_dict("list") == {"expert": [0, 1], "kept": [5, 3], "dropped": [1, 2]}
    fig = lab.expert_figure(hist, "t")
    assert [t.name for t in fig.data] == ["kept", "dropped (over capacity)"]


def test_mesh_figure_draws_every_rank_and_every_group():
    table = three_d.mesh_table(three_d.ThreeDConfig(dp=2, tp=2, pp=2))
    fig = lab.mesh_figure(table)
    ranks = fig.data[-1]
    assert sorted(int(t) for t in ranks.text) == list(range(8))
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == sum(len(groups) for groups in table.groups.values())
    assert {t.legendgroup for t in lines} == {"tp", "dp", "pp"}


def test_memory_figure_draws_a_measured_and_a_scores_line_per_method():
    rows = [dict(method=m, seq_len=T, world_size=2, peak_bytes=T * k, scores_bytes=T)
            for k, m in enumerate(("full", "ring", "ulysses"), 1) for T in (64, 128)]
    fig = lab.memory_figure(rows)
    assert len(fig.data) == 6 and fig.data[0].name == "full: measured peak"


def test_volume_table_takes_each_row_from_the_modules_formulas():
    B, T, C, H, p, E = 2, 16, 8, 2, 2, 4
    table = lab.volume_table(B=B, T=T, C=C, H=H, p=p, E=E)
    layer = crossover.volumes(Workload("transformer", hidden=C, num_heads=H, depth=1,
                                       block_size=T, batch_size=B), p)
    ring = context_parallel.predicted_bytes(context_parallel.ContextParallelConfig(
        method="ring", world_size=p, seq_len=T, heads=H, head_dim=C // H, batch_size=B))
    got = table["bytes per rank"]
    assert got["DP"] == layer["dp_per_block"] and got["TP"] == layer["tp_per_block"]
    assert got["SP"] == layer["sp_per_block"] and got["CP, ring"] == sum(ring.values())
    assert got["EP"] == 4 * model_bytes(E * capacity(B * T // p, E, 2, 1.25) * C * 4, p)
    assert got["PP"] == 2 * B * T * C * 4
    assert isinstance(table, pd.DataFrame) and list(table.index)[0] == "DP"
