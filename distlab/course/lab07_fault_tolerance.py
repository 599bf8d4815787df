"""What a crash does to sync, async and elastic training: the runs and figures of lab 07.

* :func:`start_demo` - one run with one injected fault, for the lab's panel: synchronous
  training (plain, or elastic with checkpoints), ZeRO, or the parameter server.
* :func:`timeline_figure` - loss against wall time with the failure, its detection, the
  restart and the resume marked.
* :func:`lost_work_sweep` and :func:`lost_work_figure` - the checkpoint-interval trade-off,
  measured, beside Young's formula.
* :func:`failure_sweep` and :func:`failure_figure` - Young's formula against repeated random
  failures: many jobs hit by failures at a chosen mean time between failures (the MTBF knob),
  simulated, and the interval that wasted least.

Young's formula (Young 1974, "A first order approximation to the optimum checkpoint
interval", CACM 17(9)): with a checkpoint costing ``C`` seconds and a mean time between
failures ``M``, the interval that minimizes the expected wasted time is

    tau* = sqrt(2 C M)

because over a job of length ``T`` we pay ``(T / tau) C`` for checkpoints and, per failure
(``T / M`` of them), redo on average ``tau / 2`` of work: ``W(tau) = T C / tau + T tau / (2M)``,
whose minimum is at ``tau*``. Daly (2006) adds the restart time; it does not move ``tau*``
to first order.
"""
from __future__ import annotations

import math
import random
import shutil
import tempfile
import weakref
from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from distlab.checks import is_int, is_number, require_arg
from distlab.fault_tolerance import elastic
from distlab.fault_tolerance.elastic import ElasticConfig, TrainConfig
from distlab.fault_tolerance.faults import Fault
from distlab.launcher import MAX_WORLD_SIZE, start

ALGORITHMS = ("sync", "sync + elastic", "zero + elastic", "parameter server")
EVENT_STYLE = {"failure": ("#d62728", "dash"), "detection": ("#ff7f0e", "dot"),
               "restart": ("#9467bd", "dot"), "resume": ("#2ca02c", "dash")}


def parameter_server_config(fault: Fault, num_workers: int = 3, **kwargs):
    """The :class:`~distlab.asynchronous.parameter_server.ParameterServerConfig` that suffers ``fault``.

    Rank 0 is the server, rank ``r`` is worker ``r - 1``. A distlab launch ends the whole
    run when any process dies (right for synchronous training), so here the worker
    *vanishes*: it stops talking without a word, exactly what its peers see of a SIGKILLed
    machine, and the server detects it by its silence (a heartbeat timeout). ``kwargs`` set
    fields of the config or of its workload by name (``num_steps=40``).
    """
    from distlab.asynchronous.parameter_server import ParameterServerConfig
    from distlab.ui.panel import configure
    if fault.kind == "delay":
        raise ValueError("a delay on the parameter server is a straggler: use "
                         "ParameterServerConfig(slowdown=...) instead")
    require_arg("num_workers", num_workers, is_int(num_workers) and num_workers >= 1, "an int >= 1")
    require_arg("fault.rank", fault.rank, 1 <= fault.rank <= num_workers,
           f"a worker rank, 1..{num_workers} (rank 0 is the server)")
    return configure(ParameterServerConfig(num_workers=num_workers, drop_worker=fault.rank - 1,
                                           drop_at=max(1, fault.step)), kwargs)


def start_demo(algorithm: str = "sync + elastic", fault_kind: str = "kill", fail_rank: int = 1,
               fail_step: int = 25, checkpoint_every: int = 10, world_size: int = 3,
               num_steps: int = 60, step_time: float = 0.02, checkpoint_dir: str | None = None,
               on_metrics=None, on_output=None):
    """Start one run of ``algorithm`` in which ``fault_kind`` hits ``fail_rank`` at ``fail_step``.

    Returns at once a :class:`distlab.Run` (``"sync"``, ``"parameter server"``) or a
    :class:`~distlab.fault_tolerance.agent.ElasticRun`; both work in a :class:`~distlab.ui.panel.RunPanel`.
    Plain ``"sync"`` has no recovery: its run ends with a :class:`~distlab.WorkerError`.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is not allowed; use one of {ALGORITHMS}")
    _check_world_size(world_size)
    require_arg("fail_rank", fail_rank, is_int(fail_rank) and 0 <= fail_rank < world_size,
           f"an int in 0..{world_size - 1}")
    fault = Fault(fault_kind, rank=fail_rank, step=fail_step, seconds=2.0)
    if algorithm == "parameter server":
        from distlab.asynchronous import parameter_server
        workload = replace(parameter_server.ParameterServerConfig().workload, num_steps=num_steps)
        config = parameter_server_config(fault, num_workers=world_size - 1, workload=workload,
                                         step_time=step_time, worker_timeout=1.0)
        return parameter_server.start(config, timeout=60, on_metrics=on_metrics,
                                      on_output=on_output)
    scratch = None if checkpoint_dir else tempfile.mkdtemp(prefix="distlab-ckpt-")
    config = TrainConfig(checkpoint_dir or scratch,
                         algorithm="zero" if algorithm.startswith("zero") else "sync",
                         workload=replace(elastic.WORKLOAD, num_steps=num_steps),
                         checkpoint_every=checkpoint_every, fault=fault, step_time=step_time)
    if algorithm == "sync":     # one attempt, no agent: the failure ends the run
        run = start(elastic.train, world_size, config, timeout=10, on_metrics=on_metrics,
                    on_output=on_output)
    else:
        run = elastic.start(config, ElasticConfig(world_size=world_size, timeout=10),
                            on_metrics=on_metrics, on_output=on_output, name=algorithm)
    if scratch:                 # the scratch checkpoints go with the run (or the kernel)
        weakref.finalize(run, shutil.rmtree, scratch, True)
    return run


def timeline_figure(run, title: str = "loss against wall time, through a failure") -> go.Figure:
    """Loss (rank 0 of each attempt) against wall time, with the recovery's events marked."""
    df = run.metrics()
    fig = go.Figure(layout=dict(title=title, xaxis_title="wall time (s)",
                                yaxis_title="training loss", template="plotly_white",
                                height=380))
    loss = df.dropna(subset=["loss"]) if "loss" in df else df.iloc[:0]
    attempts = loss.attempt if "attempt" in loss else pd.Series(0, index=loss.index)
    for attempt, part in loss.groupby(attempts):
        part = part[part["rank"] == part["rank"].min()].sort_values("time")
        ws = int(part.world_size.iloc[0]) if "world_size" in part else run.world_size
        fig.add_scatter(x=part.time, y=part.loss, mode="lines+markers", marker_size=3,
                        name=f"attempt {int(attempt)} ({ws} ranks)")
    if hasattr(run, "timeline"):
        ev = run.timeline()
        for name, (color, dash) in EVENT_STYLE.items():
            first = ev[ev.event == name].head(1)
            for _, e in first.iterrows():
                step = "" if pd.isna(e.get("step")) else f" (step {int(e['step'])})"
                fig.add_vline(x=e.time, line_color=color, line_dash=dash,
                              annotation_text=name + step, annotation_textangle=-90,
                              annotation_position="top left")
        ckpt = ev[ev.event == "checkpoint"].drop_duplicates(["attempt", "step"])
        if len(ckpt) and len(loss):
            fig.add_scatter(x=ckpt.time, y=[loss.loss.max()] * len(ckpt), mode="markers",
                            marker=dict(symbol="triangle-down", size=9, color="#7f7f7f"),
                            name="checkpoint")
    return fig


def young_interval(checkpoint_cost: float, mtbf: float) -> float:
    """Young's optimal checkpoint interval, ``sqrt(2 C M)``, in the units of its arguments."""
    require_arg("checkpoint_cost", checkpoint_cost, is_number(checkpoint_cost) and checkpoint_cost >= 0,
           "a number >= 0")
    require_arg("mtbf", mtbf, is_number(mtbf) and mtbf > 0, "a number > 0")
    return math.sqrt(2 * checkpoint_cost * mtbf)


def lost_work_sweep(intervals=(2, 5, 10, 20), num_steps: int = 40, world_size: int = 2,
                    step_time: float = 0.02, seed: int = 0) -> pd.DataFrame:
    """Measure the price of each checkpoint interval on real elastic runs, one failure each.

    Each run is killed once (rank 1, at a step drawn uniformly from the middle half of the
    run, seeded), restarts on the survivors and finishes. Per run: the time spent writing
    checkpoints, the steps redone and their time (lost work), and the downtime.
    """
    require_arg("num_steps", num_steps, is_int(num_steps) and num_steps >= 2, "an int >= 2")
    require_arg("intervals", intervals, len(intervals) > 0 and all(
        is_int(i) and 1 <= i <= num_steps for i in intervals), f"ints in 1..{num_steps}")
    _check_world_size(world_size)
    require_arg("seed", seed, is_int(seed), "an int")
    TrainConfig("", checkpoint_every=0, step_time=step_time)   # checks step_time
    draw = random.Random(seed)
    rows = []
    for interval in intervals:
        fail = draw.randrange(num_steps // 4, 3 * num_steps // 4)
        with tempfile.TemporaryDirectory(prefix="distlab-ckpt-") as folder:
            config = TrainConfig(folder, workload=replace(elastic.WORKLOAD, num_steps=num_steps),
                                 checkpoint_every=interval, step_time=step_time,
                                 fault=Fault("kill", rank=1, step=fail))
            run = elastic.run(config, ElasticConfig(world_size=world_size, timeout=30))
        s = run.summary()
        df = run.metrics().dropna(subset=["loss"])
        first = df[(df.attempt == 0) & (df["rank"] == 0)].sort_values("step")
        measured_step = float(first.time.diff().median())
        rows.append({"interval": interval, "failure_step": s["failure_step"],
                     "lost_steps": s["lost_steps"], "step_time": measured_step,
                     "lost_time": s["lost_steps"] * measured_step,
                     "checkpoints": num_steps // interval,
                     "checkpoint_time": s["checkpoint_time"],
                     "checkpoint_cost": s["checkpoint_time"] / max(1, num_steps // interval),
                     "downtime": s["downtime"]})
    df = pd.DataFrame(rows)
    df["wasted_time"] = df.checkpoint_time + df.lost_time
    return df


def lost_work_figure(sweep: pd.DataFrame, num_steps: int) -> go.Figure:
    """Measured waste per interval (checkpointing + redone steps) beside Young's model.

    The model uses the measured checkpoint cost ``C`` and step time ``t``, and one failure
    per job (``M = num_steps * t``): ``W(tau) = (N / tau) C + (tau / 2) t`` for an interval of
    ``tau`` steps, least at Young's ``tau* = sqrt(2 C M) / t`` steps.
    """
    C, t = float(sweep.checkpoint_cost.mean()), float(sweep.step_time.mean())
    best = young_interval(C, num_steps * t) / t
    taus = [1 + i * (sweep.interval.max() * 1.2 - 1) / 99 for i in range(100)]
    fig = go.Figure(layout=dict(
        title=f"lost work against checkpoint interval (C = {C * 1e3:.1f} ms, "
              f"step = {t * 1e3:.1f} ms, one failure per {num_steps} steps)",
        xaxis_title="checkpoint interval (steps)", yaxis_title="wasted time (s)",
        barmode="stack", template="plotly_white", height=380))
    fig.add_bar(x=sweep.interval, y=sweep.checkpoint_time, name="measured: writing checkpoints")
    fig.add_bar(x=sweep.interval, y=sweep.lost_time, name="measured: steps redone")
    fig.add_scatter(x=taus, y=[num_steps / u * C + u / 2 * t for u in taus], mode="lines",
                    name="model: (N/τ)·C + (τ/2)·t")
    fig.add_vline(x=best, line_dash="dash", line_color="#2ca02c",
                  annotation_text=f"Young: τ* = √(2·C·MTBF) = {best:.1f} steps")
    return fig


def expected_waste(interval: float, num_steps: int, checkpoint_cost: float,
                   step_time: float) -> float:
    """Young's model of the wasted seconds for one failure per job: ``(N/τ)·C + (τ/2)·t``."""
    require_arg("interval", interval, is_number(interval) and interval > 0, "a number > 0")
    for name, value in (("num_steps", num_steps), ("checkpoint_cost", checkpoint_cost),
                        ("step_time", step_time)):
        require_arg(name, value, is_number(value) and value >= 0, "a number >= 0")
    return num_steps / interval * checkpoint_cost + interval / 2 * step_time


def failure_sweep(checkpoint_cost: float, mtbf: float, work: float | None = None,
                  factor: float = math.sqrt(2), runs: int = 20_000, restart_cost: float = 0.0,
                  seed: int = 0) -> pd.DataFrame:
    """Simulate ``runs`` jobs per checkpoint interval, hit by failures at random; the waste.

    Each job computes for ``work`` seconds (default ``20 * mtbf``, about 20 failures),
    writing a checkpoint (``checkpoint_cost`` seconds) after every interval of work. Failures
    arrive as a Poisson process of mean ``mtbf`` (Young's assumption: machines fail
    independently, at a constant rate); each one throws away the work and the checkpoint in
    progress since the last checkpoint and costs ``restart_cost``. The intervals form a
    geometric grid (ratio ``factor``) from ``2 * checkpoint_cost`` to ``mtbf``, chosen without
    Young's formula, so the measured best interval can disagree with it.

    Per interval (rounded so that the work splits into whole intervals): ``wasted_time``
    (mean of wall time minus work), ``wasted_time_sem`` (its standard error), ``failures`` (mean).
    """
    for name, value in (("checkpoint_cost", checkpoint_cost), ("mtbf", mtbf)):
        require_arg(name, value, is_number(value) and value > 0, "a number > 0")
    require_arg("mtbf", mtbf, mtbf > 4 * checkpoint_cost,
                f"a number > 4 * checkpoint_cost = {4 * checkpoint_cost:g} (else no interval fits)")
    work = 20 * mtbf if work is None else work
    require_arg("work", work, is_number(work) and work >= mtbf, f"a number >= mtbf = {mtbf:g}")
    require_arg("factor", factor, is_number(factor) and factor > 1, "a number > 1")
    require_arg("runs", runs, is_int(runs) and runs >= 1, "an int >= 1")
    require_arg("restart_cost", restart_cost, is_number(restart_cost) and restart_cost >= 0,
                "a number >= 0")
    rng = np.random.default_rng(seed)
    intervals = 2 * checkpoint_cost * factor ** np.arange(
        int(math.log(mtbf / (2 * checkpoint_cost), factor)) + 1)
    rows = []
    for interval in intervals:
        n = max(1, round(work / interval))        # whole intervals of work per job
        attempt = work / n + checkpoint_cost      # compute, then write the checkpoint
        survive = math.exp(-attempt / mtbf)       # an attempt that no failure interrupts
        # Failures before the n attempts that get through (each attempt is memoryless).
        failures = rng.negative_binomial(n, survive, size=runs)
        # A failed attempt lasted an exponential time given that it was < attempt.
        u = rng.random((runs, int(failures.max(initial=0))))
        lost = -mtbf * np.log1p(-u * (1 - survive))
        lost = np.where(np.arange(u.shape[1]) < failures[:, None], lost, 0.0).sum(axis=1)
        waste = n * checkpoint_cost + lost + failures * restart_cost
        rows.append({"interval": work / n, "wasted_time": waste.mean(),
                     "wasted_time_sem": (waste.std(ddof=1) / math.sqrt(runs)) if runs > 1 else 0.0,
                     "failures": failures.mean()})
    return pd.DataFrame(rows)


def best_interval(sweep: pd.DataFrame) -> tuple[float, float, float]:
    """The interval that wasted least in ``sweep``, and its grid neighbours: ``(low, best,
    high)``, the bracket in which the true best interval lies (low = best at the grid's end)."""
    i = int(sweep.wasted_time.to_numpy().argmin())
    intervals = sweep.interval.to_numpy()
    return (float(intervals[max(i - 1, 0)]), float(intervals[i]),
            float(intervals[min(i + 1, len(intervals) - 1)]))


def failure_figure(sweep: pd.DataFrame, checkpoint_cost: float, mtbf: float,
                   unit: str = "s") -> go.Figure:
    """The simulated waste per interval (with its standard error), the measured best
    interval's bracket, and Young's ``sqrt(2 C M)``."""
    low, best, high = best_interval(sweep)
    young = young_interval(checkpoint_cost, mtbf)
    fig = go.Figure(layout=dict(
        title=f"wasted time against checkpoint interval: {len(sweep)} intervals, random "
              f"failures (MTBF {mtbf:g} {unit}, checkpoint {checkpoint_cost:g} {unit})",
        xaxis=dict(type="log", title=f"checkpoint interval ({unit})"),
        yaxis_title=f"wasted time per job ({unit}, simulated mean)",
        template="plotly_white", height=380))
    fig.add_vrect(x0=low, x1=high, fillcolor="#2ca02c", opacity=0.12, line_width=0,
                  annotation_text="measured best, ± one grid step")
    fig.add_scatter(x=sweep.interval, y=sweep.wasted_time, mode="lines+markers",
                    error_y=dict(type="data", array=2 * sweep.wasted_time_sem),
                    name="simulated (± 2 s.e.)")
    fig.add_vline(x=young, line_dash="dash", line_color="#d62728",
                  annotation_text=f"Young: √(2·C·M) = {young:.3g} {unit}")
    return fig


def _check_world_size(world_size) -> None:
    require_arg("world_size", world_size, is_int(world_size) and 2 <= world_size <= MAX_WORLD_SIZE,
           f"an int in 2..{MAX_WORLD_SIZE} (one rank fails, one at least survives)")




__all__ = ["ALGORITHMS", "start_demo", "timeline_figure", "young_interval", "lost_work_sweep",
           "lost_work_figure", "expected_waste", "failure_sweep", "best_interval",
           "failure_figure", "parameter_server_config"]
