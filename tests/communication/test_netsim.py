"""distlab.communication.netsim: the injected network's delays, validation, and its effect on real runs."""
import math
import time

import pytest
import torch
import torch.distributed as dist

import distlab
from distlab import comm
from distlab.communication import collectives as C
from distlab.communication import netsim
from distlab.communication.netsim import Network

pytestmark = pytest.mark.timeout(120)


SLOW = Network(latency=1e-4, bandwidth=1e9, slow_rank=2, slow_factor=5)


def test_delay_is_latency_plus_bytes_over_bandwidth():
    assert SLOW.delay(1_000_000, 0, 1) == pytest.approx(1e-4 + 1e-3)
    assert (SLOW.alpha, SLOW.beta) == (1e-4, 1e-9)


def test_messages_to_or_from_the_slow_rank_are_slower():
    assert SLOW.delay(1_000_000, 0, 2) == pytest.approx(5 * (1e-4 + 1e-3))
    assert SLOW.delay(1_000_000, 2, 3) == pytest.approx(5 * (1e-4 + 1e-3))


def test_an_all_reduce_waits_for_the_slow_rank_only_when_it_takes_part():
    assert SLOW.all_reduce_delay(4000, 4) == pytest.approx(5 * (6e-4 + 6e-6))
    assert SLOW.all_reduce_delay(4000, 2) == pytest.approx(2e-4 + 4e-6)   # rank 2 not in it


def test_describe_says_injected_and_names_the_slow_link():
    assert "injected" in SLOW.describe() and "rank 2's link 5× slower" in SLOW.describe()


def test_a_default_network_injects_nothing():
    assert not Network().injects and Network().delay(10**9, 0, 1) == 0
    assert Network(latency=1e-6).injects


def test_inject_sleeps():
    net = Network(latency=0.02)
    t0 = time.perf_counter()
    assert net.inject(0, 0, 1) == pytest.approx(0.02)
    assert net.inject_incoming([0, 0, 0], [1, 2, 3], 0) == pytest.approx(0.04)
    assert time.perf_counter() - t0 >= 0.06


@pytest.mark.parametrize("kwargs, match", [
    (dict(latency=-1), "Network.latency=-1 is out of range"),
    (dict(bandwidth=0), "Network.bandwidth=0 is out of range"),
    (dict(slow_rank=-1), "Network.slow_rank=-1"),
    (dict(slow_factor=0.5), "Network.slow_factor=0.5 is out of range"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Network(**kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda net: net.delay(-5, 0, 1), "nbytes=-5 is out of range"),
    (lambda net: net.delay(8, -1, 1), "Network.delay: src=-1 is out of range"),
    (lambda net: net.delay(8, 0, 1.5), "Network.delay: dst=1.5 is out of range"),
    (lambda net: net.all_reduce_delay(8, 0), "world_size=0 is out of range"),
    (lambda net: net.all_reduce_delay(-8, 4), "nbytes=-8 is out of range"),
    (lambda net: net.all_reduce_delay(8, 4, "tree"), "algorithm='tree' is unknown"),
])
def test_bad_message_sizes_and_ranks_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call(Network(latency=1e-4, bandwidth=1e9))


def test_all_reduce_delay_is_the_alpha_beta_cost_of_each_algorithm():
    from distlab.communication import alpha_beta
    net = Network(latency=1e-4, bandwidth=1e9)
    for name, cost in alpha_beta.COSTS.items():
        assert net.all_reduce_delay(4000, 6, name) == pytest.approx(cost(4000, 6).time(1e-4, 1e-9))


def timed_with_network(net):
    rank = dist.get_rank()
    out = {}
    for name in ("ring", "naive"):
        x = torch.full((64,), float(rank + 1))
        C.ALL_REDUCES[name](x.clone(), check=False)   # warm up the connections
        dist.barrier()
        t0 = time.perf_counter()
        C.ALL_REDUCES[name](x, network=net)
        out[name] = (time.perf_counter() - t0, x)
    return out


def test_injected_network_slows_the_clock_not_the_result():
    p, lat = 4, 5e-3
    net = Network(latency=lat, slow_rank=3, slow_factor=2)
    # naive: rank 0's link takes the p-1 gathered messages one after another, then sends the
    # sum to ranks 1, 2, ... in turn, so rank r has it after the gather and r broadcasts.
    gather = sum(net.delay(256, src, 0) for src in range(1, p))
    naive_min = [gather + sum(net.delay(256, 0, d) for d in range(1, r + 1)) for r in range(p)]
    naive_min[0] = gather + sum(net.delay(256, 0, d) for d in range(1, p))
    for rank, out in enumerate(distlab.launch(timed_with_network, p, net)):
        for name, (seconds, x) in out.items():
            torch.testing.assert_close(x, torch.full((64,), 10.0))
            # ring: 2(p-1) steps in a row, each waiting on a message from or to rank 3's
            # slow neighbourhood at some point.
            least = 2 * (p - 1) * lat if name == "ring" else naive_min[rank]
            assert seconds >= 0.9 * least, (name, rank, seconds, least)
        assert out["naive"][0] < 2 * (p - 1) * 2 * lat + 0.5
    assert math.isinf(net.bandwidth)


def test_explicit_injection_sleeps_nothing_while_the_network_is_on_everywhere():
    net = Network(latency=0.5)
    with comm.inject_network(net):
        t0 = time.perf_counter()
        assert net.inject(1000, src=0, dst=1) == 0.0
        assert net.sleep(net.all_reduce_delay(1000, 2)) == 0.0
        assert time.perf_counter() - t0 < 0.25
    assert net.sleep(1e-3) == 1e-3                       # and sleeps again after the block


def test_a_network_that_injects_nothing_turns_the_knob_off():
    with comm.inject_network(Network()):
        assert netsim.everywhere() is None


def explicit_injectors_on_the_knob(net):
    slept = []
    real_sleep = time.sleep
    time.sleep = lambda seconds: (slept.append(seconds), real_sleep(seconds))[1]   # count
    out = {}
    x = torch.full((64,), float(dist.get_rank() + 1))
    C.ALL_REDUCES["ring"](x.clone(), check=False)      # warm up the connections
    with comm.inject_network(net):
        C.ALL_REDUCES["ring"](x, check=False, network=net)   # from scratch, injects itself
        out["ring"] = (sum(slept), x)
        slept.clear()
        net.sleep(net.all_reduce_delay(256, 2))        # as dpsgd does around a built-in
        comm.all_reduce(y := torch.ones(64))
        out["built_in"] = (sum(slept), y)
    time.sleep = real_sleep
    return out


def test_explicit_injectors_do_not_pay_twice_while_the_network_is_on_everywhere():
    net = Network(latency=0.01)
    once = net.all_reduce_delay(256, 2)                # 2(p-1) messages of alpha: 0.02 s
    for out in distlab.launch(explicit_injectors_on_the_knob, 2, net):
        for name, (seconds, x) in out.items():
            torch.testing.assert_close(x, torch.full((64,), 3.0 if name == "ring" else 2.0))
            assert seconds == pytest.approx(once), (name, seconds, once)   # slept once
