"""distlab.communication.same_tensor: the collectives' shape check, made once per agreed tensor."""
import pytest
import torch
import torch.distributed as dist

import distlab
from distlab import comm
from distlab.communication import collectives as C
from distlab.communication import same_tensor

pytestmark = pytest.mark.timeout(120)


def comparisons():
    return comm.ledger().by_op().get("all_gather", {}).get("calls", 0)


def repeated_calls():
    x, y = torch.ones(1000), torch.ones(10, dtype=torch.float64)
    comm.ledger().reset()
    for _ in range(3):
        C.ring_all_reduce(x)
    after_three = comparisons()
    C.ring_all_reduce(y)               # another tensor: compared
    C.ring_all_reduce(x)               # back to the first: compared again (only the last counts)
    summed = x.clone()
    C.ring_reduce_scatter(x)           # another function: its own agreement
    C.ring_reduce_scatter(x)
    pair = dist.new_group([0, 1])      # another group: its own agreement
    if dist.get_rank() < 2:
        C.ring_all_reduce(x, group=pair)
    return after_three, comparisons(), summed


def test_a_tensor_the_group_agreed_on_is_compared_once():
    results = distlab.launch(repeated_calls, 3, timeout=60)
    for rank, (after_three, total, summed) in enumerate(results):
        assert after_three == 1
        assert total == 4 + (rank < 2)
        torch.testing.assert_close(summed, torch.full((1000,), 81.0))   # 3 ranks, 4 sums


def new_shapes_after_an_agreement():
    rank = dist.get_rank()
    C.ring_all_reduce(torch.ones(4))
    try:
        C.ring_all_reduce(torch.ones(5 + rank))     # every rank passes a new shape
    except ValueError as e:
        return str(e)
    return None


def test_a_mismatch_after_an_agreement_is_refused_on_every_rank():
    for error in distlab.launch(new_shapes_after_an_agreement, 3, timeout=60):
        assert "same shape and dtype" in error
        assert "rank 0: (5,) torch.float32; rank 1: (6,) torch.float32" in error


def one_rank_changes_its_shape():
    same_tensor._HINT_AFTER = 0.5
    C.ring_all_reduce(torch.ones(4))
    C.ring_all_reduce(torch.ones(4 + (dist.get_rank() == 1)))   # ranks 0 and 2 skip the check


def test_a_rank_that_changes_its_shape_alone_says_why_it_waits():
    output = []
    with pytest.raises(distlab.WorkerError, match="timed out"):
        distlab.launch(one_rank_changes_its_shape, 3, timeout=6,
                       on_output=lambda rank, stream, text: output.append((rank, stream, text)))
    hints = [(rank, stream) for rank, stream, text in output if "has waited 0.5 s" in text]
    assert hints == [(1, "stderr")]
    text = "".join(t for _, _, t in output)
    assert "its (5,) torch.float32" in text and "last agreed on ((4,) torch.float32)" in text
