"""Gradient accumulation with no_sync on 2 real ranks: the large batch, k times fewer bytes."""
from dataclasses import replace

import pytest
import torch

from distlab.memory import accumulation
from distlab.memory.accumulation import AccumulationConfig
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(240)

LARGE = AccumulationConfig(accumulation_steps=4, world_size=2,
                           workload=Workload(hidden=16, batch_size=32, num_steps=3))


@pytest.fixture(scope="module")
def runs():
    # k = 4 micro-batches of 4 per rank, against synchronizing every micro-batch of 4.
    every = replace(LARGE, accumulation_steps=1, workload=replace(LARGE.workload, batch_size=8))
    return accumulation.run(LARGE), accumulation.run(every)


def test_accumulated_steps_equal_the_large_batch_on_one_process(runs):
    want = accumulation.reference(LARGE)
    for rank, result in enumerate(runs[0]):
        torch.testing.assert_close(result["params"], want, msg=lambda m: f"rank {rank}: {m}")


def test_bytes_per_example_fall_by_k(runs):
    accumulated, every = runs
    for a, e in zip(accumulated, every):
        assert a["bytes_sent"] == e["bytes_sent"] > 0     # one all-reduce per optimizer step
        assert a["examples"] == 4 * e["examples"]
        assert e["bytes_per_example"] == 4 * a["bytes_per_example"]


@pytest.mark.parametrize("bad, match", [
    (dict(accumulation_steps=0), "accumulation_steps=0"),
    (dict(accumulation_steps=3), "accumulation_steps=3"),
    (dict(variant="ring"), "variant='ring'"), (dict(world_size=0), "world_size=0")])
def test_accumulation_config_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        replace(LARGE, **bad)
