"""Lab 06's glue, headless: sweeps refuse mixed world sizes, the bytes-to-target table, and
the static figures (one trace per run)."""
import math

import pandas as pd
import pytest

from distlab.communication_efficient.fedavg import FedAvgConfig
from distlab.communication_efficient.local_sgd import LocalSGDConfig
from distlab.course import lab06_communication_efficient as lab

RECORDS = pd.DataFrame([
    {"run": "a", "rank": 0, "step": 0, "loss": 2.0, "accuracy": 0.1, "bytes_sent": 0},
    {"run": "a", "rank": 0, "step": 1, "loss": 0.9, "accuracy": 0.5, "bytes_sent": 100},
    {"run": "a", "rank": 0, "step": 2, "loss": 0.4, "accuracy": 0.8, "bytes_sent": 200},
    {"run": "a", "rank": 1, "step": 2, "loss": None, "accuracy": None, "bytes_sent": 200},
    {"run": "b", "rank": 0, "step": 0, "loss": 2.0, "accuracy": 0.1, "bytes_sent": 0},
    {"run": "b", "rank": 0, "step": 1, "loss": 1.5, "accuracy": 0.3, "bytes_sent": 10},
])


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
