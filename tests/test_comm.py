"""distlab.comm: the accounted wrappers give torch.distributed's results and count bytes."""
import pytest
import torch
import torch.distributed as dist

import distlab
from distlab import comm


def exercise_every_wrapper():
    rank, p = dist.get_rank(), dist.get_world_size()
    comm.ledger().reset()
    x = torch.full((8,), float(rank + 1))
    comm.all_reduce(x)
    work = comm.all_reduce(y := torch.ones(4), async_op=True)
    work.wait()
    b = torch.full((6,), float(rank))
    comm.broadcast(b, src=1)
    out = torch.empty(2 * p)
    comm.all_gather_into_tensor(out, torch.full((2,), float(rank)))
    rs = torch.empty(2)
    comm.reduce_scatter_tensor(rs, torch.arange(2.0 * p))
    peer = (rank + 1) % p
    t = torch.full((3,), float(rank))
    r = torch.empty(3)
    reqs = [comm.isend(t, peer), comm.irecv(r, (rank - 1) % p)]
    for q in reqs:
        q.wait()
    comm.barrier()
    return x, y, b, out, rs, r, comm.ledger().by_op(), comm.ledger().totals()


P = 3


@pytest.fixture(scope="module")
def wrapped():
    """One launch of 3 ranks calling every wrapper once."""
    return distlab.launch(exercise_every_wrapper, P)


def test_wrappers_give_torch_distributed_results(wrapped):
    p = P
    for rank, (x, y, b, out, rs, r, _, _) in enumerate(wrapped):
        torch.testing.assert_close(x, torch.full((8,), 6.0))
        torch.testing.assert_close(y, torch.full((4,), 3.0))
        torch.testing.assert_close(b, torch.full((6,), 1.0))
        torch.testing.assert_close(out, torch.tensor([0., 0., 1., 1., 2., 2.]))
        torch.testing.assert_close(rs, p * torch.arange(2.0 * p)[2 * rank: 2 * rank + 2])
        torch.testing.assert_close(r, torch.full((3,), float((rank - 1) % p)))


def test_point_to_point_counts_exactly_the_tensor_bytes(wrapped):
    for *_, ops, _ in wrapped:
        assert ops["send"] == {"calls": 1, "bytes_sent": 12, "bytes_recv": 0,
                               "comm_time": ops["send"]["comm_time"]}
        assert ops["recv"]["bytes_recv"] == 12


def test_built_in_collectives_book_their_model_bytes(wrapped):
    p = P
    for rank, (*_, ops, totals) in enumerate(wrapped):
        ring = 2 * (p - 1) * 32 // p + 2 * (p - 1) * 16 // p
        assert ops["all_reduce"]["calls"] >= 2 and ops["all_reduce"]["bytes_sent"] >= ring
        assert ops["broadcast"]["bytes_sent"] == (24 if rank == 1 else 0)
        assert ops["broadcast"]["bytes_recv"] == (0 if rank == 1 else 24)
        assert ops["all_gather"]["bytes_sent"] == (p - 1) * 24 // p
        assert totals["comm_time"] > 0
        assert totals["bytes_sent"] == sum(o["bytes_sent"] for o in ops.values())


def gathers_on_gloo():
    rank = dist.get_rank()
    out = {}
    for dtype in (torch.float32, torch.float64, torch.int64):
        x = torch.arange(5, dtype=dtype) + 10 * rank
        ours, theirs = torch.empty(5 * 3, dtype=dtype), torch.empty(5 * 3, dtype=dtype)
        comm.all_gather_into_tensor(ours, x)
        dist.all_gather_into_tensor(theirs, x)
        out[dtype] = (ours, theirs)
    work = comm.all_gather_into_tensor(a := torch.empty(6), torch.full((2,), float(rank)),
                                       async_op=True)
    work.wait()
    upper = dist.new_group([1, 2])                 # peers named by their global rank
    pair = torch.empty(4)
    if rank in (1, 2):
        comm.all_gather_into_tensor(pair, torch.full((2,), float(rank)), group=upper)
    return out, a, pair, comm.ledger().by_op()["all_gather"]["calls"]


def test_all_gather_into_tensor_on_gloo_equals_torch_distributed():
    for rank, (out, a, pair, calls) in enumerate(distlab.launch(gathers_on_gloo, 3)):
        for dtype, (ours, theirs) in out.items():
            torch.testing.assert_close(ours, theirs, msg=str(dtype))
        torch.testing.assert_close(a, torch.tensor([0., 0., 1., 1., 2., 2.]))
        if rank > 0:
            torch.testing.assert_close(pair, torch.tensor([1., 1., 2., 2.]))
        assert calls == 4 + (rank > 0)             # one all-gather booked per call
