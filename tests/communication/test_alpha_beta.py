"""distlab.communication.alpha_beta: the textbook formulas, and the model bytes against the
bytes the algorithms really send on real gloo processes."""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distlab
from distlab import comm
from distlab.communication import alpha_beta as ab
from distlab.communication import collectives as C

pytestmark = pytest.mark.timeout(120)


def test_ring_costs_are_the_textbook_formulas():
    n = 1000
    assert ab.ring_all_reduce(n, 4) == (6, 1500)
    assert ab.ring_reduce_scatter(n, 4) == (3, 750)
    assert ab.ring_all_gather(n, 4) == (3, 750)
    assert ab.all_to_all(n, 4) == (3, 750)
    assert ab.ring_all_reduce(n, 4).time(alpha=1e-5, beta=1e-9) == pytest.approx(6e-5 + 1.5e-6)


def test_recursive_doubling_pays_two_more_rounds_off_a_power_of_two():
    assert ab.recursive_doubling_all_reduce(1000, 8) == (3, 3000)
    assert ab.recursive_doubling_all_reduce(1000, 6) == (4, 4000)     # fold, 2 rounds, unfold
    assert ab.recursive_doubling_all_reduce(1000, 3) == (3, 3000)     # fold, 1 round, unfold


def test_naive_broadcast_barrier_and_send_costs():
    assert ab.naive_all_reduce(1000, 4) == (6, 6000)
    assert ab.broadcast(1000, 4) == (2, 2000) and ab.broadcast(1000, 5) == (3, 3000)
    assert ab.barrier(8) == (3, 0)
    assert ab.send(1000) == (1, 1000)


def test_one_rank_costs_nothing():
    for name, cost in ab.COSTS.items():
        assert cost(1000, 1) == (0, 0), name
    assert ab.broadcast(1000, 1) == (0, 0) and ab.barrier(1) == (0, 0)
    assert ab.ring_all_reduce_bytes(1000, 1) == 0 and ab.broadcast_bytes(1000, 1) == 0


def test_oversubscription_counts_the_ranks_waiting_for_each_core():
    assert ab.oversubscription(2, 2) == 0.0 and ab.oversubscription(1, 16) == 0.0
    assert ab.oversubscription(4, 2) == 1.0 and ab.oversubscription(8, 2) == 3.0
    assert ab.oversubscription(3, 2) == pytest.approx(0.5)


def test_oversubscribed_alpha_adds_gamma_per_waiting_rank_only_past_the_cores():
    assert ab.oversubscribed_alpha(1e-5, 1e-3, 2, 2) == 1e-5
    assert ab.oversubscribed_alpha(1e-5, 1e-3, 8, 2) == pytest.approx(1e-5 + 3e-3)
    ring = ab.ring_all_reduce(0, 8)
    assert ring.time(ab.oversubscribed_alpha(1e-5, 1e-3, 8, 2), 0.0) == pytest.approx(
        14 * (1e-5 + 3e-3))


def test_oversubscribed_beta_adds_delta_per_waiting_rank_only_past_the_cores():
    assert ab.oversubscribed_beta(1e-9, 5e-10, 2, 2) == 1e-9
    assert ab.oversubscribed_beta(1e-9, 5e-10, 8, 2) == pytest.approx(2.5e-9)
    with pytest.raises(ValueError, match=r"delta=-1.0 is out of range"):
        ab.oversubscribed_beta(1e-9, -1.0, 4, 2)


def test_machine_cores_is_this_process_affinity():
    assert ab.machine_cores() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("call, match", [
    (lambda: ab.oversubscription(4, 0), r"oversubscription: cores=0 is out of range; allowed an int >= 1"),
    (lambda: ab.oversubscription(4, True), r"oversubscription: cores=True is out of range"),
    (lambda: ab.oversubscription(0, 2), r"oversubscription: world_size=0 is out of range"),
    (lambda: ab.oversubscribed_alpha(1e-5, -1.0, 4, 2), r"gamma=-1.0 is out of range"),
    (lambda: ab.oversubscribed_alpha(math.inf, 0.0, 4, 2), r"alpha=inf is out of range"),
])
def test_oversubscription_refuses_bad_numbers(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_numpy_scalars_from_a_data_frame_are_accepted():
    assert ab.ring_all_reduce(np.int64(1000), np.int64(4)) == (6, 1500)
    assert ab.send(np.float64(10.0)).time(np.float64(1.0), 0.5) == 6.0


@pytest.mark.parametrize("call, match", [
    (lambda: ab.ring_all_reduce(1000, 0), r"ring_all_reduce: world_size=0 is out of range"),
    (lambda: ab.ring_all_reduce(-5, 4), r"ring_all_reduce: nbytes=-5 is out of range"),
    (lambda: ab.ring_all_reduce(np.int64(-5), 4), r"ring_all_reduce: nbytes=-5 is out of range"),
    (lambda: ab.ring_all_reduce(1000, True), r"world_size=True is out of range"),
    (lambda: ab.ring_all_reduce(1000, 2.5), r"world_size=2.5 is out of range"),
    (lambda: ab.send(math.nan), r"send: nbytes=nan is out of range"),
    (lambda: ab.send("8"), r"send: nbytes='8' is out of range"),
    (lambda: ab.send(8).time(-1.0, 0.0), r"alpha=-1.0 is out of range"),
    (lambda: ab.send(8).time(0.0, math.inf), r"beta=inf is out of range"),
    (lambda: ab.naive_all_reduce_bytes(8, 4, 4), r"rank=4 is out of range; allowed an int in 0..3"),
    (lambda: ab.ledger_time({}, 0, 0.0, 0.0), r"ledger_time: world_size=0"),
])
def test_bad_numbers_are_refused_by_name_value_and_range(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ledger_time_charges_each_call_its_messages_and_each_byte_beta():
    by_op = {"all_reduce": dict(calls=2, bytes_sent=300), "send": dict(calls=1, bytes_sent=100),
             "recv": dict(calls=1, bytes_sent=0), "barrier": dict(calls=1, bytes_sent=0)}
    # p = 4: all-reduce 6 messages a call, a send 1, a receive 0, a barrier 2.
    want = (2 * 6 + 1 + 0 + 2) * 1e-3 + 400 * 1e-6
    assert ab.ledger_time(by_op, 4, alpha=1e-3, beta=1e-6) == pytest.approx(want)


NUMEL = 12 * 64         # divides by 2, 3 and 4: the model bytes are exact


def bytes_sent_by_each_algorithm():
    rank, p = dist.get_rank(), dist.get_world_size()
    sent = {}
    for name in ("ring", "recursive_doubling", "naive"):
        comm.ledger().reset()
        C.ALL_REDUCES[name](torch.ones(NUMEL), check=False)
        sent[name] = comm.ledger().by_op().get("send", {}).get("bytes_sent", 0)
    for name, fn in (("reduce_scatter", C.ring_reduce_scatter), ("all_gather", C.ring_all_gather)):
        comm.ledger().reset()
        fn(torch.ones(NUMEL), check=False)
        sent[name] = comm.ledger().by_op().get("send", {}).get("bytes_sent", 0)
    return rank, p, sent


@pytest.mark.parametrize("p", [2, 3, 4])
def test_model_bytes_equal_the_bytes_the_algorithms_send(p):
    n = 4 * NUMEL
    for rank, world_size, sent in distlab.launch(bytes_sent_by_each_algorithm, p):
        assert sent == {
            "ring": ab.ring_all_reduce_bytes(n, p),
            "recursive_doubling": ab.recursive_doubling_all_reduce_bytes(n, p, rank),
            "naive": ab.naive_all_reduce_bytes(n, p, rank),
            "reduce_scatter": ab.ring_reduce_scatter_bytes(n, p),
            "all_gather": ab.ring_all_gather_bytes(n, p),
        }, (rank, p)
        # The busiest link of each algorithm carries the Cost's bytes.
        assert ab.ring_all_reduce(n, p).nbytes == sent["ring"]
