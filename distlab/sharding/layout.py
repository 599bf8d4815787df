"""How ZeRO and FSDP cut tensors into shards, and the two collectives that move the shards.

Two layouts, the two of practice:

* :class:`ShardLayout`, PyTorch FSDP2's (and ZeRO stage 2's and FSDP's here): every tensor
  is flattened, padded to a multiple of N and cut into N equal chunks; rank r owns chunk r
  of *every* tensor, so each tensor can be reduce-scattered on its own as backward makes it.
* :class:`FlatLayout`, DeepSpeed's and FSDP1's flat parameter (ZeRO stage 1's here): the
  tensors laid end to end in one buffer, padded to a multiple of N; rank r owns slice r of
  it. The tensors can *live* in that buffer (views of it), so an all-gather into it
  updates them in place, with no copy.

A rank's *row* is what it owns, end to end, so one collective moves the shards of many
tensors:

* :func:`reduce_scatter` sums the ranks' (N, L) rows and hands rank r its row of the sum,
  (N-1)·alpha + (N-1)/N·n·beta for n = N·L elements: half an all-reduce;
* :func:`all_gather_rows` hands every rank every rank's row, at the same cost.

A reduce-scatter followed by an all-gather is exactly a ring all-reduce (Patarasuk and Yuan
2009), which is why ZeRO stages 1 and 2 cost what data parallelism costs.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.nn import functional as F

from distlab import comm
from distlab.checks import is_int
from distlab.communication.collectives import ring_reduce_scatter


class _Layout:
    """What both layouts share: the shapes, N, and a shard as a view of the full tensor."""

    def __init__(self, shapes, world_size: int):
        if not (is_int(world_size) and world_size >= 1):
            raise ValueError(f"{type(self).__name__} world_size={world_size!r} is out of "
                             "range; allowed an int >= 1")
        self.shapes = [torch.Size(s) for s in shapes]
        self.world_size = world_size
        self.numels = [s.numel() for s in self.shapes]

    def bounds(self, i: int, rank: int) -> tuple[int, int]:
        """The range [start, stop) of tensor ``i``'s flat elements that ``rank`` owns."""
        raise NotImplementedError

    def shard(self, i: int, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s shard of the full tensor ``full`` (a view, not a copy)."""
        start, stop = self.bounds(i, rank)
        return full.reshape(-1)[start:stop]


class ShardLayout(_Layout):
    """Which elements of each tensor a rank owns: chunk r of the tensor flattened and padded.

    A tensor of n elements is padded to N·c elements, c = ceil(n / N), and viewed as (N, c):
    row r is rank r's chunk. Rank r's *shard* is that chunk without the padding (elements
    ``bounds(i, r)`` of the flat tensor; it may be shorter than c, or empty). Collectives
    move whole rows: a rank's row for all tensors is the concatenation of its chunks,
    ``row_len = sum(c)`` elements.

    Args:
        shapes: the full shapes of the tensors.
        world_size: N, the number of ranks that share them (an int >= 1).
    """

    def __init__(self, shapes, world_size: int):
        super().__init__(shapes, world_size)
        self.chunks = [math.ceil(n / world_size) for n in self.numels]
        self.offsets = [sum(self.chunks[:i]) for i in range(len(self.chunks))]
        self.row_len = sum(self.chunks)

    def bounds(self, i: int, rank: int) -> tuple[int, int]:
        """The range [start, stop) of tensor ``i``'s flat elements that ``rank`` owns."""
        c, n = self.chunks[i], self.numels[i]
        return min(rank * c, n), min((rank + 1) * c, n)

    def row_offset(self, i: int, rank: int) -> int:
        """Where tensor ``i``'s shard starts in ``rank``'s row: its chunk's offset."""
        return self.offsets[i]

    def pack_row(self, shards, dtype=None, device=None, out=None) -> torch.Tensor:
        """One rank's shards laid out as its row, zero padded: shape (row_len,).

        The row lives on ``device`` (default: the first shard's), so it can go to NCCL.
        With ``out`` (a contiguous (row_len,) tensor, e.g. this rank's row of the
        all-gather's output) the shards are written there and only the padding is zeroed:
        no row is allocated, and the gather then has nothing to copy for this rank.
        """
        if out is None:
            out = torch.empty(self.row_len, dtype=dtype or shards[0].dtype,
                              device=device or shards[0].device)
        for o, c, s in zip(self.offsets, self.chunks, shards):
            out[o:o + s.numel()] = s
            if s.numel() < c:
                out[o + s.numel():o + c].zero_()
        return out

    def rows(self, i: int, full: torch.Tensor, dtype=None) -> torch.Tensor:
        """Tensor ``i`` padded and cut into every rank's chunk: shape (N, c), a fresh copy."""
        N, c, n = self.world_size, self.chunks[i], self.numels[i]
        return F.pad(full.reshape(-1).to(dtype or full.dtype), (0, N * c - n)).view(N, c)

    def pack_rows(self, fulls, dtype=None) -> torch.Tensor:
        """Full tensors laid out as the rows of all ranks: shape (N, row_len), on their device."""
        return torch.cat([self.rows(i, t, dtype) for i, t in enumerate(fulls)], dim=1)

    def unpack_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`pack_rows`: (N, row_len) rows back to full tensors."""
        out = []
        for o, c, n, shape in zip(self.offsets, self.chunks, self.numels, self.shapes):
            flat = rows.new_empty(self.world_size * c)
            flat.view(self.world_size, c).copy_(rows[:, o:o + c])
            out.append(flat[:n].view(shape))
        return out

    def unpack_rows_into(self, rows: torch.Tensor, fulls, skip: int | None = None) -> None:
        """:meth:`unpack_rows` written straight into existing contiguous tensors: one copy.

        Row ``skip`` is left out: a rank passes its own, whose values its tensors already
        hold (its shards are views of them), so it copies (N-1)/N of the elements.
        """
        N = self.world_size
        spans = [(0, N)] if skip is None else [(0, skip), (skip + 1, N)]
        for o, c, n, t in zip(self.offsets, self.chunks, self.numels, fulls):
            flat, whole = t.view(-1), n // c if c else 0   # rows [0, whole) are all data
            for a, b in spans:
                b = min(b, whole)
                if a < b:
                    flat[a * c:b * c].view(b - a, c).copy_(rows[a:b, o:o + c])
            if n > whole * c and skip != whole:             # the last, partly padded row
                flat[whole * c:].copy_(rows[whole, o:o + n - whole * c])


class FlatLayout(_Layout):
    """Which elements of each tensor a rank owns: its slice of all the tensors end to end.

    The tensors, flattened and laid end to end (tensor i from ``offsets[i]``), are padded
    with zeros to N·S elements, S = ceil(total / N), and viewed as (N, S): row r is rank r's
    *row*, and its *shard* of tensor i is the part of tensor i inside it (elements
    ``bounds(i, r)`` of the flat tensor; empty where tensor i lies in other rows). Same
    interface as :class:`ShardLayout`; :meth:`buffer` makes the (N·S,) buffer the tensors can
    live in (:meth:`views`), so that an all-gather into it is the whole update.

    Args:
        shapes: the full shapes of the tensors.
        world_size: N, the number of ranks that share them (an int >= 1).
    """

    def __init__(self, shapes, world_size: int):
        super().__init__(shapes, world_size)
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        self.numel = sum(self.numels)
        self.row_len = math.ceil(self.numel / world_size)

    def bounds(self, i: int, rank: int) -> tuple[int, int]:
        """The range [start, stop) of tensor ``i``'s flat elements that ``rank`` owns."""
        o, n = self.offsets[i], self.numels[i]
        start = min(max(rank * self.row_len - o, 0), n)
        return start, max(min((rank + 1) * self.row_len - o, n), start)

    def row_offset(self, i: int, rank: int) -> int:
        """Where tensor ``i``'s shard starts in ``rank``'s row (the row's length if empty)."""
        return min(max(self.offsets[i] - rank * self.row_len, 0), self.row_len)

    def buffer(self, fulls, dtype=None, device=None) -> torch.Tensor:
        """The tensors end to end, zero padded: a fresh (N·S,) tensor on their device."""
        like = fulls[0]
        out = torch.empty(self.world_size * self.row_len, dtype=dtype or like.dtype,
                          device=device or like.device)
        for t, o, n in zip(fulls, self.offsets, self.numels):
            out[o:o + n] = t.reshape(-1)
        out[self.numel:].zero_()          # the padding only: the rest was just written
        return out

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor as a view of ``buffer`` (made by :meth:`buffer`), in its shape."""
        return [buffer[o:o + n].view(s) for o, n, s in zip(self.offsets, self.numels,
                                                            self.shapes)]

    def adopt(self, params) -> torch.Tensor:
        """Move ``params`` (parameters or tensors of these shapes) into a fresh buffer: each
        ``.data`` becomes a view of it, values kept. Returns the buffer as (N, row_len)."""
        flat = self.buffer([p.detach() for p in params])
        for p, view in zip(params, self.views(flat)):
            p.data = view
        return flat.view(self.world_size, self.row_len)

    def pack_row(self, shards, dtype=None, device=None, out=None) -> torch.Tensor:
        """One rank's shards end to end, zero padded: shape (row_len,)."""
        if out is None:
            out = torch.empty(self.row_len, dtype=dtype or shards[0].dtype,
                              device=device or shards[0].device)
        at = 0
        for s in shards:
            out[at:at + s.numel()] = s.reshape(-1)
            at += s.numel()
        out[at:].zero_()
        return out

    def pack_rows(self, fulls, dtype=None) -> torch.Tensor:
        """Full tensors laid out as the rows of all ranks: shape (N, row_len)."""
        return self.buffer(fulls, dtype).view(self.world_size, self.row_len)

    def unpack_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`pack_rows`: (N, row_len) rows back to full tensors (views)."""
        return self.views(rows.reshape(-1))


def reduce_scatter(rows: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``rows`` (N, L) over the ranks and return this rank's row of the sum, (L,).

    Gloo has no reduce-scatter, so on gloo this is the ring algorithm of
    :func:`distlab.communication.collectives.ring_reduce_scatter` (Patarasuk and Yuan 2009):
    N-1 steps, in each a rank passes one partial sum to its right neighbour and adds the one
    arriving from its left. Cost (N-1)·alpha + (N-1)/N·n·beta for n = N·L elements, half an
    all-reduce, and the ledger counts the bytes of those real sends. ``rows`` is
    overwritten. Other backends use their native reduce-scatter.
    """
    if dist.get_world_size(group) == 1:
        return rows[0]
    if dist.get_backend(group) != "gloo":
        out = rows.new_empty(rows.shape[1])
        comm.reduce_scatter_tensor(out, rows.reshape(-1), group=group)
        return out
    # N·L elements split N ways: chunk r is exactly row r.
    return ring_reduce_scatter(rows.view(-1), group, check=False)


def all_gather_rows(row: torch.Tensor, group=None, out=None) -> torch.Tensor:
    """Every rank's ``row`` (L,), stacked: (N, L). One ring all-gather, (N-1)/N·n bytes.

    ``out`` (N, L), contiguous, receives the rows; when ``row`` is this rank's row of
    ``out`` (as :func:`all_gather_shards` packs it) that row is not copied at all.
    """
    N = dist.get_world_size(group)
    if out is None:
        out = row.new_empty(N, row.numel())
    comm.all_gather_into_tensor(out.view(-1), row.contiguous(), group=group)
    return out.view(N, -1)


def all_gather_shards(layout: ShardLayout, shards, group=None) -> torch.Tensor:
    """Every rank's row of ``layout`` (N, row_len), this rank's packed from its ``shards``.

    The shards are written straight into this rank's row of the gather's output, so the
    only copies are that packing and, after the gather, the other rows' unpacking (no
    temporary row, no copy of it into the output). Cost: one ring all-gather,
    (N-1)·alpha + (N-1)/N·n·beta for n = N·row_len elements.
    """
    rows = shards[0].new_empty(layout.world_size, layout.row_len)    # (N, row_len)
    mine = rows[dist.get_rank(group)]
    layout.pack_row(shards, out=mine)
    return all_gather_rows(mine, group, out=rows)
