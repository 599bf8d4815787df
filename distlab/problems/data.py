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
    """A non-IID split: each rank gets examples of only ``classes_per_rank`` labels.

    Indices are sorted by label and cut into ``world_size * classes_per_rank`` contiguous
    pieces dealt out at random, as in McMahan et al. 2017 (section 3, "pathological non-IID").
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(y.flatten(), stable=True)
    pieces = list(order.chunk(world_size * classes_per_rank))
    deal = torch.randperm(len(pieces), generator=g).tolist()
    return [torch.cat([pieces[deal[r * classes_per_rank + k]]
                       for k in range(classes_per_rank)]) for r in range(world_size)]
