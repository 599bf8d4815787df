"""distlab.communication.netsim: the injected network's delays, validation, and its effect on real runs."""
import math
import time

import pytest
import torch
import torch.distributed as dist

import distlab
from distlab.communication import collectives as C
from distlab.communication.netsim import Network

pytestmark = pytest.mark.timeout(120)


def test_delay_is_latency_plus_bytes_over_bandwidth_and_slow_links_are_slower():
    net = Network(latency=1e-4, bandwidth=1e9, slow_rank=2, slow_factor=5)
    assert net.delay(1_000_000, 0, 1) == pytest.approx(1e-4 + 1e-3)
    assert net.delay(1_000_000, 0, 2) == pytest.approx(5 * (1e-4 + 1e-3))
    assert net.delay(1_000_000, 2, 3) == pytest.approx(5 * (1e-4 + 1e-3))
    assert (net.alpha, net.beta) == (1e-4, 1e-9)
    assert net.all_reduce_delay(4000, 4) == pytest.approx(5 * (6e-4 + 6e-6))
    assert net.all_reduce_delay(4000, 2) == pytest.approx(2e-4 + 4e-6)   # rank 2 not in it
    assert "injected" in net.describe() and "rank 2's link 5× slower" in net.describe()
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
