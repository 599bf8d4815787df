"""distlab.decentralized.dpsgd: D-PSGD equals its one-process simulation, mixes faster on a
graph with a larger spectral gap, sends the same bytes per rank at any N on a ring, and beats
all-reduce SGD under an injected slow link."""
from dataclasses import replace

import pytest
import torch

from distlab.communication.netsim import Network
from distlab.decentralized import dpsgd
from distlab.decentralized.dpsgd import DPSGDConfig
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(180)

# Ranks start from different models and the step is small, so gossip, not the gradients,
# is what brings the models together.
MIXING = Workload(model="mlp", hidden=8, depth=1, batch_size=48, lr=0.01, num_steps=5)
MLP_BYTES = 4 * (64 * 8 + 8 + 8 * 10 + 10)


def mixing(world_size, topology, workload=MIXING, **fields):
    return DPSGDConfig(workload, world_size=world_size, topology=topology, same_init=False,
                       eval_every=4, **fields)


@pytest.fixture(scope="module")
def ring4():
    cfg = mixing(4, "ring")
    return cfg, dpsgd.start(cfg, timeout=90)


def test_bad_configs_name_the_field_value_and_range():
    cases = {"world_size": 0, "topology": "star", "algorithm": "gossip", "network": 1,
             "same_init": 0, "eval_every": 0}
    for name, value in cases.items():
        with pytest.raises(ValueError, match=rf"DPSGDConfig\.{name}={value!r}.*allowed"):
            DPSGDConfig(**{name: value})
    with pytest.raises(ValueError, match=r"DPSGDConfig\.same_init=False.*True for all-reduce"):
        DPSGDConfig(algorithm="all_reduce", same_init=False)
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.world_size=5 .*a divisor"):
        DPSGDConfig(world_size=5)


def test_four_rank_run_equals_the_one_process_simulation(ring4):
    cfg, run = ring4
    results = run.result()
    ref = dpsgd.reference(cfg)
    torch.testing.assert_close(torch.stack([r["params"] for r in results]), ref["params"])
    torch.testing.assert_close(torch.tensor([r["losses"] for r in results]).T, ref["losses"])
    got = run.metrics().dropna(subset=["consensus_distance"])
    for step, value in ref["consensus_distance"].items():
        measured = got[got.step == step].consensus_distance.unique()
        assert measured == pytest.approx([value], rel=1e-4)


def test_consensus_shrinks_faster_on_the_exponential_graph_than_on_the_ring(ring4):
    cfg, run = ring4
    ring = run.result()[0]["final"]["consensus_distance"]
    assert cfg.graph().spectral_gap() < replace(cfg, topology="exponential").graph().spectral_gap()
    exponential = dpsgd.reference(replace(cfg, topology="exponential"))["consensus_distance"]
    assert exponential[4] < ring / 4


def test_consensus_shrinks_faster_with_a_larger_spectral_gap_at_9_ranks():
    # One process simulates the 9 ranks: the gaps of the ring, the 3x3 torus and the
    # exponential graph all differ (at 4 ranks the ring is the 2x2 torus).
    rates = {}
    for name in ("ring", "torus", "exponential"):
        cfg = mixing(9, name, workload=replace(MIXING, batch_size=45))
        c = dpsgd.reference(cfg)["consensus_distance"]
        rates[cfg.graph().spectral_gap()] = c[4] / c[0]
    shrink = [rates[gap] for gap in sorted(rates)]
    assert shrink == sorted(shrink, reverse=True), rates


def test_run_equals_reference_for_the_all_reduce_baseline():
    cfg = DPSGDConfig(MIXING, world_size=2, algorithm="all_reduce")
    results = dpsgd.run(cfg, timeout=60)
    ref = dpsgd.reference(cfg)
    torch.testing.assert_close(results[0]["params"], results[1]["params"], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([r["params"] for r in results]), ref["params"])


def test_bytes_per_rank_per_step_do_not_depend_on_the_number_of_ranks_on_a_ring(ring4):
    three = dpsgd.run(replace(ring4[0], world_size=3, workload=replace(MIXING, num_steps=2)),
                      timeout=60)
    four = ring4[1].result()
    # Two neighbours, the whole model to each; the consensus measurements are not counted.
    assert {r["bytes_per_step"] for r in three + four} == {2 * MLP_BYTES}


def test_dpsgd_waits_less_than_all_reduce_sgd_for_an_injected_slow_link():
    # A ring all-reduce on 3 ranks pays 2(p-1) = 4 slow latencies per step, D-PSGD 2 on the
    # slow rank; 8 steps: about 0.64 s against 0.32 s injected.
    net = Network(latency=4e-3, slow_rank=2, slow_factor=5)
    base = DPSGDConfig(replace(MIXING, num_steps=8), world_size=3, network=net, eval_every=8)
    times = {a: max(r["train_time"] for r in dpsgd.run(replace(base, algorithm=a), timeout=60))
             for a in ("dpsgd", "all_reduce")}
    assert times["dpsgd"] < times["all_reduce"], times


def test_time_to_target_is_the_first_time_the_loss_reaches_it():
    records = [{"val_loss": 2.0, "train_time": 1.0}, {"loss": 1.0, "train_time": 1.5},
               {"val_loss": 0.5, "train_time": 2.0}, {"val_loss": 0.4, "train_time": 3.0}]
    assert dpsgd.time_to_target(records, 0.5) == 2.0
    assert dpsgd.time_to_target(records, 0.1) == float("inf")
