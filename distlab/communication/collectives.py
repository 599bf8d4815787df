"""Collectives from scratch: all-reduce and friends built from point-to-point messages.

Every function here takes ``(tensor, group=None)`` like ``torch.distributed.all_reduce``,
works in place, and is built only from :func:`distlab.comm.isend` / :func:`~distlab.comm.irecv`
pairs (gloo hangs on ``batch_isend_irecv``), so the ledger counts every byte. They work
for any world size (powers of two or not) and any length (shorter than the world too).

Costs in the alpha-beta model (Thakur, Rabenseifner and Gropp, "Optimization of Collective
Communication Operations in MPICH", IJHPCA 2005): a message of n bytes takes alpha + n·beta;
p ranks; n the tensor's bytes. Each formula is a function of
:mod:`distlab.communication.alpha_beta` of the same name (the bytes: ``..._bytes``).

=====================================  ===============================  ==============================
algorithm                              time                             bytes sent per rank
=====================================  ===============================  ==============================
:func:`naive_all_reduce`               2(p-1)·alpha + 2(p-1)·n·beta     root (p-1)·n, others n
:func:`recursive_doubling_all_reduce`  lg p·alpha + lg p·n·beta         lg p·n   (p a power of two)
:func:`ring_reduce_scatter`            (p-1)·alpha + (p-1)/p·n·beta     (p-1)/p·n
:func:`ring_all_gather`                (p-1)·alpha + (p-1)/p·n·beta     (p-1)/p·n
:func:`ring_all_reduce`                2(p-1)·alpha + 2(p-1)/p·n·beta   2(p-1)/p·n
=====================================  ===============================  ==============================

The ring is bandwidth-optimal (its n·beta term cannot be beaten), recursive doubling is
latency-optimal, and the naive parameter-server pattern is neither: its root's link carries
every byte. :mod:`distlab.communication.cost_model` fits the table to your machine.

Options shared by every function (keyword-only):

* ``check``: compare shape and dtype across ranks with one tiny all-gather
  (``distlab.communication.same_tensor``), so a mismatch is a clear error on every rank
  instead of a wrong answer or a hang; made only when a function meets another shape or
  dtype than the one its group last agreed on (one small collective costs milliseconds on
  a loaded machine), and booked under ``"all_gather"`` in the ledger. (A rank that alone
  changes its shape waits to compare while the others start: after 10 s it says so.)
* ``network``: a :class:`distlab.communication.netsim.Network` whose *injected* latency and
  bandwidth are added to every message (a simulated cluster on one machine).
* ``trace``: a list; when given, one event per message is appended to it (who sent which
  chunk to whom, when) for a timeline figure (lab 01's
  :func:`distlab.course.lab01_collectives.figure_timeline`). Nothing is recorded otherwise.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from distlab import comm
from distlab.communication import alpha_beta
from distlab.communication.same_tensor import check_same_tensor

_clock = time.perf_counter   # CLOCK_MONOTONIC: comparable across processes on one machine


# ----------------------------------------------------------------------------------------
# Plumbing: ranks inside a group, input checks, one exchange step.
# ----------------------------------------------------------------------------------------

def _group_rank_and_size(tensor, group, check, name) -> tuple[int, int]:
    """This rank's index in ``group`` and the group's size, after checking the input."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        members = dist.get_process_group_ranks(group)
        raise ValueError(f"{name}: rank {dist.get_rank()} is not in the group {members}; "
                         "call it only on the group's members")
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: tensor must be contiguous (the result is written into its "
                         "memory); pass tensor.contiguous() and copy back")
    if check:
        check_same_tensor(tensor, group, name)
    return rank, dist.get_world_size(group)


def _exchange(send_buf, dst, recv_buf, src, group, network, me, trace, event):
    """Send ``send_buf`` to ``dst`` while receiving ``recv_buf`` from ``src``; wait for both.

    ``me``, ``dst`` and ``src`` are group ranks; a ``None`` buffer means no message that way.
    """
    t0 = _clock()
    if network is not None and send_buf is not None:
        network.inject(comm.nbytes(send_buf), _global(group, me), _global(group, dst))
    works = []
    if recv_buf is not None:   # post the receive first: the peer's message has a home
        works.append(comm.irecv(recv_buf, _global(group, src), group=group))
    if send_buf is not None:
        works.append(comm.isend(send_buf, _global(group, dst), group=group))
    for w in works:
        w.wait()
    if trace is not None:
        trace.append(dict(event, rank=me, dst=dst, src=src, start=t0, end=_clock(),
                          nbytes=0 if send_buf is None else comm.nbytes(send_buf)))


def _global(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


_spaces: dict[tuple, torch.Tensor] = {}   # (dtype, device) -> receive space, reused


def _receive_space(numel: int, like: torch.Tensor) -> torch.Tensor:
    """``numel`` elements of ``like``'s dtype and device for incoming messages, the same
    memory from call to call (so one rank must not run two of these collectives at once):
    a fresh buffer costs a page fault per 4 KiB page when first written (for the 8 MiB a
    16 MiB ring receives on 2 ranks, 4 ms, a third of the call). It grows, and stays."""
    key = (like.dtype, like.device)
    space = _spaces.get(key)
    if space is None or space.numel() < numel:
        space = _spaces[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return space[:numel]


# ----------------------------------------------------------------------------------------
# The naive all-reduce: gather to a root, add, broadcast back (the parameter server).
# ----------------------------------------------------------------------------------------

def naive_all_reduce(tensor, group=None, *, check=True, network=None, trace=None):
    """Sum ``tensor`` over the group, in place: everyone sends to rank 0, which sends back.

    The parameter-server pattern (Li et al., OSDI 2014), written as the flat (linear) reduce
    and broadcast of Thakur et al. 2005, section 2. Not used for large tensors in practice:
    rank 0's link carries all the traffic, ``(p-1)·n`` in and ``(p-1)·n`` out.

    Cost: :func:`distlab.communication.alpha_beta.naive_all_reduce`,
    ``2(p-1)·alpha + 2(p-1)·n·beta`` (rank 0 handles one message at a time).
    """
    me, p = _group_rank_and_size(tensor, group, check, "naive_all_reduce")
    if p == 1 or tensor.numel() == 0:
        return tensor
    flat = tensor.view(-1)
    if me != 0:
        _exchange(flat, 0, None, None, group, network, me, trace, dict(phase="gather", chunk=me))
        _exchange(None, None, flat, 0, group, network, me, trace, dict(phase="broadcast", chunk=0))
        return tensor
    parts = _receive_space((p - 1) * flat.numel(), flat).view(p - 1, -1)   # (p-1, n)
    t0 = _clock()
    works = [comm.irecv(buf, _global(group, src), group=group)
             for src, buf in enumerate(parts, start=1)]   # every sender at once
    for w in works:
        w.wait()
    if network is not None:   # rank 0's one link takes the p-1 messages one after another
        network.inject_incoming([comm.nbytes(flat)] * (p - 1),
                                [_global(group, s) for s in range(1, p)], _global(group, 0))
    if trace is not None:
        trace.append(dict(phase="gather", chunk=0, rank=0, dst=None, src=-1, start=t0,
                          end=_clock(), nbytes=0))
    for buf in parts:         # add in rank order: the same rounding on every run
        flat.add_(buf)
    for dst in range(1, p):   # one message after another, like a real server's link
        _exchange(flat, dst, None, None, group, network, 0, trace,
                  dict(phase="broadcast", chunk=0))
    return tensor


# ----------------------------------------------------------------------------------------
# Recursive doubling: lg p rounds of pairwise exchange of the whole vector.
# ----------------------------------------------------------------------------------------

def recursive_doubling_all_reduce(tensor, group=None, *, check=True, network=None, trace=None):
    """Sum ``tensor`` over the group, in place, in lg p rounds of pairwise exchanges.

    In round k, rank r swaps its whole partial sum with rank ``r XOR 2^k`` and adds
    (Thakur et al. 2005, section 4.4). When p is not a power of two, the first
    ``2·(p - p')`` ranks (p' the largest power of two below p) first fold pairwise into
    p' ranks, and unfold after (Rabenseifner 2004): two more rounds for those ranks.

    Cost: :func:`distlab.communication.alpha_beta.recursive_doubling_all_reduce`,
    ``lg p·alpha + lg p·n·beta`` for p a power of two, else
    ``(floor(lg p) + 2)·(alpha + n·beta)``. Latency-optimal; good for small tensors.
    """
    me, p = _group_rank_and_size(tensor, group, check, "recursive_doubling_all_reduce")
    if p == 1 or tensor.numel() == 0:
        return tensor
    flat = tensor.view(-1)
    buf = _receive_space(flat.numel(), flat)
    p2 = 1 << (p.bit_length() - 1)     # largest power of two <= p
    extra = p - p2                     # ranks 0 .. 2·extra-1 fold into pairs

    def real(v):                       # rank of virtual rank v among the p2 that remain
        return 2 * v + 1 if v < extra else v + extra

    if me < 2 * extra and me % 2 == 0:          # fold: hand my data to my odd neighbour
        _exchange(flat, me + 1, None, None, group, network, me, trace, dict(phase="fold", chunk=0))
        _exchange(None, None, flat, me + 1, group, network, me, trace, dict(phase="unfold", chunk=0))
        return tensor
    if me < 2 * extra:
        _exchange(None, None, buf, me - 1, group, network, me, trace, dict(phase="fold", chunk=0))
        flat.add_(buf)
    v = me // 2 if me < 2 * extra else me - extra
    mask, round_ = 1, 0
    while mask < p2:
        partner = real(v ^ mask)
        _exchange(flat, partner, buf, partner, group, network, me, trace,
                  dict(phase="exchange", chunk=round_))
        flat.add_(buf)                 # x + y here and y + x there: the same bits on both
        mask, round_ = mask << 1, round_ + 1
    if me < 2 * extra:                 # unfold: give the result back to the even neighbour
        _exchange(flat, me - 1, None, None, group, network, me, trace, dict(phase="unfold", chunk=0))
    return tensor


# ----------------------------------------------------------------------------------------
# The ring: reduce-scatter, then all-gather, one chunk per step around the ring.
# ----------------------------------------------------------------------------------------

def _ring_pass(chunks, sends, recvs, add, group, network, me, p, trace, phase, step0,
               pending=None):
    """p-1 steps around the ring: in step s send ``chunks[sends[s]]`` right, receive left.

    Every receive is posted before the first send (``recvs[s]`` is the buffer of step s, or
    None for an empty chunk; ``pending`` the receives already posted), so a message never
    waits for its receiver to say it is ready: on gloo that handshake would otherwise sit on
    the critical path of every step. With ``add``, the received buffer of step s is added
    into ``chunks[add[s]]``.
    """
    right, left = (me + 1) % p, (me - 1) % p
    if pending is None:
        pending = _post_receives(recvs, group, left)
    sent = []     # a sent chunk is not written again in this pass: wait for the sends last
    for s in range(p - 1):
        t0 = _clock()
        out = chunks[sends[s]]
        if out.numel():                                   # an empty chunk: no message
            if network is not None:
                network.inject(comm.nbytes(out), _global(group, me), _global(group, right))
            sent.append(comm.isend(out, _global(group, right), group=group))
        if pending[s] is not None:
            pending[s].wait()
            if add is not None:
                chunks[add[s]].add_(recvs[s])
        if trace is not None:
            trace.append(dict(phase=phase, step=step0 + s, chunk=sends[s], rank=me, dst=right,
                              src=left, start=t0, end=_clock(), nbytes=comm.nbytes(out)))
    for w in sent:
        w.wait()


def _post_receives(recvs, group, left):
    return [None if b is None else comm.irecv(b, _global(group, left), group=group)
            for b in recvs]


def ring_reduce_scatter(tensor, group=None, *, check=True, network=None, trace=None):
    """Sum ``tensor`` over the group so that rank r ends with chunk r of the sum, in place.

    The tensor is split into p chunks (``torch.tensor_split``: the first ``n mod p`` chunks
    are one element longer; some are empty when n < p). In step s = 0 .. p-2, rank r sends
    chunk ``(r-s-1) mod p`` to rank r+1 and adds the chunk ``(r-s-2) mod p`` arriving from
    rank r-1 (Patarasuk and Yuan 2009; Thakur et al. 2005, section 4.5). After p-1 steps
    chunk r on rank r holds the full sum; the other chunks hold partial sums.

    Returns chunk r (a view into ``tensor``). Uses (p-1)/p·n bytes of receive buffers.
    Cost: :func:`distlab.communication.alpha_beta.ring_reduce_scatter`,
    ``(p-1)·alpha + (p-1)/p·n·beta``.
    """
    me, p = _group_rank_and_size(tensor, group, check, "ring_reduce_scatter")
    chunks = tensor.view(-1).tensor_split(p)
    if p == 1 or tensor.numel() == 0:
        return chunks[me]
    _ring_pass(chunks, *_reduce_scatter_steps(chunks, me, p), group, network, me, p, trace,
               "reduce-scatter", 0)
    return chunks[me]


def _reduce_scatter_steps(chunks, me, p):
    """``(sends, receive buffers, chunks to add into)`` of the reduce-scatter's p-1 steps."""
    into = [(me - s - 2) % p for s in range(p - 1)]
    sizes = [chunks[c].numel() for c in into]
    space = _receive_space(sum(sizes), chunks[0]).split(sizes)
    bufs = [b if n else None for b, n in zip(space, sizes)]
    return [(me - s - 1) % p for s in range(p - 1)], bufs, into


def ring_all_gather(tensor, group=None, *, check=True, network=None, trace=None):
    """Fill every chunk of ``tensor`` from the rank that owns it, in place.

    On entry rank r's chunk r (``torch.tensor_split`` into p chunks) is valid; the rest is
    overwritten. In step s = 0 .. p-2, rank r forwards chunk ``(r-s) mod p`` to rank r+1 and
    receives chunk ``(r-s-1) mod p`` from rank r-1 (Thakur et al. 2005, section 4.1), straight
    into its place. ``all_gather_into_tensor`` with the input already in place.

    Cost: :func:`distlab.communication.alpha_beta.ring_all_gather`,
    ``(p-1)·alpha + (p-1)/p·n·beta``.
    """
    me, p = _group_rank_and_size(tensor, group, check, "ring_all_gather")
    if p == 1 or tensor.numel() == 0:
        return tensor
    chunks = tensor.view(-1).tensor_split(p)
    _ring_pass(chunks, *_all_gather_steps(chunks, me, p), None, group, network, me, p, trace,
               "all-gather", p - 1)
    return tensor


def _all_gather_steps(chunks, me, p):
    """``(sends, receive buffers)`` of the all-gather's p-1 steps: chunks, in place."""
    into = [chunks[(me - s - 1) % p] for s in range(p - 1)]
    return [(me - s) % p for s in range(p - 1)], [c if c.numel() else None for c in into]


def ring_all_reduce(tensor, group=None, *, check=True, network=None, trace=None):
    """Sum ``tensor`` over the group, in place: ring reduce-scatter, then ring all-gather.

    The bandwidth-optimal all-reduce (Patarasuk and Yuan 2009), the one NCCL, gloo and
    Horovod use for large tensors. Every rank sends and receives ``2(p-1)/p·n`` bytes, the
    lower bound, whatever p; the price is ``2(p-1)`` latency terms.

    The all-gather's receives are posted with the reduce-scatter's, before anything is
    sent, so no all-gather message waits for its receiver's ready signal. They write
    straight into the chunks, and that is safe: the finished chunk c reaches this rank
    only after this rank's partial sum of c has travelled round to c's owner, that is after
    this rank is done with chunk c.

    With more ranks than cores it goes round in segments of 2 MiB messages (:func:`_segments`):
    16 MiB at 4 ranks on 2 cores took 1.00x gloo's time in 2 MiB messages, 1.15x in 1 MiB.

    Cost: :func:`distlab.communication.alpha_beta.ring_all_reduce`,
    ``2(p-1)·alpha + 2(p-1)/p·n·beta``.
    """
    me, p = _group_rank_and_size(tensor, group, check, "ring_all_reduce")
    if p == 1 or tensor.numel() == 0:
        return tensor
    for flat in _segments(tensor.view(-1), p, network, trace):
        chunks = flat.tensor_split(p)
        sends, bufs, into = _reduce_scatter_steps(chunks, me, p)
        gathers, places = _all_gather_steps(chunks, me, p)
        pending = _post_receives(bufs + places, group, (me - 1) % p)
        _ring_pass(chunks, sends, bufs, into, group, network, me, p, trace, "reduce-scatter",
                   0, pending[:p - 1])
        _ring_pass(chunks, gathers, places, None, group, network, me, p, trace, "all-gather",
                   p - 1, pending[p - 1:])
    return tensor


_MAX_MESSAGE_BYTES = 2 << 20   # largest ring message when the ranks outnumber the cores


def _segments(flat, p, network, trace):
    """``flat`` cut so that no message exceeds ``_MAX_MESSAGE_BYTES`` when the ranks outnumber
    this rank's cores (a pinned rank has one), else whole; a network or trace sees it whole."""
    k = math.ceil(comm.nbytes(flat) / p / _MAX_MESSAGE_BYTES)
    crowded = p > alpha_beta.machine_cores() and network is None and trace is None
    return flat.tensor_split(k) if crowded and k > 1 else (flat,)


def gloo_all_reduce(tensor, group=None, *, check=True, network=None, trace=None):
    """The built-in ``torch.distributed.all_reduce`` (counted), for comparison; the ledger
    books it as a ring (:func:`distlab.communication.alpha_beta.ring_all_reduce_bytes`).
    ``network`` and ``trace`` are not applied (the messages are inside the backend), nor
    ``check`` (the backend checks sizes itself)."""
    comm.all_reduce(tensor, group=group)
    return tensor


ALL_REDUCES = {"ring": ring_all_reduce, "recursive_doubling": recursive_doubling_all_reduce,
               "naive": naive_all_reduce, "gloo": gloo_all_reduce}
"""All-reduce algorithms by name: the names of their costs in
:data:`distlab.communication.alpha_beta.COSTS`."""
