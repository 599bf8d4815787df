"""The α-β cost model, executable: every communication cost formula of the course.

A message of n bytes between two ranks takes ``alpha + n·beta`` seconds: alpha is the
latency (the start-up cost of any message), beta the time per byte (one over the link's
bandwidth). Thakur, Rabenseifner and Gropp ("Optimization of Collective Communication
Operations in MPICH", IJHPCA 2005, sections 2 and 4) give every collective algorithm on p
ranks as

    T(n, p) = a(p)·alpha + b(n, p)·beta

with a the messages on the critical path (sent one after another) and b the bytes on the
busiest link. Each function below returns that pair as a :class:`Cost`; ``cost.time(alpha,
beta)`` is the time. The ``*_bytes`` functions give the **model bytes** per rank: what a
rank sends (and receives) in the bandwidth-optimal algorithm, as :mod:`distlab.comm` books
the built-in collectives. Every docstring's cost in ``distlab`` is one of these functions.

======================================  ==================  ==============================
function                                a (messages)        b (bytes on the busiest link)
======================================  ==================  ==============================
:func:`send` (point to point)           1                   n
:func:`ring_reduce_scatter`             p-1                 (p-1)/p·n
:func:`ring_all_gather`                 p-1                 (p-1)/p·n   (n: the whole output)
:func:`ring_all_reduce`                 2(p-1)              2(p-1)/p·n
:func:`recursive_doubling_all_reduce`   lg p                lg p·n       (p a power of two)
                                        floor(lg p)+2       (floor(lg p)+2)·n   (otherwise)
:func:`naive_all_reduce`                2(p-1)              2(p-1)·n     (parameter server)
:func:`broadcast` (binomial tree)       ceil(lg p)          ceil(lg p)·n
:func:`all_to_all` (pairwise)           p-1                 (p-1)/p·n   (n: one rank's input)
:func:`barrier` (dissemination)         ceil(lg p)          0
======================================  ==================  ==============================

Reduction arithmetic (the paper's gamma term) grows with n like b in every algorithm here;
a fit of alpha and beta per algorithm (:mod:`distlab.communication.cost_model`) absorbs it.

One term the paper does not need, because its ranks each have a processor: on one machine
with fewer cores than ranks, every message also waits for its receiver to get a core.
:func:`oversubscription` measures how crowded the cores are, and
:func:`oversubscribed_alpha` turns it into a latency that grows with it,
``alpha + gamma·max(0, p/c - 1)`` for p ranks on c cores (:func:`machine_cores`), with
gamma fitted like alpha and beta (:func:`distlab.communication.cost_model.fit`;
:func:`~distlab.communication.cost_model.errors_by_crowding` gives the fit's median error
for p <= c and for p > c). The bytes pay too: every byte is copied and added by a rank's
CPU, and p/c ranks share each core, so :func:`oversubscribed_beta` gives
``beta + delta·max(0, p/c - 1)`` (on a 2-core machine a ring's bus bandwidth at 16 MiB
falls from about 0.9 GB/s at 2 ranks to 0.5 at 4 and 0.3 at 8).
This module imports nothing from distlab, so the ledger in :mod:`distlab.comm` can use it.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple


class Cost(NamedTuple):
    """``a`` messages and ``b`` bytes: the time is ``a·alpha + b·beta``."""
    messages: float
    """Latency terms a: messages on the critical path, one after another."""
    nbytes: float
    """Bytes b on the busiest link, each costing beta."""

    def time(self, alpha: float, beta: float) -> float:
        """Seconds for latency ``alpha`` (s per message) and ``beta`` (s per byte), both >= 0."""
        alpha, beta = _alpha_beta("Cost.time", alpha, beta)
        return self.messages * alpha + self.nbytes * beta


# -- point to point and the collectives, as (messages, bytes) --------------------------

def send(nbytes: float) -> Cost:
    """One point-to-point message of ``nbytes``: ``alpha + n·beta``."""
    return Cost(1, _bytes("send", nbytes))


def ring_reduce_scatter(nbytes: float, world_size: int) -> Cost:
    """Ring reduce-scatter of ``nbytes`` (the whole input): ``(p-1)·alpha + (p-1)/p·n·beta``.

    p-1 steps, each passing one chunk of n/p bytes to the right neighbour (Patarasuk and
    Yuan 2009; Thakur et al. 2005, section 4.5).
    """
    n, p = _bytes("ring_reduce_scatter", nbytes), _ranks("ring_reduce_scatter", world_size)
    return Cost(p - 1, (p - 1) * n / p)


def ring_all_gather(nbytes: float, world_size: int) -> Cost:
    """Ring all-gather into ``nbytes`` (the whole output): ``(p-1)·alpha + (p-1)/p·n·beta``.

    p-1 steps, each forwarding one finished chunk (Thakur et al. 2005, section 4.1).
    """
    n, p = _bytes("ring_all_gather", nbytes), _ranks("ring_all_gather", world_size)
    return Cost(p - 1, (p - 1) * n / p)


def ring_all_reduce(nbytes: float, world_size: int) -> Cost:
    """Ring all-reduce: reduce-scatter then all-gather, ``2(p-1)·alpha + 2(p-1)/p·n·beta``.

    Bandwidth-optimal (Patarasuk and Yuan 2009): no all-reduce moves fewer bytes per rank.
    The built-in ``torch.distributed.all_reduce`` is booked as this one.
    """
    n, p = _bytes("ring_all_reduce", nbytes), _ranks("ring_all_reduce", world_size)
    return Cost(2 * (p - 1), 2 * (p - 1) * n / p)


def recursive_doubling_all_reduce(nbytes: float, world_size: int) -> Cost:
    """Recursive doubling: lg p rounds of pairwise exchange of all n bytes (Thakur et al.
    2005, section 4.4): ``lg p·(alpha + n·beta)`` for p a power of two.

    Otherwise the first 2(p - p') ranks (p' the largest power of two below p) fold into
    pairs first and unfold after (Rabenseifner 2004): ``(floor(lg p) + 2)·(alpha + n·beta)``.
    Latency-optimal.
    """
    where = "recursive_doubling_all_reduce"
    n, p = _bytes(where, nbytes), _ranks(where, world_size)
    if p == 1:
        return Cost(0, 0.0)
    rounds = p.bit_length() - 1 if p & (p - 1) == 0 else p.bit_length() + 1
    return Cost(rounds, rounds * n)


def naive_all_reduce(nbytes: float, world_size: int) -> Cost:
    """The parameter-server pattern (Li et al., OSDI 2014): every rank sends to a root, which
    adds and sends the sum back, ``2(p-1)·alpha + 2(p-1)·n·beta``.

    The root's one link takes the p-1 messages in and the p-1 out one after another.
    """
    n, p = _bytes("naive_all_reduce", nbytes), _ranks("naive_all_reduce", world_size)
    return Cost(2 * (p - 1), 2 * (p - 1) * n)


def broadcast(nbytes: float, world_size: int) -> Cost:
    """Binomial-tree broadcast (Thakur et al. 2005, section 4.3): ``ceil(lg p)`` rounds, in
    each every rank that has the n bytes sends them on, ``ceil(lg p)·(alpha + n·beta)``."""
    n, p = _bytes("broadcast", nbytes), _ranks("broadcast", world_size)
    rounds = (p - 1).bit_length()                             # ceil(lg p), 0 for p = 1
    return Cost(rounds, rounds * n)


def all_to_all(nbytes: float, world_size: int) -> Cost:
    """Pairwise-exchange all-to-all (Thakur et al. 2005, section 4.6): every rank sends n/p of
    its ``nbytes`` to each of the p-1 others in turn, ``(p-1)·alpha + (p-1)/p·n·beta``."""
    n, p = _bytes("all_to_all", nbytes), _ranks("all_to_all", world_size)
    return Cost(p - 1, (p - 1) * n / p)


def barrier(world_size: int) -> Cost:
    """Dissemination barrier (Hensgen, Finkel and Manber 1988): ``ceil(lg p)`` rounds of empty
    messages, ``ceil(lg p)·alpha``."""
    return Cost((_ranks("barrier", world_size) - 1).bit_length(), 0.0)


COSTS = {"ring": ring_all_reduce, "recursive_doubling": recursive_doubling_all_reduce,
         "naive": naive_all_reduce, "gloo": ring_all_reduce,
         "reduce_scatter": ring_reduce_scatter, "all_gather": ring_all_gather}
"""The all-reduce algorithms of :mod:`distlab.communication.collectives` by name ("gloo", the
built-in, booked as a ring), and the ring's two halves."""


# -- an oversubscribed machine: more ranks than cores ---------------------------------

def oversubscription(world_size: int, cores: int) -> float:
    """How many ranks wait for each core, beyond the one it runs: ``max(0, p/c - 1)``.

    0 while every rank has a core of its own. Each message wakes its receiver (on gloo an
    event-loop thread, then the thread waiting for the data), and in every step of a
    collective all p ranks want a core at once: with p > c each message waits, on average,
    for the work of ``p/c - 1`` other ranks on its core before its receiver runs.
    """
    p = _ranks("oversubscription", world_size)
    c = _ranks_as("oversubscription", "cores", cores)
    return max(0.0, p / c - 1.0)


def oversubscribed_alpha(alpha: float, gamma: float, world_size: int, cores: int) -> float:
    """The latency of one message when ``world_size`` ranks share ``cores`` cores:
    ``alpha + gamma·oversubscription(p, c)``, gamma in seconds per message per waiting rank.

    ``Cost.time(oversubscribed_alpha(alpha, gamma, p, c), beta)`` is the time of a collective
    on such a machine; with p <= c it is the plain ``a·alpha + b·beta``.
    """
    alpha = _seconds("oversubscribed_alpha", "alpha", alpha, "message")
    gamma = _seconds("oversubscribed_alpha", "gamma", gamma, "message")
    return alpha + gamma * oversubscription(world_size, cores)


def oversubscribed_beta(beta: float, delta: float, world_size: int, cores: int) -> float:
    """The time per byte when ``world_size`` ranks share ``cores`` cores:
    ``beta + delta·oversubscription(p, c)``, delta in seconds per byte per waiting rank.

    On one machine a "link" is a memory copy (and the reduction's add) done by the ranks'
    CPUs: with p/c ranks on a core, each copy waits for the others' on that core.
    """
    beta = _seconds("oversubscribed_beta", "beta", beta, "byte")
    delta = _seconds("oversubscribed_beta", "delta", delta, "byte")
    return beta + delta * oversubscription(world_size, cores)


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or ``taskset``
    narrows): the c of :func:`oversubscription`."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# -- model bytes per rank ---------------------------------------------------------------

def ring_all_reduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-reduce: ``2(p-1)/p·n``, rounded
    down (exact when p divides the number of elements)."""
    n, p = _bytes("ring_all_reduce_bytes", nbytes), _ranks("ring_all_reduce_bytes", world_size)
    return int(2 * (p - 1) * n // p)


def ring_all_gather_bytes(nbytes: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-gather or reduce-scatter of
    ``nbytes`` (the whole tensor): ``(p-1)/p·n``, rounded down."""
    n, p = _bytes("ring_all_gather_bytes", nbytes), _ranks("ring_all_gather_bytes", world_size)
    return int((p - 1) * n // p)


ring_reduce_scatter_bytes = ring_all_gather_bytes


def naive_all_reduce_bytes(nbytes: int, world_size: int, rank: int) -> int:
    """Bytes ``rank`` sends in the naive all-reduce: the root (rank 0) ``(p-1)·n``, every
    other rank ``n``."""
    n, p = _bytes("naive_all_reduce_bytes", nbytes), _ranks("naive_all_reduce_bytes", world_size)
    r = _rank("naive_all_reduce_bytes", rank, p)
    return int((p - 1) * n if r == 0 else n)


def recursive_doubling_all_reduce_bytes(nbytes: int, world_size: int, rank: int) -> int:
    """Bytes ``rank`` sends in recursive doubling: ``lg p·n`` for p a power of two.

    Otherwise, with p' the largest power of two below p: an even rank below 2(p - p') folds
    its n bytes into its odd neighbour and waits (``n``); that neighbour sends
    ``(lg p' + 1)·n`` (the exchanges, then the unfold); the others ``lg p'·n``.
    """
    where = "recursive_doubling_all_reduce_bytes"
    n, p = _bytes(where, nbytes), _ranks(where, world_size)
    r = _rank(where, rank, p)
    rounds = p.bit_length() - 1                               # lg p', p' <= p
    extra = p - (1 << rounds)
    if r < 2 * extra:
        return int(n if r % 2 == 0 else (rounds + 1) * n)
    return int(rounds * n)


def broadcast_bytes(nbytes: int, world_size: int) -> int:
    """Bytes that leave the root of a broadcast and arrive at each other rank (the least any
    algorithm moves): ``n``, or 0 alone."""
    n, p = _bytes("broadcast_bytes", nbytes), _ranks("broadcast_bytes", world_size)
    return int(n) if p > 1 else 0


# -- a ledger's traffic on a network ----------------------------------------------------

def ledger_time(by_op: dict, world_size: int, alpha: float, beta: float) -> float:
    """Seconds the traffic of a :meth:`distlab.comm.Ledger.by_op` takes on a network of
    latency ``alpha`` and ``beta`` seconds per byte.

    Each call pays alpha for every message on its algorithm's critical path (all-reduce
    2(p-1), all-gather and reduce-scatter p-1, broadcast and barrier ceil(lg p), a send 1, a
    receive 0: its sender paid), and every byte sent pays beta.
    """
    p = _ranks("ledger_time", world_size)
    alpha, beta = _alpha_beta("ledger_time", alpha, beta)
    messages = {"all_reduce": ring_all_reduce(0, p).messages,
                "all_gather": ring_all_gather(0, p).messages,
                "reduce_scatter": ring_reduce_scatter(0, p).messages,
                "broadcast": broadcast(0, p).messages, "barrier": barrier(p).messages,
                "send": 1, "recv": 0}
    return sum(s["calls"] * messages.get(op, 1) * alpha + s["bytes_sent"] * beta
               for op, s in by_op.items())


# -- argument checks: refuse bad numbers by name, value and allowed range ---------------

def _is_real(v) -> bool:
    # numbers.Real takes numpy scalars too (a DataFrame's column yields them); bools are not
    # numbers here.
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check(where: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        if isinstance(value, numbers.Number) and hasattr(value, "item"):
            value = value.item()                              # np.int64(-5) reads as -5
        raise ValueError(f"alpha_beta.{where}: {name}={value!r} is out of range; "
                         f"allowed {allowed}")


def _bytes(where: str, nbytes) -> float:
    _check(where, "nbytes", nbytes, _is_real(nbytes) and nbytes >= 0, "a number of bytes >= 0")
    return nbytes


def _ranks(where: str, world_size) -> int:
    return _ranks_as(where, "world_size", world_size)


def _ranks_as(where: str, name: str, value) -> int:
    _check(where, name, value, isinstance(value, numbers.Integral)
           and not isinstance(value, bool) and value >= 1, "an int >= 1")
    return int(value)


def _alpha_beta(where: str, alpha, beta) -> tuple[float, float]:
    return _seconds(where, "alpha", alpha, "message"), _seconds(where, "beta", beta, "byte")


def _seconds(where: str, name: str, value, per: str) -> float:
    _check(where, name, value, _is_real(value) and value >= 0, f"seconds per {per} >= 0")
    return value


def _rank(where: str, rank, world_size: int) -> int:
    _check(where, "rank", rank, isinstance(rank, numbers.Integral) and not isinstance(rank, bool)
           and 0 <= rank < world_size, f"an int in 0..{world_size - 1}")
    return int(rank)
