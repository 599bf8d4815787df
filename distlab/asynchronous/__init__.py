"""Lab 03 · asynchronous SGD and staleness.

``parameter_server`` (bounded staleness: BSP, SSP, async; its pieces ``ps_config``,
``ps_server``, ``ps_worker``), ``hogwild`` (lock-free shared memory), ``simulated_staleness``
(a *simulated* mode: bit-reproducible delays, beside the real one). The parameter server
and the simulated mode train a :class:`~distlab.problems.workloads.Workload` (lab 03's
default, and the flat-vector gradients they need, in :mod:`distlab.problems.convex`, with
Hogwild!'s sparse problem); the lab's panels' choices and figures are in
:mod:`distlab.course.lab03_async_sgd`.
"""
