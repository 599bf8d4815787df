"""Lab 03 · asynchronous SGD and staleness.

``parameter_server`` (bounded staleness: BSP, SSP, async; its pieces ``ps_config``,
``ps_server``, ``ps_worker``), ``hogwild`` (lock-free shared memory), ``simulated_staleness``
(a *simulated* mode: bit-reproducible delays, beside the real one). What they train is in
:mod:`distlab.problems.convex`; the lab's panel and figures in
:mod:`distlab.course.lab03_async_sgd`.
"""
