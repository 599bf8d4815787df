"""Accounted communication: torch.distributed calls that count bytes and time per rank.

Every collective and point-to-point call that distlab makes goes through this module, so
each rank knows how many bytes it sent and received, and how long it spent communicating,
per kind of operation. The wrappers have torch.distributed's signatures; the cost is two
clock reads and a few additions per call (see ``benchmarks/bench_launch.py``).

Bytes are counted as follows:

* point-to-point (``send``/``recv``/``isend``/``irecv``): exactly the tensor's bytes;
* built-in collectives: their **model bytes**, the volume each rank moves in the
  bandwidth-optimal algorithm (Thakur, Rabenseifner and Gropp 2005), from
  :mod:`distlab.communication.alpha_beta`: ``all_reduce`` 2(p-1)/p·n sent and received
  (:func:`~distlab.communication.alpha_beta.ring_all_reduce_bytes`), ``reduce_scatter`` and
  ``all_gather`` (p-1)/p·n where n is the full tensor's bytes
  (:func:`~distlab.communication.alpha_beta.ring_all_gather_bytes`), ``broadcast`` n leaving
  the root and n arriving at every other rank
  (:func:`~distlab.communication.alpha_beta.broadcast_bytes`).

The ledger belongs to the process: one process is one rank. Time for an asynchronous
operation is counted from its launch to its ``wait()``.

**An injected network on every message.** Inside ``with inject_network(network):`` (or on
every rank of a launch, ``distlab.launch(fn, p, network=network)``) every call below
also sleeps its alpha-beta time on that :class:`~distlab.communication.netsim.Network`,
with the bytes it books: a send ``alpha + n·beta`` before its message leaves (so the
receiver waits for it too; a receive pays nothing more), a built-in collective the cost of
its algorithm in :mod:`distlab.communication.alpha_beta` (``all_reduce``
:func:`~distlab.communication.alpha_beta.ring_all_reduce`, ``broadcast``
:func:`~distlab.communication.alpha_beta.broadcast`, the all-gathers and reduce-scatter
their ring forms, ``barrier`` :func:`~distlab.communication.alpha_beta.barrier`). An
asynchronous collective pays on ``wait()`` what is left of its delay, so computation
overlapped with it hides it as on a real network. Results are unchanged (the real message
is sent as usual) and so are the bytes; the time counted includes the injected sleep. The
explicit ``Network.inject``/``Network.sleep`` calls of the from-scratch collectives sleep
nothing meanwhile: each message pays once, here. Off by default.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distlab.communication import alpha_beta, netsim
from distlab.communication.netsim import Network

_clock = time.perf_counter


@dataclass
class OpStats:
    """Totals for one kind of operation on this rank."""
    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    comm_time: float = 0.0


class Ledger:
    """Per-rank totals of communication, by operation kind."""

    def __init__(self):
        self.ops: dict[str, OpStats] = defaultdict(OpStats)

    def add(self, op: str, bytes_sent: int, bytes_recv: int, seconds: float) -> None:
        s = self.ops[op]   # on the hot path of every message: keep it to a few additions
        s.calls += 1
        s.bytes_sent += bytes_sent
        s.bytes_recv += bytes_recv
        s.comm_time += seconds

    def totals(self) -> dict:
        """``{"bytes_sent", "bytes_recv", "comm_time"}`` summed over all operations."""
        ops = self.ops.values()
        return {"bytes_sent": sum(s.bytes_sent for s in ops),
                "bytes_recv": sum(s.bytes_recv for s in ops),
                "comm_time": sum(s.comm_time for s in ops)}

    def by_op(self) -> dict[str, dict]:
        """``{op: {"calls", "bytes_sent", "bytes_recv", "comm_time"}}``."""
        return {op: dict(vars(s)) for op, s in self.ops.items()}

    def reset(self) -> None:
        self.ops.clear()


_ledger = Ledger()


def ledger() -> Ledger:
    """This rank's communication ledger."""
    return _ledger


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@contextmanager
def inject_network(network: Network | None):
    """Within the block, every message this rank sends through distlab.comm pays ``network``.

    Each rank turns it on for itself (a process is a rank); every rank of a collective must
    inject the same network. None (or a Network that injects nothing) turns it off::

        with comm.inject_network(Network(latency=1e-4, bandwidth=12.5e6)):   # 100 Mbit/s
            comm.all_reduce(x)      # sleeps 2(p-1)·alpha + 2(p-1)/p·n·beta, then reduces
    """
    previous = netsim.set_everywhere(network)
    try:
        yield netsim.everywhere()
    finally:
        netsim.set_everywhere(previous)


def _collective_delay(cost_of, nbytes_: int, p: int) -> float:
    """Injected seconds of a collective of alpha-beta cost ``cost_of(n, p)``; 0 when off."""
    net = netsim.everywhere()
    return 0.0 if net is None else net.cost_delay(cost_of(nbytes_, p), p)


def _pay_send(nbytes_: int, dst: int) -> None:
    """Sleep a point-to-point message's injected ``alpha + n·beta`` before it leaves."""
    net = netsim.everywhere()
    if net is not None:
        time.sleep(net.delay(nbytes_, dist.get_rank(), dst))


class _TimedWork:
    """Wraps an async ``Work`` so the ledger counts the time until ``wait()`` returns."""

    def __init__(self, work, op, sent, recv, t0, delay=0.0):
        self._work, self._op, self._sent, self._recv, self._t0 = work, op, sent, recv, t0
        self._delay = delay      # injected seconds still owed at wait()
        self._counted = False

    def wait(self, timeout=None):
        if self._delay:          # what overlapped computation did not hide
            rest, self._delay = self._t0 + self._delay - _clock(), 0.0
            if rest > 0:
                time.sleep(rest)
        out = self._work.wait() if timeout is None else self._work.wait(timeout)
        if not self._counted:
            self._counted = True
            _ledger.add(self._op, self._sent, self._recv, _clock() - self._t0)
        return out

    def is_completed(self):
        return self._work.is_completed()

    def __getattr__(self, name):
        return getattr(self._work, name)


def _run(op, call, sent, recv, async_op, delay=0.0):
    t0 = _clock()
    if delay and not async_op:
        time.sleep(delay)
    work = call()
    if async_op:
        return _TimedWork(work, op, sent, recv, t0, delay)
    _ledger.add(op, sent, recv, _clock() - t0)
    return work


# torch 2.13 renamed the tensor forms (``*_into_tensor`` / ``*_tensor``) to ``*_single``.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)


def _p(group) -> int:
    return dist.get_world_size(group)


# -- point to point -----------------------------------------------------------------------

def send(tensor, dst, group=None, tag=0):
    """``dist.send``, counted."""
    t0 = _clock()
    _pay_send(nbytes(tensor), dst)
    dist.send(tensor, dst, group=group, tag=tag)
    _ledger.add("send", nbytes(tensor), 0, _clock() - t0)


def recv(tensor, src=None, group=None, tag=0):
    """``dist.recv``, counted."""
    t0 = _clock()
    sender = dist.recv(tensor, src, group=group, tag=tag)
    _ledger.add("recv", 0, nbytes(tensor), _clock() - t0)
    return sender


def isend(tensor, dst, group=None, tag=0):
    """``dist.isend``, counted when its ``wait()`` returns.

    Under an injected network it sleeps before the message leaves (one port per rank:
    a rank's sends go one after another), so its receiver waits for it too."""
    t0 = _clock()
    _pay_send(nbytes(tensor), dst)
    return _TimedWork(dist.isend(tensor, dst, group=group, tag=tag), "send", nbytes(tensor),
                      0, t0)


def irecv(tensor, src=None, group=None, tag=0):
    """``dist.irecv``, counted when its ``wait()`` returns."""
    t0 = _clock()
    return _TimedWork(dist.irecv(tensor, src, group=group, tag=tag), "recv", 0,
                      nbytes(tensor), t0)


# -- built-in collectives -----------------------------------------------------------------

def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """``dist.all_reduce``, counted as a ring all-reduce: 2(p-1)/p·n each way."""
    n, p = nbytes(tensor), _p(group)
    vol = alpha_beta.ring_all_reduce_bytes(n, p)
    return _run("all_reduce", lambda: dist.all_reduce(tensor, op=op, group=group,
                                                      async_op=async_op), vol, vol, async_op,
                _collective_delay(alpha_beta.ring_all_reduce, n, p))


def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                      group=None, async_op=False):
    """``dist.all_to_all_single``, counted as the rows that leave this rank and the rows
    that arrive (its own chunk stays): (p-1)/p·n each way for equal splits."""
    p, me = _p(group), dist.get_rank(group)
    def moved(t, splits):   # bytes of t's rows outside this rank's own chunk
        rows = splits if splits is not None else [t.shape[0] // p] * p
        return nbytes(t) - (nbytes(t) // t.shape[0] * rows[me] if t.shape[0] else 0)
    return _run("all_to_all", lambda: dist.all_to_all_single(
                    output, input, output_split_sizes, input_split_sizes, group=group,
                    async_op=async_op),
                moved(input, input_split_sizes), moved(output, output_split_sizes), async_op,
                _collective_delay(alpha_beta.all_to_all, nbytes(input), p))


def broadcast(tensor, src, group=None, async_op=False):
    """``dist.broadcast``, counted as n bytes leaving ``src`` and arriving everywhere else."""
    p = _p(group)
    n = alpha_beta.broadcast_bytes(nbytes(tensor), p)
    is_src = dist.get_rank() == src
    return _run("broadcast", lambda: dist.broadcast(tensor, src, group=group,
                                                    async_op=async_op),
                n if is_src else 0, 0 if is_src else n, async_op,
                _collective_delay(alpha_beta.broadcast, nbytes(tensor), p))


def all_gather_into_tensor(output, input, group=None, async_op=False):
    """``dist.all_gather_into_tensor``, counted as a ring all-gather: (p-1)/p·n each way.

    On gloo it is p concurrent broadcasts, one from each rank into its slice of ``output``
    (the same bytes): gloo's own all-gather took 1.5-1.7x as long at 2 and 4 ranks for rows
    of 1 MiB, and it is every ZeRO and FSDP step's all-gather.
    """
    p = _p(group)
    vol = alpha_beta.ring_all_gather_bytes(nbytes(output), p)
    delay = _collective_delay(alpha_beta.ring_all_gather, nbytes(output), p)
    if dist.get_backend(group) == "gloo" and output.is_contiguous():
        return _run("all_gather", lambda: _broadcast_slices(output, input, group, async_op),
                    vol, vol, async_op, delay)
    return _run("all_gather", lambda: _all_gather_single(
        output, input, group=group, async_op=async_op), vol, vol, async_op, delay)


def all_gather(tensor_list, tensor, group=None, async_op=False):
    """``dist.all_gather`` into a list, counted as a ring all-gather."""
    p = _p(group)
    vol = alpha_beta.ring_all_gather_bytes(p * nbytes(tensor), p)
    return _run("all_gather", lambda: dist.all_gather(tensor_list, tensor, group=group,
                                                      async_op=async_op), vol, vol, async_op,
                _collective_delay(alpha_beta.ring_all_gather, p * nbytes(tensor), p))


def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """``dist.reduce_scatter_tensor``, counted as a ring reduce-scatter: (p-1)/p·n each way.

    Gloo has no native reduce-scatter; there it is an all-reduce followed by taking this
    rank's slice (correct, at twice the traffic), which is what the ledger then counts (and
    an injected network charges).
    """
    p = _p(group)
    if dist.get_backend(group) == "gloo":
        full = input.clone()
        all_reduce(full, op=op, group=group)
        output.copy_(full.chunk(p)[dist.get_group_rank(group, dist.get_rank())
                                   if group is not None else dist.get_rank()])
        return None
    vol = alpha_beta.ring_reduce_scatter_bytes(nbytes(input), p)
    return _run("reduce_scatter", lambda: _reduce_scatter_single(
        output, input, op=op, group=group, async_op=async_op), vol, vol, async_op,
                _collective_delay(alpha_beta.ring_reduce_scatter, nbytes(input), p))


def _broadcast_slices(output, input, group, async_op):
    """All-gather as broadcasts: row r of ``output`` viewed as (p, n) comes from rank r."""
    p = _p(group)
    if output.numel() != p * input.numel() or output.dtype != input.dtype:
        raise ValueError(f"all_gather_into_tensor: output of {output.numel()} "
                         f"{output.dtype} elements must hold {p} inputs of {input.numel()} "
                         f"{input.dtype}")
    rows = output.view(p, -1)                                 # (p, n): one row per rank
    me = dist.get_rank(group)
    rows[me].copy_(input.reshape(-1))
    works = [dist.broadcast(rows[r], r if group is None else dist.get_global_rank(group, r),
                            group=group, async_op=True) for r in range(p)]
    work = _AllOf(works)
    if async_op:
        return work
    work.wait()
    return None


class _AllOf:
    """Several ``Work`` handles waited for as one."""

    def __init__(self, works):
        self._works = works

    def wait(self, timeout=None):
        for w in self._works:
            w.wait() if timeout is None else w.wait(timeout)
        return True

    def is_completed(self):
        return all(w.is_completed() for w in self._works)


def barrier(group=None):
    """``dist.barrier``, counted as a call with no payload."""
    p = _p(group)
    return _run("barrier", lambda: dist.barrier(group=group), 0, 0, False,
                _collective_delay(lambda _, q: alpha_beta.barrier(q), 0, p))
