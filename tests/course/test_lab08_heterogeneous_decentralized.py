"""Lab 08's glue, headless: the balance table and figure, the mixing-matrix heatmap, the
consensus sweep, the bytes of a D-PSGD rank and of a parameter server's root measured on
real processes, the planner's table (also in the heterogeneous mode), and the figures."""
from dataclasses import replace

import pandas as pd
import pytest
import torch

from distlab.communication_efficient.fedavg import FedAvgConfig
from distlab.course import lab08_heterogeneous_decentralized as lab
from distlab.decentralized import topology
from distlab.decentralized.dpsgd import DPSGDConfig
from distlab.heterogeneous import backup_workers
from distlab.heterogeneous.backup_workers import BackupConfig
from distlab.planning.cluster import Cluster, Device, ModelSpec
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(180)
TINY = Workload(model="mlp", hidden=8, depth=1, batch_size=24, lr=0.1, num_steps=2)
TINY_BYTES = 4 * (64 * 8 + 8 + 8 * 10 + 10)


def hetero_result(batch, compute, wait):
    return {"batch": batch, "compute_times": compute, "wait_times": wait}


def test_the_balance_table_sums_each_ranks_compute_and_wait_times():
    runs = {"equal": [hetero_result(4, [0.4, 0.4], [0.0, 0.0]),
                      hetero_result(4, [0.1, 0.1], [0.3, 0.3])]}
    table = lab.balance_table(runs)
    assert table["batch"].tolist() == [4, 4]
    assert table["compute_time"].tolist() == pytest.approx([0.8, 0.2])
    assert table["wait_time"].tolist() == pytest.approx([0.0, 0.6])
    figure = lab.balance_figure(table)
    assert [t.name for t in figure.data] == ["computing (injected speed)",
                                              "waiting in the all-reduce"]


def test_the_mixing_figure_shows_the_matrix_and_its_spectral_gap():
    ring = topology.ring(5)
    figure = lab.mixing_figure(ring)
    torch.testing.assert_close(torch.tensor(figure.data[0].z, dtype=torch.float64),
                               ring.mixing_matrix())
    assert f"spectral gap {ring.spectral_gap():.3f}" in figure.layout.title.text


def test_the_consensus_sweep_has_every_topology_at_every_measured_step():
    config = DPSGDConfig(TINY, world_size=4, eval_every=1)
    sweep = lab.consensus_sweep(config, world_size=6)
    assert sweep.groupby("topology").size().tolist() == [2, 2, 2]
    gaps = sorted(sweep["spectral_gap"].unique())
    assert gaps == sorted(topology.build(n, 6).spectral_gap() for n in topology.TOPOLOGIES)


def test_a_ring_rank_sends_two_models_a_step_and_the_servers_root_n_replies():
    server = BackupConfig(workload=replace(TINY, batch_size=8), num_workers=2, step_time=0.0)
    table = lab.bytes_against_world_size(DPSGDConfig(TINY, world_size=3), server,
                                         world_sizes=(3,)).set_index("who")["bytes_per_step"]
    assert table["D-PSGD rank (ring)"] == 2 * TINY_BYTES
    reply = 4 * (backup_workers.REPLY_HEAD + TINY_BYTES // 4)
    steps = TINY.num_steps        # a reply to each worker per step, and the last STOP
    assert table["parameter server root"] == 3 * reply * (steps + 1) / steps


def test_bytes_against_world_size_refuses_a_single_rank_before_any_process():
    with pytest.raises(ValueError, match=r"world_sizes=\(1, 3\) is out of range"):
        lab.bytes_against_world_size(DPSGDConfig(TINY), BackupConfig(), world_sizes=(1, 3))


def test_the_race_reports_time_to_target_final_loss_and_the_curves():
    config = DPSGDConfig(replace(TINY, num_steps=3), world_size=2, eval_every=1)
    table = lab.race({"gossip": config, "all-reduce": replace(config, algorithm="all_reduce")},
                     target=100.0)
    assert list(table.index) == ["gossip", "all-reduce"]
    assert (table["time_to_target"] < float("inf")).all()      # any loss is below 100
    assert set(table.attrs["curves"]["run"]) == {"gossip", "all-reduce"}


def test_the_federated_sweep_keeps_rank_zeros_rounds_of_each_run():
    config = FedAvgConfig(workload=replace(TINY, num_steps=4, batch_size=16), world_size=2,
                          num_clients=4, client_fraction=0.5, local_steps=2)
    frame = lab.federated_sweep({"fedavg": config})
    assert set(frame["rank"]) == {0} and frame["step"].tolist() == [0, 1, 2]
    assert frame["loss"].notna().all()


MODEL = ModelSpec(num_layers=4, hidden=256, num_heads=4, seq_len=128, vocab=1000,
                  global_batch=16)


def test_the_plan_table_lists_plans_that_fit_fastest_first():
    table = lab.plan_table(MODEL, Cluster((4, Device(4e9, 1e12))), top=5)
    assert len(table) == 5 and table["step_s"].is_monotonic_increasing
    assert (table["memory_gb"] <= 4).all()
    dropped, _ = table.attrs["dropped"]
    assert dropped == 0


def test_the_plan_table_says_why_the_closest_dropped_plan_does_not_fit():
    table = lab.plan_table(MODEL, Cluster((4, Device(0.05e9, 1e12))))
    dropped, why = table.attrs["dropped"]
    assert dropped > 0 and "per rank, the device has 0.05 GB" in why


def test_the_heterogeneous_plan_table_leaves_out_plans_with_more_microbatches_than_sequences():
    devices = tuple(Device(80e9, 300e12 if r < 2 else 100e12) for r in range(4))
    table = lab.plan_table(replace(MODEL, global_batch=8), Cluster(devices, devices_per_node=2),
                           heterogeneous=True, top=100)
    for plan, shares in zip(table["plan"], table["batch_shares"]):
        assert int(plan.split("m=")[1]) <= min(shares)


def test_the_plan_table_refuses_a_bad_top():
    with pytest.raises(ValueError, match="top=0 is out of range"):
        lab.plan_table(MODEL, Cluster((4, Device(4e9, 1e12))), top=0)


def test_figures_draw_one_trace_per_run_and_one_marker_per_configuration():
    df = pd.DataFrame({"run": ["a", "a", "b"], "step": [0, 1, 0], "loss": [2.0, 1.0, 3.0]})
    curves = lab.curves_figure(df, x="step", y="loss", log_y=True)
    assert [t.name for t in curves.data] == ["a", "b"] and list(curves.data[0].y) == [2.0, 1.0]
    rows = [dict(dp=2, tp=1, batch_size=16, predicted=0.01, measured=0.02),
            dict(dp=1, tp=2, batch_size=32, predicted=0.03, measured=0.04)]
    scatter = lab.predicted_measured_figure(rows, rho=1.0)
    assert list(scatter.data[0].x) == [0.01, 0.03] and "rho = 1.00" in scatter.layout.title.text


def test_the_mixing_explorer_redraws_the_matrix_when_the_topology_or_ranks_move():
    explorer = lab.MixingExplorer(topology="ring", ranks=8)
    explorer.topology.value = "exponential"
    explorer.ranks.value = 6
    torch.testing.assert_close(torch.tensor(explorer.figure.data[0].z, dtype=torch.float64),
                               topology.exponential(6).mixing_matrix())
    assert "exponential, 6 ranks" in explorer.figure.layout.title.text


def test_the_plan_explorer_redraws_the_table_when_a_control_moves():
    explorer = lab.PlanExplorer({"small": MODEL, "wide": replace(MODEL, hidden=512)}, "small",
                                devices=8)
    assert "0.0" in explorer.table.value and "dp=" in explorer.table.value
    before = explorer.table.value
    explorer.controls["model"].value = "wide"
    explorer.controls["heterogeneous"].value = True
    assert explorer.table.value != before and "batch_shares" in explorer.table.value


def test_a_heterogeneous_cluster_has_its_second_half_at_half_speed():
    cluster = lab.cluster_of(16, 80, 25.0, heterogeneous=True)
    assert [d.flops for d in cluster.devices] == [300e12] * 8 + [150e12] * 8
    assert cluster.inter[1] == pytest.approx(1 / 25e9)
