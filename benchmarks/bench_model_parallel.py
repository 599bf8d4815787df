"""Benchmark: distlab's tensor-parallel MLP block against PyTorch's own tensor parallelism.

Both split the same MLP block (Linear d->4d, GeLU, Linear 4d->d) over 2 ranks the Megatron
way (column- then row-parallel); PyTorch's is ``parallelize_module`` with ``ColwiseParallel``
and ``RowwiseParallel`` on a DTensor device mesh. In the same launch their outputs are
compared with the unsplit block, then a forward plus backward pass of each is timed in
interleaved pairs (distlab, PyTorch, distlab, ...; the slowest rank's time), reported as the
median pair ratio with its min and max. The 1F1B and GPipe pipelines are timed against the
unsplit model's step the same way, in pairs of one launch and one single-process run;
PyTorch's ``torch.distributed.pipelining`` is not run: its schedules use
``batch_isend_irecv``, which hangs on gloo.

Run:  .venv/bin/python benchmarks/bench_model_parallel.py [--d-model 256] [--tokens 512]
      [--iters 15] [--hidden 512] [--steps 20] [--pairs 3] [--out DIR]
      (writes DIR/model_parallel.md, default results/)
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import report
from report import fmt_ratio, interleaved, load, pair_ratios, spread, write

import distlab
from distlab.model_parallel import pipeline
from distlab.problems.workloads import Workload

WORLD_SIZE, WARMUP = 2, 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256, help="TP block width")
    ap.add_argument("--tokens", type=int, default=512, help="TP block input rows")
    ap.add_argument("--iters", type=int, default=15, help="TP interleaved pairs")
    ap.add_argument("--hidden", type=int, default=512, help="pipeline MLP width")
    ap.add_argument("--steps", type=int, default=20, help="pipeline training steps per run")
    ap.add_argument("--pairs", type=int, default=3, help="pipeline interleaved pairs")
    args = report.parse_args(ap)
    load_before = load()
    tp = distlab.launch(tensor_parallel_worker, WORLD_SIZE, args.d_model, args.tokens,
                        args.iters, timeout=300)[0]
    rows = [("TP MLP block fwd+bwd, 2 ranks (ms)", _ms(tp["distlab"]), _ms(tp["torch"]),
             fmt_ratio(pair_ratios(tp["distlab"], tp["torch"]))),
            ("  (unsplit block, 1 process, ms)", _ms(tp["single"]), "–", "–")]

    wl = Workload("mlp", hidden=args.hidden, depth=3, batch_size=256,
                  num_steps=args.steps).loaded()
    torch.set_num_threads(1)          # as each worker: one thread per rank
    unsplit = lambda: _seconds(lambda: pipeline.reference(pipeline.PipelineConfig(wl, 2, 4)))
    for sched in pipeline.SCHEDULES:
        config = pipeline.PipelineConfig(wl, 2, 4, sched)
        piped, single = interleaved(lambda: _pipeline_seconds(config), unsplit,
                                    pairs=args.pairs, warmup=1)
        rows.append((f"pipeline {sched}, 2 stages, m=4, step (ms)",
                     _ms(piped, wl.num_steps), "–", fmt_ratio(pair_ratios(piped, single))))
    rows.append(("  (unsplit MLP, 1 process, step ms)", _ms(single, wl.num_steps), "–", "–"))

    body = [f"gloo; torch {torch.__version__}", "",
            f"TP: MLP block d_model={args.d_model}, {args.tokens} tokens, {args.iters} "
            f"interleaved pairs; distlab sent {tp['bytes'] / 1024:.0f} KiB per rank per step. "
            "Ratio: distlab / PyTorch (tensor parallel), or pipelined step / unsplit step "
            f"(pipeline, {args.pairs} pairs of a {args.steps}-step run; > 1 on one machine: "
            "the split adds messages and gains no memory), median (min-max) of the pairs.",
            "Target: distlab's TP within 1.5x of PyTorch's.", "",
            "| measurement | distlab | PyTorch | ratio |", "|---|---|---|---|",
            *[f"| {name} | {a} | {b} | {r} |" for name, a, b, r in rows]]
    write("model_parallel", "Model parallelism benchmark", body, load_before)


def tensor_parallel_worker(d_model, tokens, pairs):
    """Both TP blocks checked against the unsplit one, then timed in interleaved pairs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    from distlab import comm
    from distlab.model_parallel.tensor_parallel import ParallelMLP
    from distlab.problems.transformer import FeedForward
    torch.manual_seed(0)
    full = FeedForward(d_model)
    x = torch.randn(tokens, d_model)                  # (T, C)
    want = full(x)

    ours = ParallelMLP.from_modules(full.fc1, full.act, full.fc2)
    theirs = FeedForward(d_model)
    theirs.load_state_dict(full.state_dict())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    theirs = parallelize_module(theirs, mesh, {"fc1": ColwiseParallel(),
                                               "fc2": RowwiseParallel()})
    torch.testing.assert_close(ours(x), want)
    torch.testing.assert_close(theirs(x), want)

    def step(model):
        return lambda: model(x).sum().backward()

    single = [_seconds(step(full)) for _ in range(WARMUP + pairs)][WARMUP:]   # this rank alone
    comm.ledger().reset()
    t_ours, t_theirs = interleaved(_slowest(step(ours)), _slowest(step(theirs)), pairs=pairs,
                                   warmup=WARMUP)
    sent = comm.ledger().totals()["bytes_sent"] / (WARMUP + pairs)   # only ours goes via comm
    return {"single": single, "distlab": t_ours, "torch": t_theirs, "bytes": sent}


def _pipeline_seconds(config):
    """One launch: the slowest stage's seconds to build and train ``config``."""
    return max(distlab.launch(_pipeline_worker, config.num_stages, config))


def _pipeline_worker(config):
    return _seconds(lambda: pipeline.train(config))


def _slowest(fn):
    """A measurement: seconds of one ``fn()``, the slowest rank's (every rank agrees)."""
    def measure():
        dist.barrier()
        dt = torch.tensor([_seconds(fn)])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        return dt.item()
    return measure


def _seconds(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _ms(values, per=1):
    return f"{spread(values)['median'] / per * 1e3:.2f}"


if __name__ == "__main__":
    main()
