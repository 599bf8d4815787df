"""The planner beside the clock: a 3-D run's predicted and measured seconds per step.

:func:`predict_step_time` asks :func:`distlab.planning.planner.predict` about the plan
``Plan(dp, tp, pp, microbatches=m)`` of a :class:`~distlab.model_parallel.three_d.ThreeDConfig`
(compute ``6·Ψ·tokens / FLOP/s`` plus a fixed overhead per microbatch and stage, stretched
by the bubble ``(p-1)/(m+p-1)``, and the α-β time of the tensor-, pipeline- and
data-parallel messages, a pipeline transfer's header included, with no overlap);
:func:`measured_step_time` reads a run's clock (the slowest rank of each step, the median
over the steps after the first, which builds caches and connections). :func:`compare`
runs a few configs and gives both side by side.

This machine is described as :mod:`distlab.planning.validate` does it (:func:`clusters`):
the α and β of :func:`distlab.communication.cost_model.fit` on built-in all-reduces timed
by :func:`distlab.planning.validate.measure` on every world size, γ from a small message
timed there with every rank busy (on 2 cores 8 ranks wait for a core at every message,
:func:`distlab.planning.validate.crowded_gamma`), and one rank's FLOP/s and fixed seconds
per pass by :func:`distlab.planning.validate.measure_compute`, here on the run's own model
(most of a tiny model's step is the fixed cost of its operations, paid again by every
microbatch on every stage).
"""
from __future__ import annotations

import statistics
from dataclasses import replace

from distlab.checks import is_int, is_number, require_arg
from distlab.communication import cost_model
from distlab.launcher import launch
from distlab.model_parallel import three_d
from distlab.model_parallel.mesh import MeshConfig
from distlab.model_parallel.three_d import ThreeDConfig
from distlab.planning import validate
from distlab.planning.cluster import Cluster, ModelSpec
from distlab.planning.planner import Plan, predict
from distlab.problems.workloads import Workload


def compare(configs: list[ThreeDConfig] | None = None, fit=None, flops: float | None = None,
            overhead: float = 0.0, timeout: float = 300) -> list[dict]:
    """One row per config: ``config`` (its grid as text), ``world_size``, ``predicted`` and
    ``measured`` seconds per step, and their ``ratio`` (predicted / measured).

    Each config runs once (:func:`distlab.model_parallel.three_d.run`); the machine is
    measured first (:func:`clusters`) unless ``fit`` (a
    :class:`~distlab.communication.cost_model.Fit`), ``flops`` (one rank's FLOP/s) and
    ``overhead`` (its fixed seconds per pass of the model) are given. Default configs:
    :func:`configurations`. Example: ``compare()`` -> rows for dp x tp x pp = 2x2x2, 1x2x2
    and 2x1x2.
    """
    configs = configurations() if configs is None else configs
    require_arg("flops", flops, flops is None or (is_number(flops) and flops > 0),
                "None or a number > 0")
    require_arg("fit", fit, fit is None or isinstance(fit, cost_model.Fit),
                "None or a distlab.communication.cost_model.Fit")
    require_arg("timeout", timeout, is_number(timeout) and timeout > 0, "a number > 0")
    require_arg("overhead", overhead, is_number(overhead) and overhead >= 0, "seconds >= 0")
    require_arg("configs", configs, isinstance(configs, list) and len(configs) >= 1 and all(
        isinstance(c, ThreeDConfig) for c in configs), "a non-empty list of ThreeDConfig")
    if fit is None or flops is None:
        machines = clusters(configs, timeout=timeout)
    else:
        machines = {c.world_size: Cluster.this_machine(c.world_size, flops=flops, fit=fit,
                                                       overhead=overhead) for c in configs}
    rows = []
    for config in configs:
        predicted = predict_step_time(config, machines[config.world_size])
        measured = measured_step_time(three_d.run(config, timeout=timeout))
        rows.append(dict(config=f"dp={config.dp} tp={config.tp} pp={config.pp} "
                                f"m={config.num_microbatches}",
                         world_size=config.world_size, predicted=predicted,
                         measured=measured, ratio=predicted / measured))
    return rows


def configurations(num_steps: int = 4) -> list[ThreeDConfig]:
    """The lab's three runs: 2x2x2 on 8 ranks, 1x2x2 and 2x1x2 on 4, one transformer."""
    require_arg("num_steps", num_steps, is_int(num_steps) and num_steps >= 2,
                "an int >= 2 (the first step is not timed)")
    w = Workload("transformer", hidden=32, num_heads=4, depth=2, block_size=16,
                 batch_size=16, num_steps=num_steps, lr=0.1)
    return [ThreeDConfig(w, dp, tp, pp, num_microbatches=2)
            for dp, tp, pp in [(2, 2, 2), (1, 2, 2), (2, 1, 2)]]


def predict_step_time(config: ThreeDConfig, cluster: Cluster | None = None) -> float:
    """The planner's seconds per step for ``config`` on ``cluster`` (default: this
    machine's ``world_size`` ranks, measured by :func:`clusters`)."""
    require_arg("config", config, isinstance(config, ThreeDConfig), "a ThreeDConfig")
    if cluster is None:
        cluster = clusters([config])[config.world_size]
    plan = Plan(dp=config.dp, tp=config.tp, pp=config.pp,
                microbatches=config.num_microbatches)
    return predict(plan, ModelSpec.from_workload(config.workload), cluster).seconds


def measured_step_time(results: list[dict]) -> float:
    """Seconds per step of a run (every rank's result of
    :func:`distlab.model_parallel.three_d.train`): each step's slowest rank, the median
    over the steps after the first."""
    require_arg("results", results, isinstance(results, list) and len(results) >= 1 and all(
        len(r["step_seconds"]) >= 2 for r in results),
        "every rank's result of three_d.train, with at least 2 steps")
    slowest = [max(step) for step in zip(*(r["step_seconds"] for r in results))]
    return statistics.median(slowest[1:])


def clusters(configs: list[ThreeDConfig], timeout: float = 300) -> dict[int, Cluster]:
    """This machine as the planner sees it, one :class:`~distlab.planning.cluster.Cluster`
    per world size of ``configs``: α, β (and δ) fitted to the built-in all-reduce timed on
    each world size, γ to a small message's time with every rank busy
    (:func:`distlab.planning.validate.crowded_gamma`; one launch of
    :func:`distlab.planning.validate.measure`), and one rank's FLOP/s and fixed overhead per
    pass on the first config's model (:func:`~distlab.planning.validate.measure_compute`,
    in a worker of one thread, as the ranks run)."""
    fit, flops, overhead = _measure(configs, timeout)
    return {p: Cluster.this_machine(p, flops=flops, fit=fit, overhead=overhead)
            for p in sorted({c.world_size for c in configs})}


def _measure(configs: list[ThreeDConfig], timeout: float) -> tuple:
    """``(fit, flops, overhead)``: see :func:`clusters`."""
    sizes = sorted({c.world_size for c in configs})
    require_arg("configs", sizes, all(sizes[-1] % p == 0 for p in sizes),
                f"world sizes that divide the largest, {sizes[-1]}")
    # measure() also times a few steps of a dp-only grid on each world size: keep it tiny.
    probe = Workload("transformer", hidden=8, num_heads=2, depth=1, block_size=4,
                     batch_size=sizes[-1], num_steps=validate.WARMUP + 1)
    bench = validate.measure([MeshConfig(probe, dp=p) for p in sizes], timeout=timeout)
    fit = validate.machine_fit(bench)
    workload = replace(configs[0].workload.loaded(), num_steps=validate.WARMUP + 15)
    flops, overhead = launch(validate.measure_compute, 1, workload, timeout=timeout)[0]
    return fit, flops, overhead
