"""Lab 09's glue for FSDP in 16 bits: stage 3 measured in fp32 and with bf16 shards and
sharded fp32 master weights (:mod:`distlab.sharding.fsdp_mixed`), side by side.

Split from :mod:`distlab.course.lab09_memory_and_precision`, whose workload it measures.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.distributed as dist

from distlab import comm
from distlab.course.lab09_memory_and_precision import measured_rows
from distlab.memory.measure import largest_unit_bytes, measure_step
from distlab.problems import models
from distlab.problems.workloads import Workload
from distlab.sharding import memory
from distlab.sharding.fsdp import FullyShardedDataParallel
from distlab.sharding.fsdp_mixed import MasterWeightOptimizer


def fsdp_16_bit_bytes(world_size: int = 2, workload: Workload | None = None) -> pd.DataFrame:
    """Stage 3 in fp32 and with bf16 shards and sharded fp32 masters
    (``FullyShardedDataParallel(..., param_dtype=torch.bfloat16)`` with
    :class:`~distlab.sharding.fsdp_mixed.MasterWeightOptimizer`), one step measured: the
    model states (:func:`distlab.sharding.memory.measure`) beside ``predicted_bytes``, the
    gathered unit at forward's peak beside ``largest_unit_bytes``, the bytes sent and the
    step's peak. Rows: ``precision, rank, part, measured, predicted``."""
    return measured_rows(_fsdp_16_bit_worker, world_size, workload)


def _fsdp_16_bit_worker(wl: Workload) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    X, y = next(wl.batches())
    X, y = X.chunk(world_size)[rank], y.chunk(world_size)[rank]
    rows = []
    for precision, dtype in (("fp32", None), ("bf16 + fp32 masters", torch.bfloat16)):
        net = wl.build_model()
        psi = models.num_parameters(net)
        model = FullyShardedDataParallel(net, param_dtype=dtype)
        opt = (torch.optim.Adam(model.parameters(), lr=wl.lr) if dtype is None else
               MasterWeightOptimizer(model.parameters(), torch.optim.Adam, lr=wl.lr))
        comm.ledger().reset()
        step = measure_step(model, opt, (X, y), wl.loss)
        predicted = memory.predicted_bytes(psi, 3, world_size, "adam",
                                           param_bytes=2 if dtype else 4,
                                           master_bytes=4 if dtype else 0)
        measured = memory.measure(model, opt)
        rows += [dict(precision=precision, rank=rank, part=cat, measured=measured[cat],
                      predicted=predicted[cat]) for cat in memory.CATEGORIES]
        forward = step["forward"]
        rows += [dict(precision=precision, rank=rank, part="gathered unit",
                      measured=forward["with_gathered_peak"] - forward["model_state_peak"],
                      predicted=largest_unit_bytes(model)),
                 dict(precision=precision, rank=rank, part="bytes sent",
                      measured=comm.ledger().totals()["bytes_sent"], predicted=None),
                 dict(precision=precision, rank=rank, part="step peak",
                      measured=step["peak"], predicted=None)]
    return rows
