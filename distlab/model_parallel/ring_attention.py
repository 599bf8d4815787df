"""Ring attention: exact attention over a sequence cut into p shards, K/V passed around a ring.

Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (arXiv 2310.01889), section 3 and algorithm 1. Rank r holds the queries, keys and
values of its own shard of the sequence, ``Q_r, K_r, V_r`` of shape (B, H, T/p, d). In p
steps each rank meets every K/V block: it computes attention of ``Q_r`` against the block it
holds while it sends that block on to rank r+1 and receives the next from rank r-1.

The partial results are merged by the **online softmax** (Milakov and Gimelshein 2018;
Dao et al. 2022, "FlashAttention", section 3.1): per query row a running maximum ``m``, a
running sum ``l`` of ``exp(s - m)`` and an output accumulated unnormalized; a new block
with row maximum ``m'`` rescales what is there by ``exp(m - m')``. At the end ``O = acc / l``
and the log-sum-exp ``lse = m + log l`` is kept: the backward rebuilds each block's
probabilities ``P = exp(S - lse)`` from it instead of storing them (FlashAttention-2,
Dao 2023, algorithm 2). The scores are never held whole: one (T/p) x (T/p) block (or,
zig-zag, (T/2p) x (T/2p) chunk pair) at a time.

Backward (the paper's section 3, "the backward pass"): K and V go around the ring again,
and with them two accumulators dK and dV; each rank adds its queries' contribution to the
block it holds and passes it on; after p steps the accumulators make one last hop home.
dQ stays where Q is.

**Causal** attention: a query at position i sees keys at positions <= i. With the shards in
order (``layout="contiguous"``) blocks from later shards are skipped and the diagonal block
is masked, so rank r computes r + 1 blocks of the p: rank p-1 works p times as long as rank
0 and everyone waits for it. ``layout="zigzag"`` (the order of Llama 3's context
parallelism, Dubey et al. 2024, arXiv 2407.21783, section 3.3.2; Striped Attention,
Brandon et al. 2023, balances by dealing single tokens round-robin instead) cuts the
sequence into 2p chunks and gives rank r chunks r and 2p-1-r: every rank then computes the
same number of chunk pairs, 2p + 1 of the 4p (:func:`work_per_rank`).

Cost per attention layer and step (alpha-beta model, n = B·(T/p)·H·d·itemsize, one block):
forward p-1 hops of K and V, 2(p-1)(alpha + n·beta) sent per rank; backward p-1 hops of K
and V plus p hops of dK and dV, (4p-2)(alpha + n·beta) (nothing on one rank). Each hop overlaps the computation
of the block already held, so the sends hide behind compute when a block's attention takes
longer than its transfer (the paper's condition: block size >= FLOPS / bandwidth).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, require_arg

LAYOUTS = ("contiguous", "zigzag")
"""How the sequence is dealt to the ranks: in order, or zig-zag (balanced causal work)."""


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                   causal: bool = False, layout: str = "contiguous") -> torch.Tensor:
    """This rank's shard of ``softmax(Q K^T / sqrt(d)) V`` over the whole sequence.

    Args:
        q, k, v: this rank's shard, each (B, H, T/p, d) (the layout of
            ``torch.nn.functional.scaled_dot_product_attention``), cut by
            :func:`shard_sequence` (``dim=2``) with the same ``layout``.
        group: the ranks that share the sequence (default: the world).
        causal: mask keys after each query (positions are those of ``layout``).
        layout: ``"contiguous"`` (rank r holds the r-th p-th of the sequence) or
            ``"zigzag"`` (chunks r and 2p-1-r of 2p: balanced causal work).

    Returns:
        (B, H, T/p, d): attention output for this rank's queries; differentiable in q, k, v.
    """
    require_arg("layout", layout, layout in LAYOUTS, f"one of {LAYOUTS}")
    require_arg("causal", causal, isinstance(causal, bool), "True or False")
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        raise ValueError(f"q, k and v must be this rank's (B, H, T/p, d) shards of one shape; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    chunks = len(chunk_ids(0, 1, layout))
    if q.shape[2] % chunks:
        raise ValueError(f"layout={layout!r} cuts each shard into {chunks} chunks: a shard of "
                         f"{q.shape[2]} tokens does not split; use a sequence length "
                         f"divisible by {chunks} x world size")
    return _RingAttention.apply(q, k, v, group, causal, layout)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   causal: bool = False) -> torch.Tensor:
    """Attention on one process, the scores written out: (B, H, T, d) -> (B, H, T, d).

    The reference ring attention and Ulysses must equal. It materializes the (B, H, T, T)
    scores and keeps the probabilities for backward: the O(T^2) memory term that ring
    attention divides by p^2 at a time and Ulysses by p.
    """
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5                # (B, H, T, T)
    if causal:
        s = s.masked_fill(_above_diagonal(s.shape[-1], s.device), float("-inf"))
    return s.softmax(-1) @ v                                         # (B, H, T, d)


def chunk_ids(rank: int, world_size: int, layout: str = "contiguous") -> list[int]:
    """Which chunks of the sequence rank ``rank`` holds, in order.

    ``"contiguous"``: p chunks, rank r holds chunk r. ``"zigzag"``: 2p chunks, rank r holds
    chunks r and 2p-1-r, one early and one late, so causal work is balanced.
    """
    _check_ranks(world_size, layout, rank)
    return [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous",
                   dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of a full sequence ``x`` along ``dim`` (its chunks, in order)."""
    _check_ranks(world_size, layout, rank)
    ids = chunk_ids(rank, world_size, layout)
    n = len(ids) * world_size
    if x.shape[dim] % n:
        raise ValueError(f"a sequence of {x.shape[dim]} tokens does not cut into {n} equal "
                         f"chunks (layout={layout!r}, world_size={world_size}); use a "
                         f"length divisible by {n}")
    pieces = x.chunk(n, dim=dim)
    return torch.cat([pieces[i] for i in ids], dim=dim)


def unshard_sequence(shards: list[torch.Tensor], layout: str = "contiguous",
                     dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard (rank order): inverse of :func:`shard_sequence`."""
    p = len(shards)
    pieces = {}
    for r, shard in enumerate(shards):
        ids = chunk_ids(r, p, layout)
        pieces.update(zip(ids, shard.chunk(len(ids), dim=dim)))
    return torch.cat([pieces[i] for i in sorted(pieces)], dim=dim)


def work_per_rank(world_size: int, causal: bool, layout: str = "contiguous") -> list[float]:
    """Score entries each rank computes, as a fraction of one rank's share without masking.

    Contiguous causal: rank r computes r + 1 of its p blocks, (r + 1)/p; zigzag: every rank
    (2p + 1)/(4p), just over half. Non-causal: 1 everywhere.
    """
    _check_ranks(world_size, layout)
    require_arg("causal", causal, isinstance(causal, bool), "True or False")
    p, n = world_size, 2                       # a shard of 2 tokens: zigzag chunks of 1
    return [sum((qs.stop - qs.start) * (ks.stop - ks.start)
                for s in range(p) for qs, ks, _ in _pairs(r, s, p, n, causal, layout))
            / (p * n * n) for r in range(p)]


def _check_ranks(world_size: int, layout: str, rank: int = 0) -> None:
    require_arg("world_size", world_size, is_int(world_size) and world_size >= 1, "an int >= 1")
    require_arg("rank", rank, is_int(rank) and 0 <= rank < world_size,
                f"an int in 0..{world_size - 1}")
    require_arg("layout", layout, layout in LAYOUTS, f"one of {LAYOUTS}")


# ----------------------------------------------------------------------------------------
# The ring and the block pairs.
# ----------------------------------------------------------------------------------------

class _Ring:
    """Point-to-point hops to the next rank: isend, then blocking receives (gloo-safe)."""

    def __init__(self, group):
        r, self.p = dist.get_rank(group), dist.get_world_size(group)
        to_global = (lambda i: i) if group is None else \
            (lambda i: dist.get_global_rank(group, i))
        self.rank, self.group = r, group
        self.next, self.prev = to_global((r + 1) % self.p), to_global((r - 1) % self.p)

    def send(self, tensors, tag: int) -> "_Hop":
        """Start sending ``tensors`` to the next rank; ``.receive()`` gets the previous one's."""
        works = [comm.isend(t, self.next, group=self.group, tag=tag + i)
                 for i, t in enumerate(tensors)]
        return _Hop(self, tensors, works, tag)


class _Hop:
    def __init__(self, ring, tensors, works, tag):
        self.ring, self.tensors, self.works, self.tag = ring, tensors, works, tag

    def receive(self) -> tuple:
        out = tuple(torch.empty_like(t) for t in self.tensors)
        for i, t in enumerate(out):
            comm.recv(t, self.ring.prev, group=self.ring.group, tag=self.tag + i)
        for w in self.works:
            w.wait()
        return out


def _pairs(rank: int, src: int, p: int, shard_len: int, causal: bool, layout: str):
    """(query slice, key slice, diagonal?) for each chunk pair rank ``rank`` computes
    against rank ``src``'s block; pairs whose keys all follow their queries are skipped."""
    if not causal:
        whole = slice(0, shard_len)
        return [(whole, whole, False)]
    mine, theirs = chunk_ids(rank, p, layout), chunk_ids(src, p, layout)
    c = shard_len // len(mine)
    return [(slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c), a == b)
            for i, a in enumerate(mine) for j, b in enumerate(theirs) if b <= a]


def _above_diagonal(n: int, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _scores(q, k, diagonal: bool):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5                # (B, H, c, c)
    return s.masked_fill(_above_diagonal(s.shape[-1], s.device), float("-inf")) \
        if diagonal else s


class _RingAttention(torch.autograd.Function):
    """Forward: online-softmax merge over p blocks; backward: K, V, dK, dV around again."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout):
        k, v = k.contiguous(), v.contiguous()        # (B, H, T/p, d): they are sent
        ring = _Ring(group)
        B, H, n, d = q.shape
        m = q.new_full((B, H, n), float("-inf"))     # running row maximum of the scores
        l = q.new_zeros((B, H, n))                   # running sum of exp(s - m)
        acc = torch.zeros_like(q)                    # running unnormalized output
        kv = (k, v)
        for step in range(ring.p):
            src = (ring.rank - step) % ring.p        # whose block this rank holds now
            hop = ring.send(kv, tag=0) if step < ring.p - 1 else None   # overlaps compute
            for qs, ks, diagonal in _pairs(ring.rank, src, ring.p, n, causal, layout):
                s = _scores(q[:, :, qs], kv[0][:, :, ks], diagonal)
                m_new = torch.maximum(m[:, :, qs], s.amax(-1))   # finite: step 0 is own block
                rescale = torch.exp(m[:, :, qs] - m_new)
                e = torch.exp(s - m_new.unsqueeze(-1))
                l[:, :, qs] = l[:, :, qs] * rescale + e.sum(-1)
                acc[:, :, qs] = acc[:, :, qs] * rescale.unsqueeze(-1) + e @ kv[1][:, :, ks]
                m[:, :, qs] = m_new
            if hop is not None:
                kv = hop.receive()
        out = acc / l.unsqueeze(-1)
        lse = m + torch.log(l)                       # all backward needs of the softmax
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.layout, ctx.group = causal, layout, group
        return out                                   # (B, H, T/p, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        n, scale = q.shape[2], q.shape[-1] ** -0.5
        do = grad_out                                                    # (B, H, T/p, d)
        D = (do * out).sum(-1)                                           # rowsum(dO * O)
        dq = torch.zeros_like(q)
        kv, dkv = (k, v), (torch.zeros_like(k), torch.zeros_like(v))
        for step in range(ring.p):
            src = (ring.rank - step) % ring.p
            hop = ring.send(kv, tag=0) if step < ring.p - 1 else None
            dk, dv = dkv
            for qs, ks, diagonal in _pairs(ring.rank, src, ring.p, n, ctx.causal, ctx.layout):
                kb, vb = kv[0][:, :, ks], kv[1][:, :, ks]
                P = torch.exp(_scores(q[:, :, qs], kb, diagonal)
                              - lse[:, :, qs].unsqueeze(-1))             # (B, H, c, c)
                dv[:, :, ks] += P.transpose(-1, -2) @ do[:, :, qs]
                dS = P * (do[:, :, qs] @ vb.transpose(-1, -2) - D[:, :, qs].unsqueeze(-1))
                dq[:, :, qs] += dS @ kb * scale
                dk[:, :, ks] += dS.transpose(-1, -2) @ q[:, :, qs] * scale
            # The accumulators follow their block; after step p-1 this hop takes them home
            # (on one rank they are home already).
            dhop = ring.send(dkv, tag=2) if ring.p > 1 else None
            if hop is not None:
                kv = hop.receive()
            if dhop is not None:
                dkv = dhop.receive()
        return dq, *dkv, None, None, None
