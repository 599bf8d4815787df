"""Data for the labs, all available offline, and how it is split across ranks.

* :func:`linear_regression` - a synthetic least-squares problem with a known answer.
* :func:`digits` - the 8x8 handwritten digits (1,797 images, UCI via scikit-learn, shipped in
  ``distlab/problems/datasets``: nothing is downloaded, nothing but numpy reads it).
* :func:`sparse_classification` - a high-dimensional sparse logistic-regression problem,
  where Hogwild!'s lock-free updates rarely collide.
* :func:`shard_indices` - the rank's shard of an epoch, like ``DistributedSampler``.

Every function is seeded and returns the same tensors on every rank, so ranks can shard
without communicating.
"""
from __future__ import annotations

import functools
import gzip
import io
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch


@dataclass(frozen=True)
class Dataset:
    """Train and held-out tensors: ``X`` (N, D) float32 and ``y`` (N,) or (N, 1)."""
    X: torch.Tensor
    y: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int = 0
    """0 for regression."""

    @property
    def num_features(self) -> int:
        return self.X.shape[1]


def linear_regression(n: int = 1024, d: int = 16, noise: float = 0.1, seed: int = 0,
                      n_val: int = 256) -> Dataset:
    """y = X w* + noise, with X ~ N(0, 1): the model is ``nn.Linear(d, 1)``.

    The optimum is known, so students can check convergence against it.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, 1, generator=g)
    X = torch.randn(n + n_val, d, generator=g)
    y = X @ w + 0.5 + noise * torch.randn(n + n_val, 1, generator=g)
    return Dataset(X[:n], y[:n], X[n:], y[n:])


def digits(seed: int = 0, val_fraction: float = 0.2) -> Dataset:
    """The 8x8 handwritten digits: 64 pixel features scaled to [0, 1], 10 classes."""
    X, y = _digits_table()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    n_val = int(len(y) * val_fraction)
    return Dataset(X[n_val:], y[n_val:], X[:n_val], y[:n_val], num_classes=10)


@functools.lru_cache(maxsize=1)
def _digits_table() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped table, read once per process: X (1797, 64) in [0, 1], y (1797,)."""
    raw = resources.files("distlab.problems").joinpath("datasets", "digits.csv.gz").read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.float32)
    return torch.from_numpy(table[:, :-1] / 16.0), torch.from_numpy(table[:, -1]).long()


def sparse_classification(n: int = 4096, d: int = 2000, nnz: int = 10, seed: int = 0,
                          n_val: int = 512) -> Dataset:
    """Binary labels from a sparse linear rule; each example has ``nnz`` non-zero features.

    Stored dense (float32) for simplicity; the gradient of one example touches only its
    ``nnz`` coordinates, which is the setting of Hogwild! (Niu et al. 2011, section 2).
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    X = torch.zeros(n + n_val, d)
    cols = torch.stack([torch.randperm(d, generator=g)[:nnz] for _ in range(n + n_val)])
    X.scatter_(1, cols, torch.randn(n + n_val, nnz, generator=g).abs() + 0.1)
    y = (X @ w > 0).float()
    return Dataset(X[:n], y[:n], X[n:], y[n:], num_classes=2)


def shard_indices(n: int, rank: int, world_size: int, epoch: int = 0, seed: int = 0,
                  shuffle: bool = True, drop_last: bool = False) -> torch.Tensor:
    """This rank's disjoint shard of ``range(n)`` for ``epoch``, as ``DistributedSampler``.

    Every rank draws the same permutation (seeded by ``seed + epoch``) and takes every
    ``world_size``-th index starting at ``rank``. With ``drop_last=False`` uneven splits
    leave the first ``n % world_size`` ranks one example more (no padding, no duplicates).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
             if shuffle else torch.arange(n))
    if drop_last:
        order = order[: n - n % world_size]
    return order[rank::world_size]


def label_skewed_shards(y: torch.Tensor, world_size: int, classes_per_rank: int = 2,
                        seed: int = 0) -> list[torch.Tensor]:
    """A non-IID split: each of ``world_size`` shards holds exactly ``classes_per_rank`` labels.

    McMahan et al. 2017 (section 3, "pathological non-IID") sort the examples by label, cut
    them into ``world_size * classes_per_rank`` pieces and deal every client a few. Cut
    blindly, a piece straddles two labels and a client may get two pieces of one label, so
    "2 labels per client" gives 1 to 4. Here the pieces are cut inside each label: with c =
    ``classes_per_rank`` and the labels shuffled by ``seed`` into a ring of L, the k-th client
    (in a seeded order) takes the c consecutive labels from position k·c on, which are
    distinct since c <= L; each label is so held by floor or ceil of ``world_size·c / L``
    shards, and its examples are split evenly between them. No shard is empty and no example
    is in two; when ``world_size·c < L`` only ``world_size·c`` of the labels are used.

    Raises:
        ValueError: ``classes_per_rank`` above the number of labels, or a label with fewer
            examples than shards that must hold it (too many shards for this data).
    """
    from distlab.checks import is_int, require_arg
    for name, value in (("world_size", world_size), ("classes_per_rank", classes_per_rank)):
        require_arg(name, value, is_int(value) and value >= 1, "integers >= 1")
    labels, counts = torch.unique(y.flatten(), return_counts=True)
    require_arg("classes_per_rank", classes_per_rank, classes_per_rank <= len(labels),
                f"1..{len(labels)} (the number of labels in y)")
    g = torch.Generator().manual_seed(seed)
    ring = torch.randperm(len(labels), generator=g).tolist()     # positions -> label indices
    holders: list[list[int]] = [[] for _ in labels]               # label index -> its shards
    for k, shard in enumerate(torch.randperm(world_size, generator=g).tolist()):
        for i in range(classes_per_rank):
            holders[ring[(k * classes_per_rank + i) % len(labels)]].append(shard)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
    for label, count, shards in zip(labels.tolist(), counts.tolist(), holders):
        if not shards:
            continue                                              # a label nobody holds
        if len(shards) > count:
            raise ValueError(
                f"world_size={world_size} is out of range for classes_per_rank="
                f"{classes_per_rank}: label {label} has {count} examples but would be split "
                f"between {len(shards)} shards; allowed at most "
                f"{int(counts.min()) * len(labels) // classes_per_rank} shards")
        where = (y.flatten() == label).nonzero().flatten()        # in data order
        for shard, piece in zip(shards, torch.tensor_split(where, len(shards))):
            pieces[shard].append(piece)
    return [torch.cat(p) for p in pieces]
