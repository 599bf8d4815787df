"""The budget-matched comparison: every method on one injected 100 Mbit/s network."""
import math

import pytest

from distlab.communication import alpha_beta
from distlab.communication.netsim import Network
from distlab.communication_efficient import budget

STEPS, H = 40, 10
MBIT_100 = 12.5e6


@pytest.fixture(scope="module")
def table():
    """One launch of 2 ranks: the seven methods in turn, 40 steps each, at 100 Mbit/s."""
    return budget.compare(budget.METHODS, bandwidth=MBIT_100, latency=1e-4, world_size=2,
                          num_steps=STEPS, period=H)


def ends(table):
    return table.groupby("method").last()


def test_compare_gives_a_tidy_table_of_every_method_to_the_last_step(table):
    assert list(table.columns) == ["network", "bandwidth", "method", "step", "loss",
                                   "bytes_sent", "comm_time", "wall_time"]
    assert list(table["method"].unique()) == list(budget.METHODS)
    assert (ends(table)["step"] == STEPS).all()
    assert table["network"].str.startswith("injected").all()
    assert table["loss"].map(math.isfinite).all()
    for _, df in table.groupby("method"):      # cumulative columns never go back
        assert df["bytes_sent"].is_monotonic_increasing
        assert df["wall_time"].is_monotonic_increasing


def test_bytes_sent_rank_the_methods_exactly(table):
    sent = ends(table)["bytes_sent"]
    n = sum(w.numel() for w in budget.WORKLOAD.build_model().parameters())
    ring = alpha_beta.ring_all_reduce_bytes(4 * n, 2)
    assert sent["ddp"] == STEPS * ring
    assert sent["diloco"] == sent["local_sgd"] == STEPS // H * ring     # H times fewer
    assert sent.sort_values().index.tolist() == [
        "topk", "streaming_diloco", "diloco", "local_sgd", "onebit_adam", "powersgd", "ddp"]


def test_at_100_mbit_diloco_and_powersgd_finish_before_ddp(table):
    wall = ends(table)["wall_time"]
    assert wall["diloco"] < wall["ddp"] and wall["powersgd"] < wall["ddp"], wall.to_dict()


def test_ddp_pays_at_least_its_injected_ring_time(table):
    n = sum(w.numel() for w in budget.WORKLOAD.build_model().parameters())
    injected = STEPS * Network(latency=1e-4, bandwidth=MBIT_100).all_reduce_delay(
        4 * n, 2)
    assert ends(table).loc["ddp", "comm_time"] >= injected


def test_a_bandwidth_of_none_is_the_machine_labelled_as_such():
    df = budget.compare(["local_sgd"], bandwidth=[None], num_steps=H, period=H)
    assert (df["network"] == budget.MACHINE).all() and (df["bandwidth"] == math.inf).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(methods=["ddp", "sgd"]), "methods"), (dict(methods="ddp"), "methods"),
    (dict(bandwidth=0), "bandwidth"), (dict(bandwidth=[1e6, -1]), "bandwidth"),
    (dict(latency=2), "latency"), (dict(world_size=True), "world_size"),
    (dict(num_steps=15), "num_steps"), (dict(period=3), "period")])
def test_bad_arguments_are_refused_by_name_before_any_process_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        budget.compare(**kwargs)
