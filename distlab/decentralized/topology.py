"""Who talks to whom in decentralized training: communication graphs and gossip averaging.

Without a server and without an all-reduce, each rank ``i`` averages only with its
neighbours in a graph, with the weights of a **mixing matrix** ``W``: one gossip round is

    x_i  <-  sum_j W_ij x_j          (j = i or a neighbour of i)

``W`` is symmetric and doubly stochastic (rows and columns sum to 1), so the mean over ranks
is unchanged by a round, and repeated rounds drive every ``x_i`` to that mean at a rate set
by the **spectral gap** ``1 - |lambda_2(W)|``: the distance to consensus shrinks by about
``|lambda_2|^2`` per round (Boyd et al. 2006, "Randomized gossip algorithms"; Lian et al.
2017, arXiv 1705.09056, section 3). The graphs here:

* :func:`ring` - 2 neighbours per rank; gap ``O(1/n^2)``: cheap and slow to mix;
* :func:`torus` - a 2-D ``rows x cols`` torus, 4 neighbours; gap ``O(1/n)`` for a square one;
* :func:`exponential` - neighbours at distance ``±2^k`` (Assran et al. 2019, "Stochastic
  Gradient Push", section 5; Lian et al. 2018): ``O(log n)`` neighbours, a gap that stays
  large as ``n`` grows.

The weights are **Metropolis-Hastings**: ``W_ij = 1 / (1 + max(d_i, d_j))`` for neighbours,
``W_ii = 1 - sum_{j != i} W_ij`` (Xiao and Boyd 2004). All graphs here are regular (every rank
has the same degree ``d``), where that is the uniform weight ``1/(d+1)`` on each neighbour
and on the rank itself.

Communication cost of one :func:`gossip_average` per rank, for ``n`` bytes and degree ``d``:
``d`` sends and ``d`` receives of ``n`` bytes, ``d·(alpha + n·beta)`` with one port, whatever
the number of ranks (a ring all-reduce moves ``2(p-1)/p·n`` but pays ``2(p-1)·alpha``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, require, require_arg

TOPOLOGIES = ("ring", "torus", "exponential")
"""The names :func:`build` accepts."""


@dataclass(frozen=True)
class Topology:
    """An undirected communication graph on ranks ``0..world_size-1``."""
    name: str
    """What it is, for plot labels (``"ring"``, ``"torus 2x3"``, ...)."""
    world_size: int
    """Number of ranks, >= 1."""
    edges: tuple[tuple[int, ...], ...]
    """``edges[i]``: the neighbours of rank ``i``, sorted, without ``i`` itself."""

    def __post_init__(self):
        require(self, "world_size", is_int(self.world_size) and self.world_size >= 1,
                "an int >= 1")
        n = self.world_size
        require(self, "edges", len(self.edges) == n
                and all(i not in nb and all(is_int(j) and 0 <= j < n and i in self.edges[j]
                                            for j in nb)
                        for i, nb in enumerate(self.edges)),
                f"{n} tuples of neighbours in 0..{n - 1}, symmetric, without self-loops")

    def neighbours(self, rank: int) -> tuple[int, ...]:
        """The ranks that ``rank`` sends to and receives from in a gossip round."""
        require_arg("rank", rank, is_int(rank) and 0 <= rank < self.world_size,
                    f"an int in 0..{self.world_size - 1}")
        return self.edges[rank]

    def weights(self, rank: int) -> dict[int, float]:
        """Row ``rank`` of the mixing matrix, as ``{j: W_ij}`` for ``j`` = ``rank`` and its
        neighbours (Metropolis-Hastings), in the order a gossip round adds them up."""
        nb = self.neighbours(rank)
        w = {j: 1.0 / (1 + max(len(nb), len(self.edges[j]))) for j in nb}
        return {rank: 1.0 - sum(w.values()), **w}

    def mixing_matrix(self) -> torch.Tensor:
        """``W`` (float64, ``(n, n)``): symmetric, doubly stochastic, Metropolis-Hastings."""
        n = self.world_size
        W = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j, w in self.weights(i).items():
                W[i, j] = w
        return W

    def spectral_gap(self) -> float:
        """``1 - |lambda_2|``, the second largest eigenvalue modulus of ``W`` (1 for n = 1)."""
        if self.world_size == 1:
            return 1.0
        moduli = torch.linalg.eigvalsh(self.mixing_matrix()).abs().sort(descending=True).values
        return float(1.0 - moduli[1])

    @property
    def degree(self) -> int:
        """Neighbours per rank (the graphs here are regular)."""
        return max(len(nb) for nb in self.edges)


def ring(n: int) -> Topology:
    """Rank ``i`` talks to ``i-1`` and ``i+1`` (mod ``n``); one neighbour at n = 2, none at 1."""
    require_arg("n", n, is_int(n) and n >= 1, "an int >= 1")
    return _circulant("ring", n, (1, -1))


def torus(rows: int, cols: int) -> Topology:
    """A 2-D torus: rank ``r·cols + c`` talks to its 4 grid neighbours, wrapping around.

    A side of 2 gives one neighbour along it (``+1`` and ``-1`` are the same rank), a side
    of 1 none, so ``torus(1, n)`` is ``ring(n)``.
    """
    require_arg("rows", rows, is_int(rows) and rows >= 1, "an int >= 1")
    require_arg("cols", cols, is_int(cols) and cols >= 1, "an int >= 1")
    edges = []
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        nb = {((r + dr) % rows) * cols + (c + dc) % cols
              for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))}
        edges.append(tuple(sorted(nb - {i})))
    return Topology(f"torus {rows}x{cols}", rows * cols, tuple(edges))


def exponential(n: int) -> Topology:
    """Rank ``i`` talks to ``i ± 2^k`` (mod ``n``) for every ``2^k < n``."""
    require_arg("n", n, is_int(n) and n >= 1, "an int >= 1")
    offsets, k = [], 1
    while k < n:
        offsets += [k, -k]
        k *= 2
    return _circulant("exponential", n, offsets)


def build(name: str, world_size: int) -> Topology:
    """The topology called ``name`` (one of :data:`TOPOLOGIES`) on ``world_size`` ranks; the
    torus is the most nearly square ``rows x cols`` with ``rows <= cols``."""
    require_arg("name", name, name in TOPOLOGIES, f"one of {TOPOLOGIES}")
    require_arg("world_size", world_size, is_int(world_size) and world_size >= 1,
                "an int >= 1")
    if name == "ring":
        return ring(world_size)
    if name == "exponential":
        return exponential(world_size)
    rows = max(r for r in range(1, int(world_size ** 0.5) + 1) if world_size % r == 0)
    return torus(rows, world_size // rows)


def gossip_average(tensor: torch.Tensor, topology: Topology, rank: int, group=None,
                   network=None) -> torch.Tensor:
    """One gossip round, in place: ``x_rank <- sum_j W_rank,j x_j`` over ``rank`` and its
    neighbours; call it on every rank of ``group`` at once. Returns ``tensor``.

    Each rank sends its tensor to every neighbour and receives each neighbour's
    (``comm.isend``/``comm.irecv``, so the ledger counts ``degree·n`` bytes sent), then mixes.
    With a :class:`~distlab.communication.netsim.Network`, each send first sleeps its injected
    delay, one after another (one port per rank). Cost: ``d·(alpha + n·beta)``.

    Args:
        tensor: this rank's ``x``; every rank's has the same shape and dtype.
        topology: the graph, with ``world_size`` the size of ``group``.
        rank: this rank in ``group``.
        group: the process group (None: the world).
        network: an injected network, or None.
    """
    p = dist.get_world_size(group)
    if topology.world_size != p:
        raise ValueError(f"gossip_average: topology.world_size={topology.world_size} but the "
                         f"group has {p} ranks")
    neighbours = topology.neighbours(rank)
    received = {j: torch.empty_like(tensor) for j in neighbours}
    # Receives are posted first so no send waits for a matching receive to exist.
    works = [comm.irecv(received[j], _global(j, group), group=group) for j in neighbours]
    mine = tensor.detach().clone()   # what the neighbours must get: x before mixing
    for j in neighbours:
        if network is not None:
            network.inject(comm.nbytes(mine), src=rank, dst=j)
        works.append(comm.isend(mine, _global(j, group), group=group))
    for w in works:
        w.wait()
    return mix(tensor, topology, rank, {rank: mine, **received})


def mix(out: torch.Tensor, topology: Topology, rank: int, values: dict) -> torch.Tensor:
    """``out <- sum_j W_rank,j values[j]``, summed in the order of :meth:`Topology.weights`,
    so a single process that simulates every rank gets the same bits as the real run."""
    acc = None
    for j, w in topology.weights(rank).items():
        term = values[j] * w
        acc = term if acc is None else acc + term
    with torch.no_grad():
        out.copy_(acc)
    return out


def _circulant(name: str, n: int, offsets) -> Topology:
    """The graph where rank ``i`` talks to ``i + o`` (mod ``n``) for each offset ``o``."""
    edges = tuple(tuple(sorted({(i + o) % n for o in offsets} - {i})) for i in range(n))
    return Topology(name, n, edges)


def _global(rank: int, group) -> int:
    """The world rank of ``group``'s rank ``rank`` (point-to-point calls take world ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)
