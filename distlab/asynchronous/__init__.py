"""Lab 03 · asynchronous SGD and staleness.

``parameter_server`` (bounded staleness: BSP, SSP, async), ``hogwild`` (lock-free shared memory),
``simulated_staleness`` (a *simulated* mode: bit-reproducible delays, beside the real one).
"""
