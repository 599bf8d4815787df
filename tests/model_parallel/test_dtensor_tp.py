"""PyTorch's DTensor tensor parallelism against distlab's Megatron layers, same weights."""
import pytest
import torch
from torch.testing import assert_close

import distlab
from distlab.model_parallel import dtensor_tp
from distlab.model_parallel.sequence_parallel import TINY

pytestmark = pytest.mark.timeout(120)


def plain_and_sequence_parallel(workload):
    return [dtensor_tp.compare_on_ranks(workload, sequence_parallel=on) for on in (False, True)]


@pytest.fixture(scope="module")
def two_ranks():
    return distlab.launch(plain_and_sequence_parallel, 2, TINY.loaded())


def _assert_same(result):
    assert_close(result["dtensor"], result["distlab"])
    theirs, ours = result["gradients"]["dtensor"], result["gradients"]["distlab"]
    assert theirs.keys() == ours.keys()
    for name, grad in ours.items():
        assert_close(theirs[name], grad, msg=f"gradient of {name}")


def test_colwise_and_rowwise_parallel_equal_megatron_layers(two_ranks):
    for plain, _ in two_ranks:
        _assert_same(plain)
        assert plain["dtensor"].shape == (TINY.batch_size, TINY.block_size, 44)


def test_torch_sequence_parallel_equals_distlab_sequence_parallel(two_ranks):
    for _, seq in two_ranks:
        _assert_same(seq)
        assert seq["distlab"].shape[1] == TINY.block_size // 2     # this rank's tokens


def test_compare_reports_the_largest_difference():
    result = dtensor_tp.compare(world_size=2)
    assert result["max_abs_diff"] < 1e-5 and result["grad_max_abs_diff"] < 1e-5
    assert torch.is_tensor(result["dtensor"])
    with pytest.raises(ValueError, match="world_size"):
        dtensor_tp.compare(world_size=0)
