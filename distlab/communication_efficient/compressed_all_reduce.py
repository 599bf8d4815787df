"""A compressed all-reduce whose bytes per rank do not grow with the number of ranks.

Top-k and sign payloads do not add up, so
:func:`distlab.communication_efficient.compression.all_reduce_compressed` all-gathers them:
every rank receives, and in a ring forwards, all p payloads, ``(p-1) b`` bytes for a payload
of b bytes. Tang et al. 2021 ("1-bit Adam: communication efficient large-scale training
with Adam's convergence speed", arXiv 2102.02888; DeepSpeed's ``compressed_allreduce``) cut
the vector into p chunks and let rank j reduce chunk j, with error feedback on both sides,
in two phases::

    phase 1 (all-to-all):  rank r compresses each chunk j of x_r + e_r (worker error e_r)
                           and sends its payload to rank j;
                           rank j averages the p decompressed chunks j:  a_j
    phase 2 (all-gather):  rank j compresses a_j + s_j (its server error s_j) and sends
                           the payload to every rank; every rank decompresses all p chunks

so every rank ends with the same vector, and what either compression missed is carried
into the next call (``e_r``, ``s_j``), as with one-sided error feedback
(:mod:`distlab.communication_efficient.compression`). Both phases are built from
point-to-point ``comm.isend`` / ``comm.irecv`` (the ledger counts exactly the bytes sent);
``batch_isend_irecv`` hangs on gloo.

Cost (alpha-beta model, p ranks, n coordinates, ``b(k)`` the payload bytes of k
coordinates; :func:`bytes_per_rank`): each rank sends ``p-1`` chunk payloads in each phase,
``2(p-1) alpha + 2(p-1) b(n/p) beta``. For the sign compressor ``b(k) = k/8 + 4``: about
``2(p-1)/p · n/8`` bytes, at most n/4 whatever p, against ``(p-1)(n/8 + 4)`` for the
all-gather. The all-gather is smaller at p = 2 (by 4 bytes of scale); the two phases win
once ``n/8 · (1 - 2/p) > 4``, from p = 3 on for n above about 120 coordinates
(:func:`crossover_world_size`; 2^20 floats: 0.67x the all-gather's bytes at p = 3, 0.25x
at 8, 0.03x at 64).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, require_arg
from distlab.communication_efficient.compression import (Compressor, RandomK, Sign,
                                                         bytes_sent_per_call,
                                                         compress_with_feedback)

METHODS = ("all_gather", "two_phase")
"""Today's all-gather of every payload, and the two-phase compressed all-reduce."""


def compressed_all_reduce(x: torch.Tensor, compressor: Compressor,
                          residual: torch.Tensor | None = None,
                          server_residual: torch.Tensor | None = None,
                          group=None) -> torch.Tensor:
    """The mean over the group of every rank's ``x``, by the two-phase compressed all-reduce.

    Args:
        x: this rank's 1-D float32 vector, at least one coordinate per rank (unchanged).
        compressor: how to compress a chunk (any but random-k, whose indices are only those
            of its latest call); every rank uses the same kind.
        residual: this rank's worker error, as long as ``x``, updated in place (None: none).
        server_residual: the server error of the chunk this rank reduces, of
            ``chunk_sizes(x.numel(), p)[rank]`` coordinates, updated in place (None: none).
        group: the process group (None: the world).

    Returns:
        The decompressed average, the same on every rank: equal to :func:`simulate`.
    """
    p, me, sizes = _check(x, compressor, residual, server_residual, group)
    payloads = compress_chunks(x, compressor, residual, sizes)
    # Phase 1: chunk j's payload goes to rank j; every rank's payload of my chunk comes here.
    mine = [payloads[me] if r == me else torch.empty_like(payloads[me]) for r in range(p)]
    _exchange({j: payloads[j] for j in range(p) if j != me},
              {r: mine[r] for r in range(p) if r != me}, group)
    reduced = reduce_chunk(mine, compressor, sizes[me], server_residual)
    # Phase 2: my reduced chunk goes to everyone; rank j's reduced chunk j comes from j.
    gathered = [reduced if j == me else torch.empty_like(payloads[j]) for j in range(p)]
    _exchange({r: reduced for r in range(p) if r != me},
              {j: gathered[j] for j in range(p) if j != me}, group)
    return torch.cat([compressor.decompress(q, k) for q, k in zip(gathered, sizes)])


def simulate(xs: list[torch.Tensor], compressor: Compressor,
             residuals: list[torch.Tensor] | None = None,
             server_residuals: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One process plays the p = ``len(xs)`` ranks of :func:`compressed_all_reduce`: rank r's
    vector ``xs[r]``, worker error ``residuals[r]`` and server error ``server_residuals[r]``
    (updated in place, as on the ranks). Returns the average every rank would get."""
    p = len(xs)
    require_arg("xs", p, p >= 1, "a non-empty list of vectors, one per rank")
    sizes = chunk_sizes(xs[0].numel(), p)
    residuals = residuals or [None] * p
    server_residuals = server_residuals or [None] * p
    payloads = [compress_chunks(x, compressor, e, sizes) for x, e in zip(xs, residuals)]
    reduced = [reduce_chunk([payloads[r][j] for r in range(p)], compressor, sizes[j],
                            server_residuals[j]) for j in range(p)]
    return torch.cat([compressor.decompress(q, k) for q, k in zip(reduced, sizes)])


def compress_chunks(x: torch.Tensor, compressor: Compressor, residual: torch.Tensor | None,
                    sizes: list[int]) -> list[torch.Tensor]:
    """Phase 1 on one rank: the payload of each chunk of ``x``, with the worker error
    (each chunk compressed alone, so it has its own scale)."""
    errors = residual.split(sizes) if residual is not None else [None] * len(sizes)
    return [compress_with_feedback(chunk, compressor, e)[0]    # e: a view, updated in place
            for chunk, e in zip(x.split(sizes), errors)]


def reduce_chunk(payloads: list[torch.Tensor], compressor: Compressor, numel: int,
                 server_residual: torch.Tensor | None) -> torch.Tensor:
    """Phase 1's end and phase 2's start on the rank reducing a chunk: the mean of the p
    decompressed payloads, compressed again with the server error."""
    mean = torch.stack([compressor.decompress(q, numel) for q in payloads]).mean(0)
    return compress_with_feedback(mean, compressor, server_residual)[0]


def chunk_sizes(numel: int, world_size: int) -> list[int]:
    """The coordinates of each rank's chunk: ``torch.tensor_split``'s sizes (the first
    ``numel % world_size`` chunks one longer)."""
    require_arg("numel", numel, is_int(numel) and numel >= 1, "integers >= 1")
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= numel,
                f"integers 1..numel={numel} (every rank reduces at least one coordinate)")
    base, extra = divmod(numel, world_size)
    return [base + (r < extra) for r in range(world_size)]


def bytes_per_rank(method: str, numel: int, world_size: int,
                   compressor: Compressor | None = None, rank: int = 0) -> int:
    """Bytes rank ``rank`` sends to average ``numel`` coordinates over ``world_size`` ranks.

    ``method`` ``"all_gather"``: today's
    :func:`~distlab.communication_efficient.compression.all_reduce_compressed`
    (:func:`~distlab.communication_efficient.compression.bytes_sent_per_call`);
    ``"two_phase"``: :func:`compressed_all_reduce`, the payloads of the other ranks' chunks
    in phase 1 plus ``p-1`` copies of its own chunk's in phase 2. ``compressor``: default
    :class:`~distlab.communication_efficient.compression.Sign`.
    """
    require_arg("method", method, method in METHODS, f"one of {METHODS}")
    compressor = Sign() if compressor is None else compressor
    sizes = chunk_sizes(numel, world_size)
    require_arg("rank", rank, is_int(rank) and 0 <= rank < world_size,
                f"integers 0..{world_size - 1}")
    if method == "all_gather":
        return bytes_sent_per_call(compressor, numel, world_size)
    b = compressor.payload_bytes
    return (sum(b(k) for j, k in enumerate(sizes) if j != rank)
            + (world_size - 1) * b(sizes[rank]))


def crossover_world_size(numel: int, compressor: Compressor | None = None) -> int | None:
    """The smallest world size at which the two-phase all-reduce sends fewer bytes than the
    all-gather on every rank (None if none up to ``launcher.MAX_WORLD_SIZE``)."""
    for p in range(2, min(numel, launcher.MAX_WORLD_SIZE) + 1):
        two_phase = max(bytes_per_rank("two_phase", numel, p, compressor, r) for r in range(p))
        if two_phase < bytes_per_rank("all_gather", numel, p, compressor):
            return p
    return None


def _check(x, compressor, residual, server_residual, group) -> tuple[int, int, list[int]]:
    """``(world size, rank, chunk sizes)``, once every argument is known to be usable."""
    require_arg("compressor", compressor, isinstance(compressor, Compressor)
                and not isinstance(compressor, RandomK),
                "a Compressor other than RandomK (its decompress knows only its latest "
                "call's indices)")
    p, me = dist.get_world_size(group), dist.get_rank(group)
    require_arg("x", tuple(x.shape), x.dim() == 1 and x.numel() >= p,
                f"a 1-D vector of at least world_size={p} coordinates")
    sizes = chunk_sizes(x.numel(), p)
    for name, t, n in (("residual", residual, x.numel()),
                       ("server_residual", server_residual, sizes[me])):
        if t is not None:
            require_arg(name, tuple(t.shape), tuple(t.shape) == (n,), f"shape ({n},)")
    return p, me, sizes


def _exchange(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], group) -> None:
    """Post every receive and send at once (group ranks), then wait for all: no order in
    which two ranks could each wait for the other."""
    def global_rank(r):
        return r if group is None else dist.get_global_rank(group, r)
    works = [comm.irecv(buf, global_rank(src), group=group) for src, buf in recvs.items()]
    works += [comm.isend(t, global_rank(dst), group=group) for dst, t in sends.items()]
    for work in works:
        work.wait()

