"""A simulated network on one machine: injected latency, bandwidth and a slow link.

On a laptop or on Binder every rank talks to every other through the loopback interface,
so a message of n bytes costs microseconds and all algorithms look alike. A
:class:`Network` *injects* the delays of a real cluster: before each message leaves a rank,
the sender sleeps ``latency + n / bandwidth`` seconds (longer still on a link that touches
the slow rank). The real message is then sent as usual, so results stay exact; only the
clock sees a slower network. Everything measured with a Network is labelled **injected**.

The model is the alpha-beta model with one port per rank (Thakur, Rabenseifner and Gropp
2005; :mod:`distlab.communication.alpha_beta`): alpha = ``latency``, beta = ``1 / bandwidth``;
a rank sends one message at a time and receives one message at a time. Senders serialise their own messages by sleeping one after
the other; a receiver that takes several messages at once (the root of a gather) calls
:meth:`Network.inject_incoming` to pay for its single incoming link.

Use it in any lab (it knows nothing about collectives):

    net = Network(latency=100e-6, bandwidth=1.25e9, slow_rank=3, slow_factor=4)
    net.inject(nbytes, src=rank, dst=peer)          # before a point-to-point send
    net.sleep(net.all_reduce_delay(nbytes, world_size))   # around a built-in all-reduce

or on every message at once: inside ``with distlab.comm.inject_network(net):`` every call
of :mod:`distlab.comm` (the built-in collectives too) pays its alpha-beta time on this
network (:func:`everywhere`). Then the explicit calls above sleep nothing, because the
message they precede already pays in :mod:`distlab.comm`; only :meth:`Network.inject_incoming`
still sleeps (the ledger charges senders, never a receiver's one incoming link).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication import alpha_beta


@dataclass(frozen=True)
class Network:
    """An injected network: every message pays ``latency + nbytes / bandwidth`` seconds."""
    latency: float = 0.0
    """Injected seconds per message (alpha), 0 to 1. Ethernet in a rack: 10e-6 to 100e-6."""
    bandwidth: float = math.inf
    """Injected bytes per second per link (1 / beta), > 0; ``inf`` injects no transfer time.
    10 Gbit/s Ethernet is 1.25e9."""
    slow_rank: int | None = None
    """A rank whose link is slow (a straggler), or None."""
    slow_factor: float = 1.0
    """How many times slower every message to or from ``slow_rank`` is, 1 to 1000."""

    def __post_init__(self):
        require(self, "latency", is_number(self.latency) and 0 <= self.latency <= 1,
                "0 to 1 seconds")
        require(self, "bandwidth", self.bandwidth == math.inf
                or (is_number(self.bandwidth) and self.bandwidth > 0),
                "> 0 bytes per second (math.inf for none)")
        require(self, "slow_rank",
                self.slow_rank is None or (is_int(self.slow_rank) and self.slow_rank >= 0),
                "None or a rank >= 0")
        require(self, "slow_factor", is_number(self.slow_factor) and 1 <= self.slow_factor <= 1000,
                "1 to 1000")

    @property
    def alpha(self) -> float:
        """Seconds per message: the latency."""
        return self.latency

    @property
    def beta(self) -> float:
        """Seconds per byte: one over the bandwidth."""
        return 1.0 / self.bandwidth

    def delay(self, nbytes: int, src: int, dst: int) -> float:
        """Injected seconds for one message of ``nbytes`` from rank ``src`` to rank ``dst``:
        :func:`distlab.communication.alpha_beta.send`, ``alpha + n·beta``."""
        for name, rank in (("src", src), ("dst", dst)):
            if not (is_int(rank) and rank >= 0):
                raise ValueError(f"Network.delay: {name}={rank!r} is out of range; "
                                 "allowed a rank >= 0")
        seconds = alpha_beta.send(nbytes).time(self.alpha, self.beta)
        if self.slow_rank is not None and self.slow_rank in (src, dst):
            seconds *= self.slow_factor
        return seconds

    def inject(self, nbytes: int, src: int, dst: int) -> float:
        """Sleep for the delay of one message (call it before sending); return the seconds.

        Nothing while a network is injected :func:`everywhere`: the send pays there."""
        return self.sleep(self.delay(nbytes, src, dst))

    def inject_incoming(self, nbytes: list[int], srcs: list[int], dst: int) -> float:
        """Sleep for a receiver's single link taking several messages at once.

        The senders have already slept their own delays, in parallel; one incoming link
        takes the messages one after another, so the receiver pays the rest: the sum of the
        delays minus the longest. Returns the seconds slept.
        """
        net = _everywhere or self   # one network for every message while one is on
        delays = [net.delay(n, s, dst) for n, s in zip(nbytes, srcs)]
        return _sleep(sum(delays) - max(delays, default=0.0))

    def all_reduce_delay(self, nbytes: int, world_size: int, algorithm: str = "ring") -> float:
        """Injected seconds for one all-reduce of ``nbytes`` on ``world_size`` ranks.

        The alpha-beta cost of ``algorithm`` (one of
        :data:`distlab.communication.alpha_beta.COSTS`) with this network's alpha and beta,
        times ``slow_factor`` when the slow rank takes part (a ring or a tree waits for its
        slowest link). For labs that use the built-in all-reduce and want it to feel like a
        cluster's.
        """
        if algorithm not in alpha_beta.COSTS:
            raise ValueError(f"Network.all_reduce_delay: algorithm={algorithm!r} is unknown; "
                             f"allowed {list(alpha_beta.COSTS)}")
        return self.cost_delay(alpha_beta.COSTS[algorithm](nbytes, world_size), world_size)

    def cost_delay(self, cost: alpha_beta.Cost, world_size: int) -> float:
        """Injected seconds for a collective of alpha-beta ``cost`` on ``world_size`` ranks:
        ``cost.time(alpha, beta)``, times ``slow_factor`` when the slow rank takes part."""
        seconds = cost.time(self.alpha, self.beta)
        if self.slow_rank is not None and self.slow_rank < world_size:
            seconds *= self.slow_factor
        return seconds

    @property
    def injects(self) -> bool:
        """False for a Network that adds nothing (zero latency, infinite bandwidth)."""
        return self.latency > 0 or math.isfinite(self.bandwidth)

    @staticmethod
    def sleep(seconds: float) -> float:
        """Sleep ``seconds`` (nothing for zero or less); return them.

        For the explicit calls around a message: while a network is injected
        :func:`everywhere` it sleeps nothing and returns 0, since the message pays there."""
        return 0.0 if _everywhere is not None else _sleep(seconds)

    def describe(self) -> str:
        """One line for plot titles, labelled "injected"."""
        bw = "∞" if math.isinf(self.bandwidth) else f"{8 * self.bandwidth / 1e9:g} Gbit/s"
        text = f"injected: latency {1e6 * self.latency:g} µs, bandwidth {bw}"
        if self.slow_rank is not None and self.slow_factor != 1:
            text += f", rank {self.slow_rank}'s link {self.slow_factor:g}× slower"
        return text


# -- one network for every message -------------------------------------------------------

_everywhere: Network | None = None   # this process's; one process is one rank


def everywhere() -> Network | None:
    """The network every message of :mod:`distlab.comm` pays in this process, or None.

    Set it with :func:`distlab.comm.inject_network` (a context manager) or, for every rank
    of a launch, ``distlab.launch(..., network=network)`` (:func:`on_network`).
    """
    return _everywhere


def set_everywhere(network: Network | None) -> Network | None:
    """Make every message of this process pay ``network`` (None, or a Network that injects
    nothing: none); return the previous setting."""
    global _everywhere
    require_arg("set_everywhere: network", network,
                network is None or isinstance(network, Network),
                "None or a distlab.communication.netsim.Network")
    previous = _everywhere
    _everywhere = network if network is not None and network.injects else None
    return previous


def on_network(fn, network: Network | None):
    """``fn`` wrapped to run with ``network`` injected :func:`everywhere` (picklable: what
    ``distlab.launch(fn, p, network=network)`` runs on every rank)."""
    require_arg("on_network: fn", fn, callable(fn), "a callable")
    require_arg("on_network: network", network,
                network is None or isinstance(network, Network),
                "None or a distlab.communication.netsim.Network")
    return _OnNetwork(fn, network)


class _OnNetwork:
    """A picklable ``fn`` run under a network injected everywhere (see :func:`on_network`)."""

    def __init__(self, fn, network):
        self.fn, self.network = fn, network

    def __call__(self, *args, **kwargs):
        previous = set_everywhere(self.network)
        try:
            return self.fn(*args, **kwargs)
        finally:
            set_everywhere(previous)


def _sleep(seconds: float) -> float:
    if seconds > 0:
        time.sleep(seconds)
    return max(seconds, 0.0)
