"""Metrics: what workers report while they run, and the tidy tables the caller gets.

One vocabulary everywhere (code, DataFrames, plot axes):

========================== =========================================================
column                     meaning
========================== =========================================================
``run``                    the name of the run (several runs are overlaid in plots)
``rank``                   the reporting process
``step``                   the optimizer step (or round) the record belongs to
``time``                   seconds since the launch started (wall clock)
``loss``                   training loss; ``val_loss`` held-out loss; ``accuracy``
``bytes_sent``             bytes this rank has sent so far (cumulative)
``bytes_recv``             bytes this rank has received so far (cumulative)
``comm_time``              seconds this rank has spent in communication (cumulative)
``compute_time``           seconds spent computing (cumulative)
``staleness``              versions between the parameters used and those updated
``lr``                     the learning rate used at that step
``divergence``             squared distance of a rank's local model from the average
``sim_time``               *simulated* network seconds (an injected alpha-beta model)
``updates_per_s``          updates per second (throughput)
``nbytes``                 size of one message or tensor in bytes (collectives lab)
``collective_time``        seconds of one collective on the slowest rank
``bytes_sent_per_call``    bytes this rank sent in one call (``bytes_sent`` is cumulative)
``wait_time``              seconds this rank has waited in the gradient all-reduce (cumulative)
``batch``                  examples of the global batch this rank took (its share)
``kept``                   gradients the server kept this step (backup workers)
``dropped``                gradients dropped so far (cumulative; backup workers)
``consensus_distance``     mean over ranks of the squared distance to the average model
``train_time``             seconds in the training loop, evaluation left out (cumulative)
========================== =========================================================
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from distlab import worker as _worker

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("run", "rank", "step", "time")

_local_records: list[dict] = []   # records of a process not started by distlab (torchrun)


def report(step: int | None = None, **values) -> dict:
    """Record metric values for this rank (call it from inside a worker function).

    Under :func:`distlab.launch` the record is sent to the caller at once, so live plots
    update while the run goes on. Outside a launch (under torchrun, or a plain script) it is
    kept in this process and returned by :func:`~distlab.metrics.local_records`.

    Args:
        step: the optimizer step the values belong to.
        **values: numbers to record, named with distlab's vocabulary (``loss``, ...).

    Returns:
        The record: ``{"rank", "step", "time", **values}``.
    """
    ch = _worker.worker_channel()
    if ch is not None:
        rank, t0 = ch.rank, ch.t0
    else:
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else 0
        t0 = _start_time()
    record = {"rank": rank, "step": step, "time": time.time() - t0}
    record.update(values)
    if ch is not None:
        ch.send(("metrics", record))
    else:
        _local_records.append(record)
    return record


_t0 = time.time()


def _start_time() -> float:
    return _t0


def local_records() -> list[dict]:
    """Records reported in this process outside a distlab launch (for torchrun scripts)."""
    return list(_local_records)


def to_frame(records: list[dict], run: str | None = None) -> pd.DataFrame:
    """Records as a tidy DataFrame: one row per report, ``run, rank, step, time`` first."""
    import pandas as pd      # here, not at the top: pandas is half a second of `import distlab`
    df = pd.DataFrame.from_records(records)
    if df.empty:
        df = pd.DataFrame(columns=["rank", "step", "time"])
    if run is not None:
        df.insert(0, "run", run)
    first = [c for c in COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def to_long(df: pd.DataFrame) -> pd.DataFrame:
    """The long form of a tidy frame: columns ``run, rank, step, time, metric, value``."""
    ids = [c for c in COLUMNS if c in df.columns]
    return df.melt(id_vars=ids, var_name="metric", value_name="value").dropna(subset=["value"])
