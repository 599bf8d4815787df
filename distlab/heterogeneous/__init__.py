"""Training on a heterogeneous cluster: ranks of different speeds (lab 08).

- :mod:`~distlab.heterogeneous.speeds`: per-rank batch shares in proportion to speed, and
  the compute delay a rank of a given speed is made to pay.
- :mod:`~distlab.heterogeneous.hetero_sgd`: data parallelism with unequal shares, the
  gradients combined example-weighted, so it equals single-process SGD.
- :mod:`~distlab.heterogeneous.backup_workers`: synchronous SGD with backup workers
  (Chen et al. 2016): each step keeps the first N - b gradients and drops the stragglers'.
"""
