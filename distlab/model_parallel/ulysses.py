"""DeepSpeed-Ulysses: trade the sequence shard for a head shard, attend, trade back.

Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of
Extreme Long Sequence Transformer Models" (arXiv 2309.14509), section 3. Every rank holds
a contiguous p-th of the sequence for all H heads. Attention needs the whole sequence but
each head is independent (as Megatron's head split uses), so one all-to-all turns Q, K and
V from (B, H, T/p, d) into (B, H/p, T, d): rank r sends its tokens of heads ``j·H/p ..
(j+1)·H/p`` to rank j and receives every rank's tokens of its own heads. Full attention then
runs on H/p heads and the reverse all-to-all gives each rank its tokens of all heads back.
The heads must divide evenly: ``H % p == 0`` (refused otherwise, naming it).

Autograd flows through the exchange: the backward of an all-to-all is the reverse
all-to-all of the gradient (:class:`_SwapShards`). The all-to-all is
:mod:`distlab.communication.all_to_all`'s, ``"torch"`` (``dist.all_to_all_single``) or
``"pairwise"`` (p-1 rounds of point-to-point messages), both counted in the ledger.

Cost per attention layer and step (alpha-beta model, n = B·(T/p)·H·d·itemsize, one rank's
Q, K, V or output): forward 4 all-to-alls (Q, K, V in, the output back), each
(p-1)·alpha + (p-1)/p·n·beta; backward 4 more. Unlike ring attention the volume per link
falls as p grows (n/p per peer), but p is bounded by the number of heads, and each rank
still computes attention over the whole sequence: the scores are (B, H/p, T, T), O(T^2/p).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distlab.checks import is_int, require_arg
from distlab.communication.all_to_all import ALL_TO_ALLS
from distlab.model_parallel.ring_attention import full_attention


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                      causal: bool = False, all_to_all: str = "torch") -> torch.Tensor:
    """This rank's shard of full attention, by all-to-all: (B, H, T/p, d) -> (B, H, T/p, d).

    Args:
        q, k, v: this rank's contiguous shard of the sequence (rank r holds tokens
            ``r·T/p .. (r+1)·T/p``), each (B, H, T/p, d), H divisible by the group's size.
        group: the ranks that share the sequence (default: the world).
        causal: mask keys after each query.
        all_to_all: ``"torch"`` or ``"pairwise"`` (:data:`~distlab.communication.all_to_all.ALL_TO_ALLS`).
    """
    p = dist.get_world_size(group)
    check_heads(q.shape[1], p)
    qh, kh, vh = (sequence_to_heads(t, group, all_to_all) for t in (q, k, v))  # (B, H/p, T, d)
    return heads_to_sequence(full_attention(qh, kh, vh, causal), group, all_to_all)


def check_heads(num_heads: int, world_size: int) -> None:
    """Raise ValueError unless the heads split evenly over the ranks."""
    for name, v in (("num_heads", num_heads), ("world_size", world_size)):
        require_arg(name, v, is_int(v) and v >= 1, "an int >= 1")
    if num_heads % world_size:
        raise ValueError(f"num_heads={num_heads} is not divisible by the context-parallel "
                         f"degree {world_size}: Ulysses gives every rank H/p whole heads; "
                         f"use a head count divisible by {world_size} (or ring attention)")


def sequence_to_heads(x: torch.Tensor, group=None, all_to_all: str = "torch") -> torch.Tensor:
    """(B, H, T/p, d) sequence shard -> (B, H/p, T, d) head shard, by one all-to-all."""
    return _SwapShards.apply(x, True, group, _exchange(all_to_all))


def heads_to_sequence(x: torch.Tensor, group=None, all_to_all: str = "torch") -> torch.Tensor:
    """(B, H/p, T, d) head shard -> (B, H, T/p, d) sequence shard: the reverse all-to-all."""
    return _SwapShards.apply(x, False, group, _exchange(all_to_all))


def _exchange(name: str):
    require_arg("all_to_all", name, name in ALL_TO_ALLS, f"one of {tuple(ALL_TO_ALLS)}")
    # Equal splits on every rank by construction: no all-gather of split sizes to check.
    return lambda x, group: ALL_TO_ALLS[name](x, group=group, check=False)


class _SwapShards(torch.autograd.Function):
    """An all-to-all whose backward is the reverse all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x, to_heads, group, all_to_all):
        ctx.to_heads, ctx.group, ctx.all_to_all = to_heads, group, all_to_all
        return _swap(x, to_heads, group, all_to_all)

    @staticmethod
    def backward(ctx, grad):
        return _swap(grad, not ctx.to_heads, ctx.group, ctx.all_to_all), None, None, None


def _swap(x: torch.Tensor, to_heads: bool, group, all_to_all) -> torch.Tensor:
    # Block j of the first dimension goes to rank j; block j of the result came from it.
    p = dist.get_world_size(group)
    if to_heads:
        B, H, n, d = x.shape
        send = x.reshape(B, p, H // p, n, d).transpose(0, 1)          # (p, B, H/p, T/p, d)
        got = all_to_all(send.contiguous(), group)      # got[j]: rank j's tokens, my heads
        return got.permute(1, 2, 0, 3, 4).reshape(B, H // p, p * n, d)   # (B, H/p, T, d)
    B, h, T, d = x.shape
    send = x.reshape(B, h, p, T // p, d).permute(2, 0, 1, 3, 4)      # (p, B, H/p, T/p, d)
    got = all_to_all(send.contiguous(), group)         # got[j]: my tokens, rank j's heads
    return got.transpose(0, 1).reshape(B, p * h, T // p, d)          # (B, H, T/p, d)

