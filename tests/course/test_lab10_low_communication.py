"""Lab 10's glue, headless: several runs in one launch (each equal to its own launch's
result), the budget panel's run (the rows of budget.compare, reported through the panel),
the compressed all-reduce's bytes against N (counted on real ranks equal to the formulas),
the PowerSGD table, and the figures."""
from dataclasses import replace

import ipywidgets as W
import pandas as pd
import pytest
import torch

from distlab.communication_efficient import budget, diloco, powersgd
from distlab.communication_efficient import compressed_all_reduce as C
from distlab.course import lab10_low_communication as lab
from distlab.ui.figures import LiveFigure
from distlab.ui.panel import RunPanel

pytestmark = pytest.mark.timeout(180)
TINY = replace(diloco.WORKLOAD, hidden=8, num_steps=4)


def test_runs_together_equal_their_references_and_keep_every_ranks_result():
    config = diloco.DiLoCoConfig(workload=TINY, inner_steps=2)
    sgd = powersgd.PowerSGDConfig(workload=replace(powersgd.WORKLOAD, hidden=8, num_steps=4),
                                  start_iter=2)
    runs = lab.run_together({"diloco": (diloco.train, config), "ours": (powersgd.train, sgd),
                             "hook": (powersgd.train_torch_hook, sgd)})
    assert [len(res) for res in runs.values()] == [2, 2, 2]
    torch.testing.assert_close(torch.tensor(runs["diloco"][1]["params"]),
                               torch.tensor(diloco.reference(config)["params"]))
    table = lab.powersgd_table({"ours": runs["ours"], "hook": runs["hook"]})
    assert list(table.columns) == ["run", "step", "loss", "bytes_per_step"]
    assert table.groupby("run").size().tolist() == [4, 4]
    mean = [(a + b) / 2 for a, b in zip(runs["ours"][0]["loss"], runs["ours"][1]["loss"])]
    assert table[table["run"] == "ours"]["loss"].tolist() == pytest.approx(mean)


def test_run_together_refuses_configurations_of_different_world_sizes():
    with pytest.raises(ValueError, match="one world_size"):
        lab.run_together({"a": (diloco.train, diloco.DiLoCoConfig(workload=TINY, inner_steps=2)),
                          "b": (diloco.train, diloco.DiLoCoConfig(workload=TINY, inner_steps=2,
                                                                   world_size=1))})


def test_training_loss_is_dilocos_loss_of_its_global_model():
    result = diloco.reference(diloco.DiLoCoConfig(workload=TINY, inner_steps=2))
    assert lab.training_loss(TINY, result["params"]) == pytest.approx(result["loss"])


def test_measured_compressed_bytes_equal_the_formulas_on_three_ranks():
    measured = lab.measured_compressed_bytes(301, (3,))
    formula = lab.compressed_bytes(301, (3,))
    pd.testing.assert_frame_equal(measured, formula)
    two_phase = formula[formula["method"] == "sign, two-phase"]["bytes_per_rank"].tolist()
    assert two_phase == [max(C.bytes_per_rank("two_phase", 301, 3, rank=r) for r in range(3))]


def test_the_budget_panel_runs_one_method_on_its_network_with_compares_rows():
    base = lab.BudgetRun(num_steps=4, period=2, workload=replace(budget.WORKLOAD, hidden=16))
    clock = LiveFigure(x="wall_time", y="loss")
    panel = RunPanel({"method": W.Dropdown(options=budget.METHODS, value="diloco"),
                      "network": W.Dropdown(options=list(lab.NETWORKS), value="1 Gbit/s")},
                     lab.start_budget_run, [clock], config=base)
    panel.run(method="ddp")
    panel.wait()
    rows = panel.metrics()
    want = budget.compare(["ddp"], bandwidth=budget.GBIT, num_steps=4, period=2,
                          workload=base.workload)
    mine = rows[rows["rank"] == 0].sort_values("step")
    assert mine["step"].tolist() == want["step"].tolist()
    assert mine["bytes_sent"].tolist() == want["bytes_sent"].tolist()
    assert list(clock.lines()) == ["method=ddp network=1 Gbit/s"]


@pytest.mark.parametrize("field, value", [("method", "sgd"), ("network", "10 Gbit/s"),
                                          ("latency", -1), ("world_size", 5),
                                          ("period", 3), ("num_steps", 5)])
def test_a_bad_budget_run_is_refused_by_name_before_any_process(field, value):
    with pytest.raises(ValueError, match=field):
        lab.BudgetRun(**{field: value})


def test_figures_draw_one_trace_per_line_and_the_crossover():
    formula = lab.compressed_bytes(1000, (2, 4, 8))
    fig = lab.bytes_against_world_size_figure(formula, formula[formula["world_size"] < 4], 3)
    assert len(fig.data) == 6 and fig.layout.shapes[0].x0 == 3
    table = pd.DataFrame({"network": ["x", "x", "y"], "method": ["ddp", "ddp", "ddp"],
                          "step": [1, 2, 2], "loss": [1.0, 0.5, 0.6],
                          "wall_time": [0.1, 0.2, 0.3]})
    assert [t.name for t in lab.budget_figure(table, "wall_time", "t").data] == ["ddp · x", "ddp · y"]
