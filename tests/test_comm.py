"""distlab.comm: the accounted wrappers give torch.distributed's results and count bytes."""
import time

import pytest
import torch
import torch.distributed as dist

import distlab
from distlab import comm
from distlab.communication import alpha_beta, netsim
from distlab.communication.netsim import Network


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


# -- the injected network on every message ------------------------------------------------

N = 25_000                                   # float32: 100 kB
SLOW = Network(latency=1e-3, bandwidth=312_500.0)   # 2.5 Mbit/s: about 0.3 s for 100 kB
OVERLAP = 0.2                                # seconds of "computation" beside an async op


def messages_on_a_slow_network():
    rank = dist.get_rank()
    knob_off_at_start = netsim.everywhere() is None
    x = torch.arange(N, dtype=torch.float32) * (rank + 1)
    expected = x.clone()
    dist.all_reduce(expected)                # torch's own, neither counted nor injected
    t0 = time.perf_counter()
    comm.all_reduce(off := x.clone())        # the knob is off: the machine's own speed
    seconds = {"off": time.perf_counter() - t0}
    comm.ledger().reset()
    with comm.inject_network(SLOW):
        dist.barrier()
        t0 = time.perf_counter()
        comm.all_reduce(x)
        seconds["all_reduce"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        work = comm.all_reduce(y := torch.ones(N), async_op=True)
        time.sleep(OVERLAP)                  # computation overlapped with the all-reduce
        slept, real_sleep = [], time.sleep
        time.sleep = lambda s: (slept.append(s), real_sleep(s))[1]   # what wait() sleeps
        work.wait()
        time.sleep = real_sleep
        seconds["async"], seconds["async_wait_slept"] = time.perf_counter() - t0, sum(slept)
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            comm.send(torch.ones(N), 1)
        else:
            comm.recv(torch.empty(N), 0)
        seconds["p2p"] = time.perf_counter() - t0
    return (knob_off_at_start, netsim.everywhere() is None, x, expected, off, y, seconds,
            comm.ledger().by_op())


@pytest.fixture(scope="module")
def injected():
    """One launch of 2 ranks: an all-reduce, an async one and a message on SLOW."""
    return distlab.launch(messages_on_a_slow_network, 2)


def test_injected_network_makes_a_built_in_all_reduce_take_its_ring_time(injected):
    ring = SLOW.all_reduce_delay(4 * N, 2)
    for *_, seconds, _ in injected:
        assert seconds["all_reduce"] >= ring, (seconds, ring)


def test_injected_network_leaves_results_exact(injected):
    for _, _, x, expected, off, y, _, _ in injected:
        assert torch.equal(x, expected) and torch.equal(off, expected)
        assert torch.equal(y, torch.full((N,), 2.0))


def test_injected_network_leaves_the_bytes_counted_unchanged(injected):
    ring = alpha_beta.ring_all_reduce_bytes(4 * N, 2)
    for rank, (*_, ops) in enumerate(injected):
        assert ops["all_reduce"]["calls"] == 2
        assert ops["all_reduce"]["bytes_sent"] == ops["all_reduce"]["bytes_recv"] == 2 * ring
        assert ops["send" if rank == 0 else "recv"]["calls"] == 1
        assert ops.get("send", {}).get("bytes_sent", 0) == (4 * N if rank == 0 else 0)


def test_injected_async_all_reduce_pays_at_wait_only_what_computation_did_not_hide(injected):
    ring = SLOW.all_reduce_delay(4 * N, 2)
    for *_, seconds, _ in injected:
        assert seconds["async"] >= ring, (seconds, ring)
        assert 0 < seconds["async_wait_slept"] <= ring - OVERLAP, (seconds, ring)


def test_injected_send_takes_alpha_plus_n_beta_at_both_ends(injected):
    one = SLOW.delay(4 * N, 0, 1)
    for *_, seconds, _ in injected:
        # the receiver waits for it too (less the ranks' skew leaving the barrier)
        assert seconds["p2p"] >= 0.8 * one, (seconds, one)


def test_network_is_off_by_default_and_after_the_block(injected):
    ring = SLOW.all_reduce_delay(4 * N, 2)
    for off_at_start, off_after, *_, seconds, _ in injected:
        assert off_at_start and off_after
        assert seconds["off"] < ring / 3, (seconds, ring)


def test_launch_with_a_network_turns_it_on_in_every_rank():
    def knob():
        return netsim.everywhere()
    assert distlab.launch(knob, 2, network=SLOW) == [SLOW, SLOW]


def test_inject_network_refuses_what_is_not_a_network():
    with pytest.raises(ValueError, match="network"):
        with comm.inject_network(1e9):
            pass
    with pytest.raises(ValueError, match="network"):
        distlab.launch(print, 2, network="1 Gbit/s")
