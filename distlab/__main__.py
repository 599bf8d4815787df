"""distlab's command line: a headless demo, and training jobs for torchrun.

``python -m distlab demo``
    Synchronous against asynchronous SGD on 4 real gloo workers (plus a parameter-server
    rank), one worker a 3x straggler; writes an HTML report with the plots.

``python -m distlab train --algo ddp --nproc 4``
    Runs one of distlab's training algorithms (:data:`ALGORITHMS`: ddp, ps, local_sgd) on N
    processes started by distlab.launch, and prints rank 0's final loss as one JSON line.
    Under ``torchrun`` the same command trains on the processes torchrun started (env://
    rendezvous, NCCL when each rank has a GPU)::

        torchrun --nproc-per-node=4 -m distlab train --algo ddp --task digits
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# --- train: one registry, each algorithm's config built from the flags --------------------

def _ddp(args, world_size: int):
    from distlab.data_parallel import sync_sgd
    from distlab.problems.workloads import Workload
    workload = Workload(model={"digits": "mlp"}.get(args.task, args.task), lr=args.lr,
                        num_steps=args.steps, batch_size=args.batch_size * world_size)
    config = sync_sgd.SyncSGDConfig(workload=workload.loaded(), world_size=world_size,
                                    variant=args.variant)   # --batch-size: per rank
    return lambda group: {"loss": sync_sgd.train(config, group)["losses"][-1]}


def _ps(args, world_size: int):
    from dataclasses import replace

    from distlab.asynchronous import parameter_server
    from distlab.problems.convex import WORKLOAD
    if world_size < 2:
        raise ValueError(f"--algo ps needs at least 2 processes (a server and a worker), "
                         f"got {world_size}")
    workload = replace(WORKLOAD, model={"digits": "mlp"}.get(args.task, args.task), lr=args.lr,
                       num_steps=args.steps, batch_size=args.batch_size)   # per push
    config = parameter_server.ParameterServerConfig(workload, num_workers=world_size - 1,
                                                    staleness=args.staleness)
    return lambda group: {k: v for k, v in parameter_server.train(config, group).items()
                          if k in ("role", "loss", "lost")}


def _local_sgd(args, world_size: int):
    from dataclasses import replace

    from distlab.communication_efficient import local_sgd
    if args.task != "digits":
        raise ValueError(f"--algo local_sgd trains the digits MLP; --task={args.task!r} is not "
                         "supported (use --task digits)")
    workload = replace(local_sgd.WORKLOAD, num_steps=args.steps, lr=args.lr,   # the digits MLP
                       batch_size=args.batch_size * world_size)   # --batch-size per rank
    config = local_sgd.LocalSGDConfig(workload=workload, world_size=world_size,
                                      period=args.period)
    return lambda group: {"loss": local_sgd.train(config, group)["loss"]}


ALGORITHMS = {
    "ddp": ("synchronous data-parallel SGD, DDP from scratch (--variant)", _ddp),
    "ps": ("parameter server with an SSP staleness bound (--staleness)", _ps),
    "local_sgd": ("local SGD: average the models every --period steps", _local_sgd),
}
"""``{--algo: (description, build(args, world_size) -> per-rank function of the group)}``."""


def _train_on_rank(algo: str, args) -> dict:
    """What every rank runs: build the algorithm's config, train, return the final metrics."""
    import torch.distributed as dist
    group = None
    if dist.get_backend() != "gloo" and algo == "ps":
        group = dist.new_group(backend="gloo")   # the server receives from any source
    return ALGORITHMS[algo][1](args, dist.get_world_size())(group)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def train_command(args) -> int:
    """Train ``args.algo``; rank 0's final metrics are printed as one JSON line."""
    t0 = time.time()
    if _under_torchrun():
        import torch.distributed as dist

        from distlab.worker import init_from_env
        init_from_env()
        try:
            result = _train_on_rank(args.algo, args)
            world_size, backend = dist.get_world_size(), dist.get_backend()
            if dist.get_rank() != 0:
                return 0
        finally:
            dist.destroy_process_group()
    else:
        from distlab.launcher import launch
        ALGORITHMS[args.algo][1](args, args.nproc)   # bad flags fail here, before any process
        result = launch(_train_on_rank, args.nproc, args.algo, args, timeout=args.timeout)[0]
        world_size, backend = args.nproc, "gloo"
    print(json.dumps({"algo": args.algo, "world_size": world_size, "backend": backend,
                      "loss": result.get("loss"), "seconds": round(time.time() - t0, 2),
                      "rank0": result}, default=str))
    return 0


def main(argv=None) -> int:
    from distlab import __version__
    parser = argparse.ArgumentParser(prog="distlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"distlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="sync vs async SGD on 4 real workers; writes an HTML report")
    d.add_argument("--out", default="distlab-demo.html", help="the report's path")
    d.add_argument("--steps", type=int, default=None, help="server updates per run")
    d.add_argument("--straggler", type=float, default=3.0, help="slowdown of worker 0")
    t = sub.add_parser("train", help="train with one algorithm (under torchrun or not)")
    t.add_argument("--algo", choices=sorted(ALGORITHMS), default="ddp",
                   help="; ".join(f"{k}: {v[0]}" for k, v in ALGORITHMS.items()))
    t.add_argument("--task", choices=("linear", "digits"), default="digits")
    t.add_argument("--nproc", type=int, default=4, help="processes, when not under torchrun")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--batch-size", type=int, default=32, help="examples per rank per step")
    t.add_argument("--variant", default="bucketed", help="DDP variant (ddp only)")
    t.add_argument("--staleness", type=int, default=None, help="SSP bound (ps only)")
    t.add_argument("--period", type=int, default=4, help="local steps between averages "
                   "(local_sgd only)")
    t.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from distlab.course.demo import demo
        from distlab.course.settings import scale
        demo(args.out, args.steps or scale(200, 60), args.straggler)
        return 0
    return train_command(args)


if __name__ == "__main__":
    sys.exit(main())
