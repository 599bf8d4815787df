"""All-to-all: every rank sends a different chunk to every other rank.

Rank r splits its input along the first dimension into p chunks (``input_split_sizes``
rows each, equal by default) and sends chunk s to rank s; it receives one chunk from every
rank, which it stores in rank order (``output_split_sizes`` rows each). It is a transpose
of a p x p matrix of chunks whose row r lives on rank r. A mixture-of-experts layer moves
tokens to their experts' ranks with it and back (GShard, Lepikhin et al. 2020, section
2.2), and DeepSpeed-Ulysses swaps a sequence split for a head split with it (Jacobs et
al. 2023).

:func:`pairwise_all_to_all` builds it from point-to-point messages: the pairwise exchange
of Thakur, Rabenseifner and Gropp 2005, section 4.6. In round k = 1 .. p-1, rank r sends
its chunk for rank ``r+k`` and receives the chunk of rank ``r-k`` (mod p), so each round is
a permutation: every rank sends one message and receives one. :func:`torch_all_to_all` is
``torch.distributed.all_to_all_single`` (gloo has it), counted in the same ledger.

Cost (alpha-beta, equal splits, n the bytes of one rank's input):
:func:`distlab.communication.alpha_beta.all_to_all`, ``(p-1)·alpha + (p-1)/p·n·beta``:
p-1 messages one after another, and every rank sends (and receives) all of its input
except its own chunk, :func:`model_bytes`. Unlike an all-reduce there is nothing to
reduce, so no algorithm can send fewer bytes; the Bruck algorithm trades more bytes
(n/2·lg p) for fewer messages (lg p), which pays only for tiny chunks.
"""
from __future__ import annotations

import math
import time
import zlib

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, require_arg
from distlab.communication import alpha_beta

_clock = time.perf_counter


def pairwise_all_to_all(input, output_split_sizes=None, input_split_sizes=None, group=None,
                        *, check=True, network=None, trace=None):
    """All-to-all of ``input``'s rows over ``group`` in p-1 rounds of paired messages.

    ``input_split_sizes[s]`` rows of ``input`` (in order) go to rank s; ``output_split_sizes[s]``
    rows arrive from rank s (None: p equal splits). Returns the new output tensor, of
    ``sum(output_split_sizes)`` rows. Each round posts an ``isend`` and waits in a blocking
    ``recv`` (gloo hangs on ``batch_isend_irecv``); empty chunks send nothing.

    ``check`` (default True): one small all-gather of every rank's split sizes, so that
    sizes on which sender and receiver disagree are an error on every rank, not a hang.
    ``network`` and ``trace`` as in :mod:`distlab.communication.collectives`.

    Cost: :func:`distlab.communication.alpha_beta.all_to_all`, ``(p-1)·alpha +
    (p-1)/p·n·beta`` for equal splits.
    """
    me, p, inputs, outputs, output = _prepare(input, output_split_sizes, input_split_sizes,
                                              group, check, "pairwise_all_to_all")
    outputs[me].copy_(inputs[me])                       # my own chunk does not travel
    for k in range(1, p):
        dst, src = (me + k) % p, (me - k) % p
        t0, work = _clock(), None
        if inputs[dst].numel():
            if network is not None:
                network.inject(comm.nbytes(inputs[dst]), _global(group, me), _global(group, dst))
            work = comm.isend(inputs[dst], _global(group, dst), group=group)
        if outputs[src].numel():
            comm.recv(outputs[src], _global(group, src), group=group)
        if work is not None:
            work.wait()
        if trace is not None:
            trace.append(dict(phase="all-to-all", step=k - 1, chunk=dst, rank=me, dst=dst,
                              src=src, start=t0, end=_clock(), nbytes=comm.nbytes(inputs[dst])))
    return output


def torch_all_to_all(input, output_split_sizes=None, input_split_sizes=None, group=None,
                     *, check=True, network=None, trace=None):
    """``torch.distributed.all_to_all_single`` (gloo supports it) through
    ``distlab.comm.all_to_all_single``: counted in the ledger under ``"all_to_all"`` with
    the bytes of the chunks that leave and arrive, and paying an injected network its
    :func:`distlab.communication.alpha_beta.all_to_all` time.

    Same arguments and result as :func:`pairwise_all_to_all`; ``network`` and ``trace`` are
    not applied (the messages are inside the backend).
    """
    _, _, inputs, outputs, output = _prepare(input, output_split_sizes, input_split_sizes,
                                             group, check, "torch_all_to_all")
    comm.all_to_all_single(output, input.contiguous(), [c.shape[0] for c in outputs],
                           [c.shape[0] for c in inputs], group=group)
    return output


ALL_TO_ALLS = {"pairwise": pairwise_all_to_all, "torch": torch_all_to_all}
"""All-to-all implementations by name."""


def model_bytes(nbytes: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in an all-to-all of ``nbytes`` per rank split
    equally: ``(p-1)/p·n``, the ``b`` of :func:`distlab.communication.alpha_beta.all_to_all`."""
    require_arg("nbytes", nbytes, is_int(nbytes) and nbytes >= 0, "an int >= 0")
    require_arg("world_size", world_size, is_int(world_size) and world_size >= 1, "an int >= 1")
    return round(alpha_beta.all_to_all(nbytes, world_size).nbytes)


def compare(world_sizes=(2, 3, 4), chunk_numel: int = 1024) -> list[dict]:
    """Both all-to-alls on each world size, equal splits of ``chunk_numel`` float32 values.

    One launch per world size. Returns one row per (world size, algorithm): ``equal`` (the
    result equals ``dist.all_to_all_single``'s on every rank, bit for bit), ``bytes_sent``
    (the most any rank's ledger counted), ``model_bytes`` (:func:`model_bytes`) and
    ``seconds`` (the slowest rank's time for one call).
    """
    require_arg("chunk_numel", chunk_numel, is_int(chunk_numel) and chunk_numel >= 1,
                "an int >= 1")
    require_arg("world_sizes", world_sizes, isinstance(world_sizes, (list, tuple))
                and len(world_sizes) > 0 and all(is_int(p) and 1 <= p <= 16 for p in world_sizes),
                "a non-empty list of ints in 1..16")
    from distlab.launcher import launch
    rows = []
    for p in world_sizes:
        per_rank = launch(_compare_on_rank, p, chunk_numel)
        for name in ALL_TO_ALLS:
            rows.append(dict(world_size=p, algorithm=name,
                             equal=all(r[name]["equal"] for r in per_rank),
                             bytes_sent=max(r[name]["bytes_sent"] for r in per_rank),
                             model_bytes=model_bytes(4 * p * chunk_numel, p),
                             seconds=max(r[name]["seconds"] for r in per_rank)))
    return rows


def _compare_on_rank(chunk_numel: int) -> dict:
    rank, p = dist.get_rank(), dist.get_world_size()
    x = torch.arange(p * chunk_numel, dtype=torch.float32) + 1e6 * rank   # (p·chunk,)
    want = torch.empty_like(x)
    dist.all_to_all_single(want, x)                      # PyTorch's own, the reference
    out = {}
    for name, fn in ALL_TO_ALLS.items():
        fn(x, check=False)                               # warm up the connections
        comm.ledger().reset()
        dist.barrier()
        t0 = _clock()
        got = fn(x, check=False)
        seconds = _clock() - t0
        ops = comm.ledger().by_op()
        out[name] = dict(equal=torch.equal(got, want), seconds=seconds,
                         bytes_sent=sum(ops[o]["bytes_sent"] for o in ("send", "all_to_all")
                                        if o in ops))
    return out


# ----------------------------------------------------------------------------------------
# Plumbing: the splits, checked, and the chunks they cut.
# ----------------------------------------------------------------------------------------

def _prepare(input, output_split_sizes, input_split_sizes, group, check, name):
    """``(group rank, p, input chunks, output chunks, output)`` after checking the splits."""
    if not isinstance(input, torch.Tensor) or input.dim() == 0:
        raise TypeError(f"{name}: input must be a torch.Tensor with at least one dimension")
    me, p = dist.get_rank(group), dist.get_world_size(group)
    if me < 0:
        raise ValueError(f"{name}: rank {dist.get_rank()} is not in the group; call it only "
                         "on the group's members")
    input = input.contiguous()
    in_splits = _splits(name, "input_split_sizes", input_split_sizes, input.shape[0], p)
    out_rows = input.shape[0] if output_split_sizes is None else None
    out_splits = _splits(name, "output_split_sizes", output_split_sizes, out_rows, p)
    if check and p > 1:
        _check_splits(name, in_splits, out_splits, input, group, me, p)
    output = input.new_empty((sum(out_splits), *input.shape[1:]))
    return me, p, input.split(in_splits), output.split(out_splits), output


def _splits(name, field, sizes, rows, p) -> list[int]:
    """``sizes`` checked (p ints >= 0 summing to ``rows`` when rows is known), or p equal
    splits of ``rows``."""
    if sizes is None:
        if rows % p:
            raise ValueError(f"{name}: {rows} rows do not split equally over {p} ranks; "
                             f"pass {field} (p sizes that sum to {rows})")
        return [rows // p] * p
    sizes = list(sizes)
    if len(sizes) != p or not all(is_int(s) and s >= 0 for s in sizes):
        raise ValueError(f"{name}: {field}={sizes} must be {p} ints >= 0, one per rank")
    if rows is not None and sum(sizes) != rows:
        raise ValueError(f"{name}: {field}={sizes} sum to {sum(sizes)}, but the input's first "
                         f"dimension is {rows}; they must sum to it")
    return sizes


def _check_splits(name, in_splits, out_splits, input, group, me, p) -> None:
    """Raise on every rank unless what s sends to r is what r expects from s and the ranks'
    rows agree in size and dtype (one all-gather of 2p + 2 small ints per rank)."""
    # A dtype's code must be the same in every process: crc32, not the salted hash().
    row = [math.prod(input.shape[1:]), zlib.crc32(str(input.dtype).encode())]
    mine = torch.tensor(in_splits + out_splits + row)
    every = torch.empty(p, mine.numel(), dtype=mine.dtype)
    comm.all_gather_into_tensor(every, mine, group=group)
    sends, recvs = every[:, :p], every[:, p:2 * p]            # sends[s, r]: rows s sends to r
    rows = every[:, 2 * p:]
    if torch.equal(sends, recvs.t()) and (rows == rows[0]).all():
        return
    bad = [(s, r) for s in range(p) for r in range(p) if sends[s, r] != recvs[r, s]]
    raise ValueError(f"{name}: the ranks disagree: input_split_sizes by rank "
                     f"{sends.tolist()}, output_split_sizes by rank {recvs.tolist()} (rank s "
                     f"must send rank r the rows r expects from s; mismatched (s, r): {bad}); "
                     f"values per row and dtype codes by rank {rows.tolist()}")


def _global(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
