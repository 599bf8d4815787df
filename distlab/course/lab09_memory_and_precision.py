"""Lab 09's runs: memory per rank measured by phase and part, the "2 + 2 + K" bytes, and the
panel whose knobs (ZeRO stage, precision, recomputation, accumulation, ranks) move the
measured memory and time bars.

:class:`StepConfig` is one run of the panel: the tiny transformer trained with a ZeRO stage
(:func:`distlab.course.lab04_sharding.make_stage`), in fp32 or under bf16 autocast, with or
without activation checkpointing (:func:`distlab.memory.recompute.with_recompute`), with k
micro-batches per step. :func:`train` times the steps and measures the last one with
:func:`distlab.memory.measure.measure_step`; the verbs are distlab's (:func:`train`,
:func:`start`, :func:`run`). :func:`anatomy` measures every stage on real ranks beside the
formulas; :func:`mixed_precision_bytes` the model states of 16-bit ZeRO against ZeRO's
2 + 2 + K. :class:`Bars` draws a run's last record as bars, for the panel.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field, replace

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, require
from distlab.course.lab04_sharding import make_stage
from distlab.memory.activations import RECOMPUTE, tiny_transformer_activation_bytes
from distlab.memory.measure import PARTS, largest_unit_bytes, measure_step
from distlab.memory.recompute import with_recompute
from distlab.metrics import report
from distlab.problems import models
from distlab.problems.workloads import Workload
from distlab.sharding import memory
from distlab.sharding.zero import STAGES, ShardedOptimizer

PRECISIONS = ("fp32", "bf16")
"""fp32, or ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward."""
PART_COLORS = {"params": "#4C78A8", "grads": "#F58518", "optimizer_state": "#54A24B",
               "gathered_params": "#B279A2", "communication": "#E45756",
               "activations": "#72B7B2", "temporaries": "#BAB0AC"}


def transformer(**overrides) -> Workload:
    """The lab's workload: the tiny transformer, Adam, a few steps."""
    return Workload(**{**dict(model="transformer", hidden=64, depth=2, batch_size=16,
                              block_size=32, lr=0.01, optimizer_name="adam", num_steps=4),
                       **overrides})


@dataclass(frozen=True)
class StepConfig:
    """One run of the panel: a ZeRO stage, a precision, recomputation, accumulation."""
    stage: int = 1
    """0 (data parallel), 1, 2 or 3 (FSDP)."""
    precision: str = "fp32"
    """One of ``PRECISIONS``."""
    recompute: str = "none"
    """"none", "selective" (each block's attention) or "full" (each block)."""
    accumulation_steps: int = 1
    """k micro-batches per optimizer step."""
    world_size: int = 2
    """Ranks; each takes ``workload.batch_size / world_size`` examples per step."""
    workload: Workload = field(default_factory=transformer)
    """What is trained (a transformer); the last of its steps is measured."""

    def __post_init__(self):
        require(self, "stage", is_int(self.stage) and self.stage in STAGES, "0, 1, 2 or 3")
        require(self, "precision", self.precision in PRECISIONS, f"one of {PRECISIONS}")
        require(self, "recompute", self.recompute in RECOMPUTE, f"one of {RECOMPUTE}")
        require(self, "world_size", is_int(self.world_size)
                and 1 <= self.world_size <= launcher.MAX_WORLD_SIZE,
                f"an int in 1..{launcher.MAX_WORLD_SIZE}")
        require(self, "workload", isinstance(self.workload, Workload)
                and self.workload.model == "transformer" and self.workload.num_steps >= 2,
                "a transformer Workload with num_steps >= 2")
        require(self, "accumulation_steps", is_int(self.accumulation_steps)
                and self.accumulation_steps >= 1 and self.workload.batch_size
                % (self.world_size * self.accumulation_steps) == 0,
                f"an int >= 1 such that world_size * k divides workload.batch_size="
                f"{self.workload.batch_size}")


def train(config: StepConfig, group=None) -> dict:
    """Train on every rank, timing each step; measure the last step's memory by part.

    Every step reports ``loss``, ``step_time`` and cumulative ``bytes_sent``; the last one
    also ``step_time_median`` (of the steps before it, after the first), ``comm_time``
    (the median step's time in communication, from the ledger), ``compute_time`` (the
    rest of the step) and, for each part of
    ``distlab.memory.measure.PARTS``, its bytes at the step's peak (``peak_<part>``).
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    wl, k = config.workload.loaded(), config.accumulation_steps
    net = with_recompute(wl.build_model(), config.recompute)
    if config.precision == "bf16":         # the same module object: FSDP still sees itself
        net.forward = torch.autocast("cpu", dtype=torch.bfloat16)(net.forward)
    model, opt = make_stage(config.stage, net, "adam", group, wl.lr)
    comm.ledger().reset()
    batches, times, in_comm = list(wl.batches()), [], []
    for step, (X, y) in enumerate(batches[:-1]):
        start, before = time.perf_counter(), comm.ledger().totals()["comm_time"]
        opt.zero_grad()
        for Xm, ym in _micro_batches(X, y, rank, world_size, k):
            loss = wl.loss(model(Xm), ym) / k   # the k parts add up to the rank's mean loss
            loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        in_comm.append(comm.ledger().totals()["comm_time"] - before)
        report(step=step, loss=loss.item() * k, step_time=times[-1],
               bytes_sent=comm.ledger().totals()["bytes_sent"])
    X, y = batches[-1]
    measured = measure_step(model, opt, next(_micro_batches(X, y, rank, world_size, k)),
                            wl.loss)
    phase = max(("forward", "backward", "step"), key=lambda p: measured[p]["peak"])
    median = statistics.median(times[1:] or times)         # the first step warms up
    comm_time = statistics.median(in_comm[1:] or in_comm)
    report(step=len(batches) - 1, loss=measured["loss"], step_time=median,
           step_time_median=median, comm_time=comm_time,
           compute_time=max(0.0, median - comm_time),
           bytes_sent=comm.ledger().totals()["bytes_sent"], peak=measured["peak"],
           **{f"peak_{part}": measured[phase][part] for part in PARTS})
    return {"measured": measured, "step_time": median}


def start(config: StepConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes; return the Run at once."""
    config = replace(config, workload=config.workload.loaded())
    return launcher.start(train, config.world_size, config, **launch)


def run(config: StepConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def _micro_batches(X, y, rank, world_size, k):
    """This rank's rows of the global batch, in k micro-batches: (B/(N·k), T) each."""
    X, y = X.chunk(world_size)[rank], y.chunk(world_size)[rank]
    return zip(X.chunk(k), y.chunk(k))


# -- memory anatomy: every stage, measured beside the formulas ------------------------------

def anatomy(world_size: int = 2, stages=STAGES, workload: Workload | None = None) -> pd.DataFrame:
    """Peak bytes per rank by phase and part for each ZeRO stage, beside the formulas.

    One launch of ``world_size`` ranks. Rows: ``stage, rank, phase, part, measured``, plus
    ``predicted`` for the model states (:func:`distlab.sharding.memory.predicted_bytes`) and
    for ``activations`` (the tiny transformer's own count,
    :func:`distlab.memory.activations.tiny_transformer_activation_bytes`, against the bytes
    still alive when forward ends, phase "saved"), and part "gathered unit" of phase
    "forward": FSDP's largest gathered unit beyond the formula at forward's peak of model
    states (:func:`distlab.memory.measure.largest_unit_bytes`); phase "end" is what a rank
    holds after the step.
    """
    workload = workload or transformer(num_steps=2)
    config = StepConfig(world_size=world_size, workload=workload)   # validates the sizes
    for stage in stages:
        replace(config, stage=stage)                             # refuses a bad stage
    rows = []
    for per_rank in launcher.launch(_anatomy_worker, world_size, config.workload.loaded(),
                                    tuple(stages)):
        rows.extend(per_rank)
    return pd.DataFrame(rows)


def _anatomy_worker(wl: Workload, stages) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    (X, y), rows = next(wl.batches()), []
    X, y = X.chunk(world_size)[rank], y.chunk(world_size)[rank]
    vocab = wl.build_model()[0].tok.num_embeddings
    activations = tiny_transformer_activation_bytes(
        seq_len=wl.block_size, batch_size=len(X), hidden=wl.hidden, num_heads=wl.num_heads,
        num_layers=wl.depth, vocab_size=vocab)
    for stage in stages:
        net = wl.build_model()
        psi = models.num_parameters(net)
        model, opt = make_stage(stage, net, "adam", None, wl.lr)
        measure_step(model, opt, (X, y), wl.loss)          # the optimizer state exists now
        measured = measure_step(model, opt, (X, y), wl.loss)
        predicted = memory.predicted_bytes(psi, stage, world_size, "adam")
        for phase in ("forward", "backward", "step", "end"):
            for part in PARTS:
                rows.append(dict(stage=stage, rank=rank, phase=phase, part=part,
                                 measured=measured[phase][part],
                                 predicted=predicted.get(part)))
        rows.append(dict(stage=stage, rank=rank, phase="saved", part="activations",
                         measured=measured["saved_activations"], predicted=activations))
        forward = measured["forward"]      # FSDP's gathered unit, beyond ZeRO's formula
        rows.append(dict(stage=stage, rank=rank, phase="forward", part="gathered unit",
                         measured=forward["with_gathered_peak"] - forward["model_state_peak"],
                         predicted=largest_unit_bytes(model)))
    return rows


def anatomy_figure(df: pd.DataFrame) -> go.Figure:
    """Stacked bars: each stage's peak per phase (largest rank), by part."""
    peaks = df[df.phase.isin(["forward", "backward", "step"])].groupby(
        ["stage", "phase", "part"], as_index=False).measured.max()
    fig = go.Figure()
    for part in PARTS:
        p = peaks[peaks.part == part].sort_values(["stage", "phase"])
        fig.add_bar(x=[[f"stage {s}" for s in p.stage], list(p.phase)], y=p.measured / 1024,
                    name=part, marker_color=PART_COLORS[part])
    fig.update_layout(barmode="stack", template="plotly_white", height=420,
                      title="measured memory per rank at the peak of each phase, by part",
                      yaxis_title="KiB per rank")
    return fig


# -- the 2 + 2 + K bytes ----------------------------------------------------------------

def mixed_precision_bytes(world_size: int = 2, workload: Workload | None = None) -> pd.DataFrame:
    """Model-state bytes per rank of ZeRO stages 1 and 2 in fp32 and with bf16 parameters
    and fp32 master weights (``ShardedOptimizer(..., master_weights=True)``), measured
    (:func:`distlab.sharding.memory.measure`) beside ``predicted_bytes``: 4 + 4 + 8 against
    2 + 2 + 12. Rows: ``precision, stage, rank, category, measured, predicted``."""
    return measured_rows(_bytes_worker, world_size, workload)


def measured_rows(worker, world_size: int, workload: Workload | None) -> pd.DataFrame:
    """Every rank's rows of ``worker(workload)`` (default: the lab's transformer, one step),
    one launch of ``world_size`` ranks, validated first as a panel run would be."""
    workload = workload or transformer(num_steps=1)
    StepConfig(world_size=world_size, workload=replace(workload, num_steps=2))
    per_rank = launcher.launch(worker, world_size, workload.loaded())
    return pd.DataFrame([row for rows in per_rank for row in rows])


def _bytes_worker(wl: Workload) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    X, y = next(wl.batches())
    X, y = X.chunk(world_size)[rank], y.chunk(world_size)[rank]
    rows = []
    for precision, dtype in (("fp32", torch.float32), ("bf16 + fp32 masters", torch.bfloat16)):
        for stage, mode in ((1, "reduce_scatter"), (2, "sharded")):
            net = wl.build_model().to(dtype)
            opt = ShardedOptimizer(net.parameters(), torch.optim.Adam, None, gradients=mode,
                                   master_weights=dtype != torch.float32, lr=wl.lr)
            opt.zero_grad()
            wl.loss(net(X).float(), y).backward()
            opt.step()
            measured = memory.measure(net, opt)
            predicted = memory.predicted_bytes(
                models.num_parameters(net), stage, world_size, "adam",
                param_bytes=dtype.itemsize, master_bytes=0 if dtype == torch.float32 else 4)
            rows += [dict(precision=precision, stage=stage, rank=rank, category=cat,
                          measured=measured[cat], predicted=predicted[cat])
                     for cat in memory.CATEGORIES]
    return rows


# -- the panel's bars ---------------------------------------------------------------------

class Bars:
    """What a :class:`~distlab.ui.panel.RunPanel` needs of a figure (``figure``,
    ``callback``, ``draw``, ``clear``), drawing one bar per run: the ``keys`` of the run's
    last record (largest over ranks), stacked, scaled by ``scale``."""

    def __init__(self, keys: dict[str, str], title: str, yaxis_title: str, scale: float = 1.0,
                 colors: dict[str, str] | None = None, height: int = 360):
        # Imported here: the workers import this module for train, and need no widgets.
        from distlab.ui.figures import STATIC, PageFigureWidget
        self.keys, self.scale, self.colors, self._static = keys, scale, colors or {}, STATIC
        self.figure = (PageFigureWidget if STATIC else go.FigureWidget)(layout=dict(
            title=title, barmode="stack", template="plotly_white", height=height,
            yaxis_title=yaxis_title, margin=dict(l=60, r=20, t=50, b=90)))
        self._last: dict[str, dict[int, dict]] = {}
        self._lock, self._draw_lock = threading.Lock(), threading.Lock()

    def _ipython_display_(self):
        from IPython.display import display
        display(self.figure)

    def callback(self, run: str):
        with self._lock:
            self._last[run] = {}

        def on_metrics(records):
            with self._lock:
                for r in records:
                    if all(k in r for k in self.keys):
                        self._last[run][r["rank"]] = r
        return on_metrics

    def values(self) -> dict[str, dict[str, float]]:
        """``{run: {key: value}}`` as drawn (the largest rank's value of each key)."""
        with self._lock:
            return {run: {k: max(r[k] for r in ranks.values()) * self.scale for k in self.keys}
                    for run, ranks in self._last.items() if ranks}

    def draw(self) -> None:
        """Redraw every run's bar, in place (the panel's watcher and ``wait`` both draw)."""
        values = self.values()
        runs = list(values)
        with self._draw_lock:
            existing = {t.name: t for t in self.figure.data}
            with self.figure.batch_update():
                for key, label in self.keys.items():
                    ys = [values[r][key] for r in runs]
                    if label in existing:
                        existing[label].x, existing[label].y = runs, ys
                    else:
                        self.figure.add_bar(x=runs, y=ys, name=label,
                                            marker_color=self.colors.get(key))
        if self._static:
            self.figure.redraw_page()

    def clear(self) -> None:
        with self._lock:
            self._last.clear()
        with self._draw_lock:
            self.figure.data = []
        if self._static:
            self.figure.redraw_page()


def memory_bars() -> Bars:
    return Bars({f"peak_{p}": p for p in PARTS}, "measured peak memory per rank, by part",
                "KiB per rank", 1 / 1024, {f"peak_{p}": c for p, c in PART_COLORS.items()})


def time_bars() -> Bars:
    return Bars({"compute_time": "computing", "comm_time": "in communication"},
                "time per optimizer step", "seconds", colors={"comm_time": "#E45756"})
