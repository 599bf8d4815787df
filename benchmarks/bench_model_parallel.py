"""Benchmark: distlab's tensor-parallel MLP block against PyTorch's own tensor parallelism.

Both split the same MLP block (Linear d->4d, GeLU, Linear 4d->d) over 2 ranks the Megatron
way (column- then row-parallel); PyTorch's is ``parallelize_module`` with ``ColwiseParallel``
and ``RowwiseParallel`` on a DTensor device mesh. In the same launch, each is timed for a
forward plus backward pass (median of several), and their outputs are compared with the
unsplit block. The 1F1B pipeline is timed against the unsplit model's step too; PyTorch's
``torch.distributed.pipelining`` is not run: its schedules use ``batch_isend_irecv``, which
hangs on gloo.

Run:  .venv/bin/python benchmarks/bench_model_parallel.py   (writes results/model_parallel.md)
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time

import torch

import distlab

WORLD_SIZE, D_MODEL, TOKENS, ITERS = 2, 256, 512, 15


def _median_time(fn, iters=ITERS, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def tensor_parallel_worker():
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    from distlab import comm
    from distlab.model_parallel.tensor_parallel import ParallelMLP
    from distlab.problems.transformer import FeedForward
    torch.manual_seed(0)
    full = FeedForward(D_MODEL)
    x = torch.randn(TOKENS, D_MODEL)
    want = full(x)

    ours = ParallelMLP.from_modules(full.fc1, full.act, full.fc2)
    theirs = FeedForward(D_MODEL)
    theirs.load_state_dict(full.state_dict())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    theirs = parallelize_module(theirs, mesh, {"fc1": ColwiseParallel(),
                                               "fc2": RowwiseParallel()})
    torch.testing.assert_close(ours(x), want)
    torch.testing.assert_close(theirs(x), want)

    def step(model):
        return lambda: model(x).sum().backward()

    single = _median_time(step(full))           # this rank alone, one thread
    comm.ledger().reset()
    t_ours = _median_time(step(ours))
    ours_bytes = comm.ledger().totals()["bytes_sent"] / (ITERS + 3)
    t_theirs = _median_time(step(theirs))
    return {"single": single, "distlab": t_ours, "torch": t_theirs, "bytes": ours_bytes}


def pipeline_worker(config):
    from distlab.model_parallel import pipeline
    t = time.perf_counter()
    result = pipeline.train(config)
    return time.perf_counter() - t, result


def main():
    rows = []
    tp = distlab.launch(tensor_parallel_worker, WORLD_SIZE, timeout=300)[0]
    rows.append(("TP MLP block fwd+bwd, 2 ranks (ms)", tp["distlab"] * 1e3, tp["torch"] * 1e3,
                 tp["distlab"] / tp["torch"]))
    rows.append(("  (unsplit block, 1 process, ms)", tp["single"] * 1e3, float("nan"),
                 float("nan")))

    from distlab.model_parallel import pipeline
    from distlab.problems.workloads import Workload
    wl = Workload("mlp", hidden=512, depth=3, batch_size=256, num_steps=20).loaded()
    torch.set_num_threads(1)          # as each worker: one thread per rank
    t = time.perf_counter()
    pipeline.reference(pipeline.PipelineConfig(wl, 2, 4))
    single = (time.perf_counter() - t) / wl.num_steps
    for sched in pipeline.SCHEDULES:
        res = distlab.launch(pipeline_worker, 2, pipeline.PipelineConfig(wl, 2, 4, sched))
        per_step = max(r[0] for r in res) / wl.num_steps     # build + train, slowest rank
        rows.append((f"pipeline {sched}, 2 stages, m=4, step (ms)", per_step * 1e3,
                     float("nan"), per_step / single))
    rows.append(("  (unsplit MLP, 1 process, step ms)", single * 1e3, float("nan"),
                 float("nan")))

    lines = ["| measurement | distlab | PyTorch | ratio |", "|---|---|---|---|"]
    for name, a, b, r in rows:
        fmt = lambda v: "–" if v != v else f"{v:.2f}"
        lines.append(f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(r)} |")
    table = "\n".join(lines)
    print(table)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "model_parallel.md")
    with open(out, "w") as f:
        f.write(f"# Model parallelism benchmark\n\nCommand: `.venv/bin/python "
                f"benchmarks/bench_model_parallel.py`  \nDate: "
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  \n"
                f"Machine: {os.cpu_count()} CPU cores, shared; gloo; torch {torch.__version__}"
                f"\n\nTP: MLP block d_model={D_MODEL}, {TOKENS} tokens, median of {ITERS}; "
                f"distlab sent {tp['bytes'] / 1024:.0f} KiB per rank per step. Ratio: distlab / "
                f"PyTorch (tensor parallel), or pipelined step / unsplit step (pipeline; "
                f"> 1 on one machine: the split adds messages and gains no memory).\n"
                f"Target: distlab's TP within 1.5x of PyTorch's.\n\n{table}\n")
    print("written to", out, file=sys.stderr)


if __name__ == "__main__":
    main()
