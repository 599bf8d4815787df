"""Low-communication training: every method against DDP, in one run (lab 10's table).

Run:  .venv/bin/python benchmarks/bench_low_communication.py [--ranks 2] [--steps 40]
      [--period 10] [--out DIR]   (writes DIR/low_communication.md, default results/)

One launch of ``distlab.communication_efficient.budget.compare``: one model (the digits MLP
of 38,410 parameters), data and seed, the same inner steps and ranks for DDP, local SGD,
DiLoCo, streaming DiLoCo, PowerSGD, top-k with error feedback and 1-bit Adam, each on an
injected 1 Gbit/s and 100 Mbit/s network (alpha = 100 us; every message, the built-in
collectives' included, waits its alpha-beta time) and on the machine's own loopback.
Reported per method as ratios to DDP: bytes sent per rank (from the ledger; the same on
every network), final training loss, and wall time on each network. Bytes and loss are
deterministic; the wall times are one measurement each (the injected sleeps dominate them
at 100 Mbit/s; on the loopback they are mostly compute and noise). The PowerSGD-against-
PyTorch's-hook ratios are reported by ``benchmarks/bench_powersgd.py``.
"""
from __future__ import annotations

import argparse
import time

import report
from report import load, write

import distlab
from distlab.communication_efficient import budget

NETWORKS = [budget.GBIT, budget.GBIT / 10, None]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="world size")
    ap.add_argument("--steps", type=int, default=40, help="inner steps of every method")
    ap.add_argument("--period", type=int, default=10, help="H of local SGD and DiLoCo")
    args = report.parse_args(ap, argv)
    distlab.warm_up()
    t0, load_before = time.time(), load()
    table = budget.compare(budget.METHODS, bandwidth=NETWORKS, latency=1e-4,
                           world_size=args.ranks, num_steps=args.steps, period=args.period)
    ends = table.groupby(["network", "method"], sort=False).last()
    networks = list(table["network"].unique())        # in the order of NETWORKS
    first = ends.xs(networks[0], level="network")
    wall = {net: ends.xs(net, level="network")["wall_time"] for net in networks}
    header = ("| method | bytes sent per rank | bytes / DDP | final loss | loss / DDP | "
              + " | ".join(f"wall time / DDP, {net}" for net in networks) + " |")
    rows = [header, "|" + "---|" * (5 + len(networks))]
    for method in budget.METHODS:
        sent, loss = first.loc[method, "bytes_sent"], first.loc[method, "loss"]
        rows.append(f"| {method} | {sent:,.0f} | {sent / first.loc['ddp', 'bytes_sent']:.3f} | "
                    f"{loss:.4f} | {loss / first.loc['ddp', 'loss']:.3f} | "
                    + " | ".join(f"{w[method] / w['ddp']:.2f}" for w in wall.values()) + " |")
    same_bytes = (ends["bytes_sent"].unstack("network").nunique(axis=1) == 1).all()
    body = [
        f"{args.ranks} ranks, gloo on CPU, {args.steps} inner steps, H = {args.period}; "
        f"took {time.time() - t0:.0f} s.", "",
        f"Workload: {budget.WORKLOAD.model} {budget.WORKLOAD.hidden} hidden on the digits, "
        f"global batch {budget.WORKLOAD.batch_size}, seed {budget.WORKLOAD.seed}; each method "
        "with its own optimizer settings (`budget.config`).", "",
        *rows, "",
        f"DDP: {first.loc['ddp', 'bytes_sent']:,.0f} bytes, loss {first.loc['ddp', 'loss']:.4f}, "
        + ", ".join(f"{w['ddp']:.2f} s on {net}" for net, w in wall.items()) + ". "
        f"Bytes the same on every network: {'yes' if same_bytes else 'NO'}.",
    ]
    write("low_communication", "Low-communication training: every method against DDP, one run",
          body, load_before)


if __name__ == "__main__":
    main()
