"""PowerSGD: distlab's against PyTorch's own ``powerSGD_hook`` on DDP, in one run.

Run:  .venv/bin/python benchmarks/bench_powersgd.py [--ranks 2] [--pairs 8] [--steps 100]
      [--hidden 128] [--floats 1048576] [--out DIR]   (writes DIR/powersgd.md, default results/)

The same workload (an MLP of two hidden layers on the digits, SGD), seed, slices and
settings (rank 1, 10 steps of plain all-reduce, error feedback, warm start) run by
``distlab.communication_efficient.powersgd.train`` and by
``torch.nn.parallel.DistributedDataParallel`` with
``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` (``powersgd.train_torch_hook``),
alternately in the same processes (distlab, PyTorch, distlab, ...). Reported as ratios
distlab / PyTorch: bytes per compressed step (both counted in distlab's ledger at model
bytes), final loss, max |parameter difference|, and time per compressed step (each run's
median step, then the median of the interleaved pairs' ratios with min and max). Targets:
equal bytes, final loss within 1%, time <= 1.2x PyTorch's.

Then the compressed all-reduce (:mod:`distlab.communication_efficient.compressed_all_reduce`)
with the sign compressor: bytes per rank against the number of ranks N, the two-phase
version beside today's all-gather and float32's ring all-reduce, by formula up to 64 ranks
and measured in the ledger on 2, 3 and 4 ranks; and the crossover N.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

import report
from report import fmt_ratio, interleaved, load, pair_ratios, spread, write

import distlab
from distlab.communication import alpha_beta
from distlab.communication_efficient import compressed_all_reduce as C
from distlab.communication_efficient import powersgd
from distlab.communication_efficient.local_training import with_data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="world size")
    ap.add_argument("--pairs", type=int, default=8, help="interleaved pairs")
    ap.add_argument("--steps", type=int, default=100, help="SGD steps per run")
    ap.add_argument("--hidden", type=int, default=128, help="MLP hidden width")
    ap.add_argument("--floats", type=int, default=2 ** 20, help="compressed all-reduce length")
    args = report.parse_args(ap, argv)
    distlab.warm_up()
    t0, load_before = time.time(), load()
    workload = replace(powersgd.WORKLOAD, hidden=args.hidden, num_steps=args.steps,
                       batch_size=16 * args.ranks)
    config = with_data(powersgd.PowerSGDConfig(workload=workload, world_size=args.ranks,
                                               matrix_rank=1, start_iter=10))
    out = distlab.launch(_worker, args.ranks, config, args.pairs, timeout=600)[0]
    ours, theirs = out["ours"], out["theirs"]
    start = config.start_iter
    bytes_ours, bytes_theirs = ours["bytes_sent"][start], theirs["bytes_sent"][start]
    formula = powersgd.bytes_per_step(config)
    loss_ours, loss_theirs = _final_loss(ours), _final_loss(theirs)
    diff = (torch.tensor(ours["params"]) - torch.tensor(theirs["params"])).abs().max().item()
    times = pair_ratios(out["ours_times"], out["theirs_times"])
    table = all_reduce_table(args.floats)
    met = (bytes_ours == bytes_theirs and abs(loss_ours / loss_theirs - 1) <= 0.01
           and times["median"] <= 1.2)
    body = [
        f"torch {torch.__version__}, gloo on CPU, {args.ranks} ranks, one thread per rank, "
        f"loopback; took {time.time() - t0:.0f} s.", "",
        f"Workload: MLP 64-{args.hidden}-{args.hidden}-10 on the digits, SGD lr "
        f"{workload.lr}, global batch {workload.batch_size}, {args.steps} steps; PowerSGD "
        f"rank 1 from step {start} (plain all-reduce before), error feedback, warm start.", "",
        "| measure | distlab | PyTorch hook | distlab / PyTorch |", "|---|---|---|---|",
        f"| bytes per rank, compressed step | {bytes_ours:,} | {bytes_theirs:,} "
        f"| {bytes_ours / bytes_theirs:.3f} |",
        f"| bytes per rank, plain step (float32) | {ours['bytes_sent'][0]:,} "
        f"| {theirs['bytes_sent'][0]:,} | {ours['bytes_sent'][0] / theirs['bytes_sent'][0]:.3f} |",
        f"| final loss (mean over ranks) | {loss_ours:.6f} | {loss_theirs:.6f} "
        f"| {loss_ours / loss_theirs:.6f} |",
        f"| time per compressed step, ms (median run) | "
        f"{spread(out['ours_times'])['median'] * 1e3:.3f} "
        f"| {spread(out['theirs_times'])['median'] * 1e3:.3f} | {fmt_ratio(times)} |", "",
        f"Max |parameter difference| after {args.steps} steps: {diff:.1e}. Formula "
        f"(`powersgd.bytes_per_step`): {formula['powersgd']:,} bytes compressed, "
        f"{formula['all_reduce']:,} plain: {formula['all_reduce'] / formula['powersgd']:.1f}x "
        "fewer.", "",
        f"**Targets: equal bytes, final loss within 1%, time <= 1.2x PyTorch's (median "
        f"pair): {'met' if met else 'NOT met'}.**", "",
        f"## Compressed all-reduce of {args.floats:,} floats, sign compressor: bytes per rank",
        "", *table,
    ]
    write("powersgd", "PowerSGD: distlab against PyTorch's powerSGD_hook", body, load_before)


def _final_loss(result) -> float:
    return result["mean_loss"][-1]


def all_reduce_table(n, measured=(2, 3, 4)):
    """Bytes per rank against N: formula for both versions (the two-phase one's largest
    rank), float32's ring all-reduce, and the ledger's count on ``measured`` world sizes."""
    lines = ["| N | all-gather (today) | two-phase | float32 ring all-reduce "
             "| two-phase / all-gather | ledger = formula |", "|---|---|---|---|---|---|"]
    for p in (2, 3, 4, 8, 16, 32, 64):
        gather = C.bytes_per_rank("all_gather", n, p)
        two = [C.bytes_per_rank("two_phase", n, p, rank=r) for r in range(p)]
        exact = "–"
        if p in measured:
            got = distlab.launch(_all_reduce_worker, p, n)
            exact = "yes" if [g["two_phase"] for g in got] == two and all(
                g["all_gather"] == gather for g in got) else f"NO ({got})"
        lines.append(f"| {p} | {gather:,} | {max(two):,} "
                     f"| {alpha_beta.ring_all_reduce_bytes(4 * n, p):,} "
                     f"| {max(two) / gather:.2f} | {exact} |")
    lines += ["", f"Crossover: the two-phase version sends fewer bytes from N = "
              f"{C.crossover_world_size(n)} on (`crossover_world_size`)."]
    return lines


# -- on every rank ---------------------------------------------------------------------------

def _worker(config, pairs):
    """Interleaved runs of distlab's PowerSGD and PyTorch's hook; each run's median time of
    a compressed step; the last runs' results, with the loss averaged over ranks."""
    import torch.distributed as dist
    last = {}

    def timed(name, train):
        def once():
            result = train(config, record=lambda **r: None)
            loss = torch.tensor(result["loss"])
            dist.all_reduce(loss)                 # the mean over ranks: the global batch's
            last[name] = {**result, "mean_loss": (loss / config.world_size).tolist()}
            return statistics.median(result["step_time"][config.start_iter:])
        return once

    a, b = interleaved(timed("ours", powersgd.train),
                       timed("theirs", powersgd.train_torch_hook), pairs)
    return {**last, "ours_times": a, "theirs_times": b}


def _all_reduce_worker(n):
    """Bytes this rank sent in one call of each version, with error feedback."""
    import torch.distributed as dist
    from distlab import comm
    from distlab.communication_efficient.compression import Sign, all_reduce_compressed
    p, r, x = dist.get_world_size(), dist.get_rank(), torch.randn(n)
    sent = {}
    for name, call in (("two_phase", lambda: C.compressed_all_reduce(
            x, Sign(), torch.zeros(n), torch.zeros(C.chunk_sizes(n, p)[r]))),
                       ("all_gather", lambda: all_reduce_compressed(x, Sign(), torch.zeros(n)))):
        before = comm.ledger().totals()["bytes_sent"]
        call()
        sent[name] = comm.ledger().totals()["bytes_sent"] - before
    return sent


if __name__ == "__main__":
    main()
