"""The TP-vs-DP crossover against the ledger's bytes of real runs on each side of it."""
from dataclasses import replace

import pytest

import distlab
from distlab.communication.alpha_beta import ring_all_reduce_bytes
from distlab.model_parallel import crossover as xo
from distlab.model_parallel import mesh
from distlab.model_parallel import sequence_parallel as sp
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)

SMALL = Workload("transformer", hidden=8, depth=1, num_heads=2, block_size=8, batch_size=4,
                 num_steps=1).loaded()            # crossover at 53 tokens: 32 below, 64 above
LARGE = replace(SMALL, batch_size=8)


def each_side(small, large):
    """One step of DP, TP and SP with 32 tokens, and of TP with 64, on 2 ranks."""
    dp = mesh.train(mesh.MeshConfig(small, dp=2, tp=1))["by_op"]
    return {"dp": dp, **{f"{name}_{w.batch_size}": sp.train(
        sp.SequenceParallelConfig(w, 2, sequence_parallel=on))["by_op"]
        for w in (small, large) for name, on in (("tp", False), ("sp", True))}}


@pytest.fixture(scope="module")
def measured():
    return distlab.launch(each_side, 2, SMALL, LARGE)


def test_crossover_is_the_weights_over_four_activations_per_block():
    assert xo.crossover(SMALL) == pytest.approx(xo.parameter_count(SMALL) / 32)
    assert 32 < xo.crossover(SMALL) < 64
    assert xo.block_crossover(1024) == 3 * 1024 + 13 / 4


def test_measured_bytes_equal_the_volumes(measured):
    loss = ring_all_reduce_bytes(4, 2)     # DP also all-reduces the loss, one float
    for rank in measured:
        assert rank["dp"]["all_reduce"]["bytes_sent"] == xo.volumes(SMALL, 2)["dp"] + loss
        for w in (SMALL, LARGE):
            want = xo.volumes(w, 2)
            assert rank[f"tp_{w.batch_size}"]["all_reduce"]["bytes_sent"] == want["tp"]
            got = rank[f"sp_{w.batch_size}"]
            assert sum(s["bytes_sent"] for s in got.values()) == want["sp"]


def test_tensor_parallel_sends_more_than_data_parallel_only_above_the_crossover(measured):
    for rank in measured:
        dp = rank["dp"]["all_reduce"]["bytes_sent"]
        assert rank["tp_4"]["all_reduce"]["bytes_sent"] < dp      # 32 tokens: below
        assert rank["tp_8"]["all_reduce"]["bytes_sent"] > dp      # 64 tokens: above


def test_crossover_refuses_other_models():
    with pytest.raises(ValueError, match="workload"):
        xo.crossover(Workload("mlp"))
