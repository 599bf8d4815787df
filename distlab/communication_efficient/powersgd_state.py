"""PowerSGD's arithmetic on one rank (Vogels et al. 2019, Algorithm 1): which tensors are
compressed, and the state of a step, ``P = M Q``, the power step, ``M^ = P Q^T`` and the
error kept for the next step. :mod:`distlab.communication_efficient.powersgd` runs it on
real ranks (and p of them in one process, for its reference); everything here follows
PyTorch's ``powerSGD_hook`` so that the two agree to the bit.
"""
from __future__ import annotations

import numpy as np
import torch


def split_parameters(params, config):
    """``(matrices, vectors)``: the tensors compressed, seen as ``view(shape[0], -1)``, when
    ``(n + m) r · min_compression_rate < nm`` (the hook's ``_should_compress``), in the order
    the hook lays out their Ps and Qs (reverse order, grouped by shape); and the rest."""
    matrices, vectors = [], []
    for w in _bucket_order(params):
        n, m = w.shape[0], w[0].numel()
        worth = (n + m) * _rank(w.shape, config.matrix_rank) * config.min_compression_rate < n * m
        (matrices if w.dim() >= 2 and worth else vectors).append(w)
    shapes = list(dict.fromkeys(w.shape for w in matrices))          # first appearance
    return sorted(matrices, key=lambda w: shapes.index(w.shape)), vectors


def bucket_offsets(params, matrices) -> list[int]:
    """Where each of ``matrices`` starts in DDP's one gradient bucket (elements): every
    parameter end to end in reverse order, as the hook's matrices are views of it."""
    offsets, at = {}, 0
    for w in _bucket_order(params):
        offsets[id(w)] = at
        at += w.numel()
    return [offsets[id(w)] for w in matrices]


def _bucket_order(params) -> list:
    """The parameters as DDP lays them in its bucket: each once, in reverse order."""
    return list(reversed(list({id(w): w for w in params}.values())))


class PowerSGDState:
    """One rank's PowerSGD memory for a list of matrix shapes: the errors, the warm Qs, and
    the generator that draws a first Q the same on every rank. A step is
    ``P = project(grads)``, all-reduce P, ``Q = power_step(P)``, all-reduce Q,
    ``decompress(Q, p)``: :func:`distlab.communication_efficient.powersgd.train` (real
    all-reduces) and its ``reference`` (p states, sums) run the same code. ``offsets``
    (:func:`bucket_offsets`; default end to end) place the matrices in one buffer as in the
    hook's bucket, and the Ps and Qs are views of their flat vectors, as the hook's: the
    same alignment, so the same rounding."""

    def __init__(self, shapes, config, offsets=None):
        self.shapes = [(s[0], int(np.prod(s[1:]))) for s in shapes]       # (n, m) each
        self.ranks = [_rank(s, config.matrix_rank) for s in shapes]
        sizes = [n * m for n, m in self.shapes]
        self.offsets = list(offsets) if offsets is not None else \
            [sum(sizes[:i]) for i in range(len(sizes))]
        self.bucket_numel = max([o + k for o, k in zip(self.offsets, sizes)], default=0)
        self.config = config
        self.rng = np.random.RandomState(config.workload.seed)    # the hook's random_seed
        self.errors: list[torch.Tensor] | None = None
        self.vector_errors: list[torch.Tensor] | None = None
        self.Qs: list[torch.Tensor] | None = None
        self.Ms, self.Ps, self.corrected = [], [], []    # this step's M_r, P, vectors + e

    def project(self, grads: list[torch.Tensor], vectors=()) -> torch.Tensor:
        """This rank's ``P_r = M_r Q`` for every matrix, end to end: ``(sum n_i r_i,)``.

        ``vectors``, the uncompressed gradients, get their errors added in place (the hook
        keeps one error for its whole bucket)."""
        for v, e in zip(vectors, self.vector_errors or []):
            v.add_(e)
        self.corrected = [v.clone() for v in vectors]
        self.Ms = self._in_bucket(grads[0] if grads else None)
        for M, g in zip(self.Ms, grads):
            M.copy_(g.detach().reshape(M.shape))
        for M, e in zip(self.Ms, self.errors or []):       # none before the first step
            M.add_(e)
        if self.Qs is None or not self.config.warm_start:
            self.Qs = self._random_qs(self.Ms[0].device if self.Ms else None)
        for Q in self.Qs:
            orthogonalize(Q, self.config.epsilon)
        return self._products(self.Ms, self.Qs, [n for n, _ in self.shapes])   # (n, r) each

    def power_step(self, P_sum: torch.Tensor) -> torch.Tensor:
        """Given the summed Ps: orthogonalize each, return this rank's ``Q_r = M_r^T P``."""
        self.Ps = _split(P_sum, [n for n, _ in self.shapes], self.ranks)
        for P in self.Ps:
            orthogonalize(P, self.config.epsilon)   # P's scale does not matter: no 1/p
        return self._products([M.T for M in self.Ms], self.Ps, [m for _, m in self.shapes])

    def decompress(self, Q_sum: torch.Tensor, world_size: int,
                   averaged_vectors=()) -> list[torch.Tensor]:
        """Given the summed Qs: keep their mean as the warm Q, return each ``M^ = P Q^T``;
        update the errors ``e_r = M_r - M^`` (and the vectors' from their averages)."""
        self.Qs = _split(Q_sum / world_size, [m for _, m in self.shapes], self.ranks)
        m_hats = self._in_bucket(Q_sum)
        for P, Q, out in zip(self.Ps, self.Qs, m_hats):
            torch.bmm(P.unsqueeze(0), Q.T.unsqueeze(0), out=out.unsqueeze(0))   # (n, m)
        if self.config.error_feedback:
            self.errors = [M - m_hat for M, m_hat in zip(self.Ms, m_hats)]
            self.vector_errors = [c - a for c, a in zip(self.corrected, averaged_vectors)]
        return m_hats

    def _in_bucket(self, like) -> list[torch.Tensor]:
        """Fresh (n, m) matrices, views of one buffer at their bucket offsets."""
        if like is None:
            return []
        bucket = like.new_empty(self.bucket_numel)
        return [bucket[o:o + n * m].view(n, m) for o, (n, m) in zip(self.offsets, self.shapes)]

    def _products(self, As, Bs, rows) -> torch.Tensor:
        """``A_i @ B_i`` for each i as the hook computes them: ``bmm`` into views of one
        flat vector, ``(sum rows_i r_i,)``."""
        if not As:
            return torch.zeros(0)
        flat = As[0].new_empty(sum(k * r for k, r in zip(rows, self.ranks)))
        for A, B, out in zip(As, Bs, _split(flat, rows, self.ranks)):
            torch.bmm(A.unsqueeze(0), B.unsqueeze(0), out=out.unsqueeze(0))
        return flat

    def _random_qs(self, device) -> list[torch.Tensor]:
        # As the hook: one seed per draw from a numpy generator every rank seeds alike,
        # each Q a view of one flat vector.
        g = torch.Generator().manual_seed(int(self.rng.randint(1_000_000_000)))
        qs = _split(torch.empty(sum(m * r for (_, m), r in zip(self.shapes, self.ranks)),
                                device=device), [m for _, m in self.shapes], self.ranks)
        for q in qs:
            q.copy_(torch.randn(*q.shape, generator=g))
        return qs


def orthogonalize(A: torch.Tensor, epsilon: float = 0.0) -> None:
    """Make the columns of the (k, r) matrix ``A`` orthonormal, in place: Gram-Schmidt for
    r <= 2, as the hook (``epsilon`` added to each norm guards all-zero columns), else QR."""
    r = A.shape[1]
    if r > 2:
        A.copy_(torch.linalg.qr(A).Q)
        return
    for i in range(r):
        col = A[:, i:i + 1]                                                # (k, 1)
        col /= col.norm(dim=0, keepdim=True) + epsilon
        if i + 1 < r:
            rest = A[:, i + 1:]
            rest -= (col * rest).sum(0, keepdim=True) * col


def _rank(shape, matrix_rank: int) -> int:
    """The hook's ``min(n, m, r)`` for the tensor seen as ``view(shape[0], -1)``."""
    return min(shape[0], int(np.prod(shape[1:])), matrix_rank)


def _split(vec: torch.Tensor, rows: list[int], ranks: list[int]) -> list[torch.Tensor]:
    """``vec`` cut into (k, r) matrices: views, as the hook's Ps and Qs of its flat vectors."""
    parts = vec.split([k * r for k, r in zip(rows, ranks)])
    return [part.view(k, r) for part, k, r in zip(parts, rows, ranks)]   # (k, r)
