"""How a heterogeneous cluster's speeds turn into batch shares and into compute time.

A rank's *speed* is how many examples it processes per unit time, relative to the others
(only ratios matter). Data parallelism with equal shares waits for the slowest rank every
step; giving rank r a share ``b_r`` proportional to its speed ``s_r`` makes every rank's
compute time ``b_r / s_r`` about the same, so nobody waits (the load balancing of
heterogeneity-aware data parallelism, e.g. Jia et al. 2018, "Improving the Performance of
Distributed TensorFlow with Heterogeneous Devices"; HetPipe, Park et al. 2020).

On a laptop every process runs on the same cores, so the lab *injects* the speed: like the
parameter server's straggler (:mod:`distlab.asynchronous.ps_worker`), a rank sleeps a
simulated compute time, here :func:`compute_delay`. Nothing here communicates.
"""
from __future__ import annotations

import math
from typing import Sequence

from distlab.checks import is_int, is_number, require_arg


def proportional_batches(speeds: Sequence[float], batch_size: int) -> tuple[int, ...]:
    """Per-rank batch sizes proportional to ``speeds``, each >= 1, summing to ``batch_size``.

    Largest-remainder (Hamilton) rounding: rank r's exact quota is
    ``batch_size * s_r / sum(speeds)``; each rank gets its floor, and the examples still
    missing go to the ranks with the largest fractional remainders (ties: the lower rank).
    A rank left with 0 then takes one example from the rank with the most (every rank must
    have a gradient to average, and an idle rank would not be data parallelism).
    ``proportional_batches((1, 3), 32) == (8, 24)``; equal speeds give the most even split.
    """
    require_arg("speeds", speeds, _are_speeds(speeds), "a non-empty sequence of numbers > 0")
    p = len(speeds)
    require_arg("batch_size", batch_size, is_int(batch_size) and batch_size >= p,
                f"an int >= len(speeds)={p} (every rank gets at least one example)")
    total = float(sum(speeds))
    quotas = [batch_size * s / total for s in speeds]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(p), key=lambda r: (-(quotas[r] - shares[r]), r))
    for r in by_remainder[:batch_size - sum(shares)]:
        shares[r] += 1
    for r in range(p):
        if shares[r] == 0:
            shares[max(range(p), key=lambda k: (shares[k], -k))] -= 1
            shares[r] = 1
    return tuple(shares)


def equal_batches(num_ranks: int, batch_size: int) -> tuple[int, ...]:
    """``batch_size`` split as evenly as possible over ``num_ranks`` (the first ranks get the extra)."""
    require_arg("num_ranks", num_ranks, is_int(num_ranks) and num_ranks >= 1, "an int >= 1")
    require_arg("batch_size", batch_size, is_int(batch_size) and batch_size >= num_ranks,
                f"an int >= num_ranks={num_ranks}")
    return proportional_batches((1.0,) * num_ranks, batch_size)


def compute_delay(speed: float, examples: int, step_time: float,
                  reference_examples: float) -> float:
    """Seconds of simulated compute for a rank of ``speed`` that processes ``examples``.

    The rule: a rank of speed 1 takes ``step_time`` seconds for ``reference_examples``
    examples, and time grows with the examples and shrinks with the speed::

        delay = step_time * examples / (speed * reference_examples)

    With ``reference_examples`` = the global batch divided by the ranks, a speed-1 rank with
    an equal share takes ``step_time``; a rank with a proportional share takes
    ``step_time * p / sum(speeds)`` whatever its speed (every rank the same: balanced).
    """
    require_arg("speed", speed, is_number(speed) and speed > 0, "a number > 0")
    require_arg("examples", examples, is_int(examples) and examples >= 0, "an int >= 0")
    require_arg("step_time", step_time, is_number(step_time) and step_time >= 0,
                "a number >= 0 (seconds)")
    require_arg("reference_examples", reference_examples,
                is_number(reference_examples) and reference_examples > 0, "a number > 0")
    return step_time * examples / (speed * reference_examples)


def _are_speeds(speeds) -> bool:
    try:
        return len(speeds) >= 1 and all(is_number(s) and s > 0 for s in speeds)
    except TypeError:
        return False
