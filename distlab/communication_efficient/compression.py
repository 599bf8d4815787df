"""Gradient compression with error feedback: send fewer bytes, remember what was not sent.

In data-parallel training every rank sends its whole gradient at every step. A compressor
``C`` replaces the vector ``x`` (n float32, 4n bytes) by a much smaller *payload*; the
receiver rebuilds an approximation ``C(x)``. Alone, a biased compressor such as top-k or
sign can stall or diverge. **Error feedback** fixes it (Seide et al. 2014, "1-bit SGD";
Stich, Cordonnier and Jaggi 2018, "Sparsified SGD with memory"; Karimireddy et al. 2019,
"Error feedback fixes SignSGD", algorithm 2): each rank keeps a residual ``e`` of what it
did not send and adds it to the next message::

    c = x + e            # correct the new vector with what is still owed
    send C(c)            # the payload
    e = c - C(c)         # the residual carries exactly what was not sent

so nothing is ever lost, only delayed.

===========  ==========================================  =================================
compressor   payload of one rank (n coordinates)         bytes of the payload
===========  ==========================================  =================================
``none``     the float32 vector                           4n
``topk``     the k largest-magnitude values, indices      8k (float32 value, int32 index)
``randomk``  k values at indices drawn from a seed that   4k (indices are never sent)
             every rank shares (Stich et al. 2018)
``sign``     one bit per coordinate and one scale         ceil(n/8) + 4
             ``||c||_1 / n`` (Karimireddy et al. 2019)
``fp16``     the vector in half precision                 2n
``bf16``     the vector in bfloat16                       2n
===========  ==========================================  =================================

How the ranks combine payloads decides the communication cost (alpha-beta model, p ranks,
payload of b bytes):

* payloads that add up coordinate-wise (``none``, ``fp16``, ``bf16``, and ``randomk``,
  whose ranks share their indices) go through one **ring all-reduce**:
  ``2(p-1) alpha + 2(p-1)/p b beta``;
* the others (``topk``: every rank picks different indices; ``sign``: the sum of signs is
  not a sign) go through one **ring all-gather** and every rank decodes all p payloads:
  ``(p-1) alpha + (p-1) b beta``. The all-gather grows with p, which is why top-k pays off
  when k is much smaller than n/p.

The naive way to "compress", zeroing all but k coordinates and all-reducing the dense
vector, saves nothing: the bytes on the wire are what count, and they are counted by
:mod:`distlab.comm`'s ledger like every other message, so :func:`bytes_sent_per_call`
is exactly what the ledger records.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication import alpha_beta, collectives

METHODS = ("none", "topk", "randomk", "sign", "fp16", "bf16")


class Compressor:
    """A compressor: ``compress`` a float32 vector into a payload, ``decompress`` it back.

    ``summable`` compressors' payloads add up coordinate-wise (an all-reduce combines them);
    the others are all-gathered.
    """
    name = "none"
    summable = True

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """The payload for the 1-D float32 tensor ``x``: the one tensor that is sent."""
        return x.clone()

    def decompress(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """The 1-D float32 vector of ``numel`` coordinates that ``payload`` stands for."""
        return payload.float()

    def payload_bytes(self, numel: int) -> int:
        """Exact size in bytes of the payload of a vector of ``numel`` coordinates."""
        return 4 * numel

    def __repr__(self):
        return f"{type(self).__name__}()"


class TopK(Compressor):
    """Keep the k = max(1, round(ratio·n)) largest-magnitude coordinates.

    Payload: one int32 tensor of 2k entries, the float32 values (bit-cast to int32) then
    their int32 indices, so values and indices travel in one message.
    """
    name, summable = "topk", False

    def __init__(self, ratio: float = 0.01):
        self.ratio = ratio
        require(self, "ratio", is_number(ratio) and 0 < ratio <= 1, "(0, 1]")

    def num_kept(self, numel: int) -> int:
        return max(1, min(numel, round(self.ratio * numel)))

    def compress(self, x):
        k = self.num_kept(x.numel())
        indices = x.abs().topk(k, sorted=False).indices
        return torch.cat([x[indices].view(torch.int32), indices.to(torch.int32)])  # (2k,)

    def decompress(self, payload, numel):
        k = payload.numel() // 2
        values, indices = payload[:k].view(torch.float32), payload[k:].long()
        return torch.zeros(numel, device=payload.device).index_put_((indices,), values)

    def payload_bytes(self, numel):
        return 8 * self.num_kept(numel)

    def __repr__(self):
        return f"TopK(ratio={self.ratio:g})"


class RandomK(Compressor):
    """Keep k = max(1, round(ratio·n)) coordinates drawn at random, the same on every rank.

    Every rank seeds the draw with ``(seed, number of calls so far)``, so the indices are
    known everywhere without sending them and the payloads (the k values) add up: one
    all-reduce of 4k bytes. Unscaled: with error feedback the dropped part is kept in the
    residual rather than compensated by an n/k factor (Stich et al. 2018, section 2).
    """
    name, summable = "randomk", True

    def __init__(self, ratio: float = 0.01, seed: int = 0):
        self.ratio, self.seed, self.calls = ratio, seed, 0
        require(self, "ratio", is_number(ratio) and 0 < ratio <= 1, "(0, 1]")
        require(self, "seed", is_int(seed) and 0 <= seed <= 2 ** 31, "integers 0..2^31")
        self._indices: torch.Tensor | None = None

    def num_kept(self, numel: int) -> int:
        return max(1, min(numel, round(self.ratio * numel)))

    def compress(self, x):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        self._indices = (torch.randperm(x.numel(), generator=g)[: self.num_kept(x.numel())]
                         .to(x.device))
        return x[self._indices].clone()                     # (k,)

    def decompress(self, payload, numel):
        # The indices of the latest compress() call: the same on every rank.
        return torch.zeros(numel, device=payload.device).index_put_((self._indices,),
                                                                     payload.float())

    def payload_bytes(self, numel):
        return 4 * self.num_kept(numel)

    def __repr__(self):
        return f"RandomK(ratio={self.ratio:g}, seed={self.seed})"


class Sign(Compressor):
    """1-bit compression with scaling: ``C(x) = (||x||_1 / n) · sign(x)``.

    The scale keeps the compressed vector's l1 norm equal to x's (Karimireddy et al. 2019,
    section 3). Payload: one uint8 tensor, the signs packed 8 to a byte (bit set means
    x >= 0), then the float32 scale's 4 bytes.
    """
    name, summable = "sign", False
    _weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)

    def compress(self, x):
        n = x.numel()
        bits = torch.zeros(8 * math.ceil(n / 8), dtype=torch.uint8, device=x.device)
        bits[:n] = (x >= 0).to(torch.uint8)
        weights = self._weights.to(x.device)
        packed = (bits.view(-1, 8) * weights).sum(1, dtype=torch.uint8)    # (ceil(n/8),)
        scale = (x.abs().sum() / n).reshape(1).float()
        return torch.cat([packed, scale.view(torch.uint8)])

    def decompress(self, payload, numel):
        packed, scale = payload[:-4], payload[-4:].clone().view(torch.float32)
        bits = (packed.unsqueeze(1) & self._weights.to(payload.device)).ne(0).reshape(-1)[:numel]
        return torch.where(bits, scale, -scale)

    def payload_bytes(self, numel):
        return math.ceil(numel / 8) + 4


class LowPrecision(Compressor):
    """Round to a 16-bit float format (``torch.float16`` or ``torch.bfloat16``): 2n bytes.

    fp16 keeps 10 mantissa bits but overflows above 65,504; bf16 keeps float32's range with
    only 7 mantissa bits (Micikevicius et al. 2018; Kalamkar et al. 2019).
    """
    summable = True

    def __init__(self, dtype: torch.dtype = torch.float16):
        self.dtype = dtype
        require(self, "dtype", dtype in (torch.float16, torch.bfloat16),
                "torch.float16 or torch.bfloat16")
        self.name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

    def compress(self, x):
        return x.to(self.dtype)

    def payload_bytes(self, numel):
        return 2 * numel

    def __repr__(self):
        return f"LowPrecision({self.dtype})"


def make_compressor(method: str, ratio: float = 0.01, seed: int = 0) -> Compressor:
    """The compressor called ``method`` (one of ``METHODS``); ``ratio`` (in (0, 1]) and
    ``seed`` (0..2^31) are used by top-k and random-k, and checked whatever the method."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a compressor; allowed {METHODS}")
    require_arg("ratio", ratio, is_number(ratio) and 0 < ratio <= 1, "(0, 1]")
    require_arg("seed", seed, is_int(seed) and 0 <= seed <= 2 ** 31, "integers 0..2^31")
    return {"none": Compressor, "topk": lambda: TopK(ratio),
            "randomk": lambda: RandomK(ratio, seed), "sign": Sign,
            "fp16": lambda: LowPrecision(torch.float16),
            "bf16": lambda: LowPrecision(torch.bfloat16)}[method]()


def compress_with_feedback(x: torch.Tensor, compressor: Compressor,
                           residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Error feedback on one rank: returns ``(payload, sent)`` and updates ``residual``.

    ``sent = decompress(payload)`` is what the payload stands for; afterwards
    ``residual = x + old residual - sent`` exactly. ``residual=None``: no error feedback.
    """
    corrected = x if residual is None else x + residual
    payload = compressor.compress(corrected)
    sent = compressor.decompress(payload, x.numel())
    if residual is not None:
        residual.copy_(corrected - sent)
    return payload, sent


def all_reduce_compressed(x: torch.Tensor, compressor: Compressor,
                          residual: torch.Tensor | None = None, group=None, *,
                          ring: bool = False) -> torch.Tensor:
    """The mean over the group of every rank's ``x``, each compressed with error feedback.

    Args:
        x: this rank's 1-D float32 vector (left unchanged).
        compressor: how to compress it; every rank uses the same kind.
        residual: this rank's error-feedback memory, updated in place (None: no feedback).
        group: the process group (None: the world).
        ring: combine the payloads with distlab's own ring all-reduce or all-gather, built
            from point-to-point sends (:mod:`distlab.communication.collectives`), so that
            the ledger counts the bytes really sent; by default the built-in collectives,
            which the ledger books at their model bytes.

    Returns:
        ``(1/p) sum_r C(x_r + e_r)``, the same on every rank. Cost: one all-reduce of the
        payload when ``compressor.summable``, else one all-gather (see the module docstring);
        :func:`bytes_sent_per_call` gives the bytes.
    """
    p = dist.get_world_size(group)
    payload, _ = compress_with_feedback(x, compressor, residual)
    if compressor.summable:                          # payloads add up coordinate-wise
        if ring:
            collectives.ring_all_reduce(payload, group, check=False)
        else:
            comm.all_reduce(payload, group=group)
        return compressor.decompress(payload, x.numel()) / p
    if ring:
        # Rank r's payload is chunk r of one flat buffer, which the ring fills in place.
        flat = payload.new_empty(p * payload.numel())
        gathered = flat.view(p, -1)                  # (p, payload numel)
        gathered[dist.get_rank(group)] = payload
        collectives.ring_all_gather(flat, group, check=False)
    else:
        gathered = [torch.empty_like(payload) for _ in range(p)]
        comm.all_gather(gathered, payload, group=group)
    return torch.stack([compressor.decompress(q, x.numel()) for q in gathered]).mean(0)


def bytes_sent_per_call(compressor: Compressor, numel: int, world_size: int) -> int:
    """Bytes one rank sends in :func:`all_reduce_compressed` of ``numel`` coordinates.

    The ledger's ring volumes (:mod:`distlab.communication.alpha_beta`): ``2(p-1)/p·b`` for
    an all-reduce of the b-byte payload (rounded down, as :func:`distlab.comm.all_reduce`
    counts), ``(p-1)·b`` for an all-gather of p payloads.
    """
    require_arg("compressor", compressor, isinstance(compressor, Compressor), "a Compressor")
    require_arg("numel", numel, is_int(numel) and numel >= 1, "integers >= 1")
    require_arg("world_size", world_size, is_int(world_size) and world_size >= 1, "integers >= 1")
    b, p = compressor.payload_bytes(numel), world_size
    if compressor.summable:
        return alpha_beta.ring_all_reduce_bytes(b, p)
    return alpha_beta.ring_all_gather_bytes(p * b, p)
