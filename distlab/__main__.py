"""distlab's command line: a headless demo, and every algorithm as a training job.

``python -m distlab demo``
    Synchronous against asynchronous SGD on 4 real gloo workers (plus a parameter-server
    rank), one worker a 3x straggler; writes an HTML report with the plots.

``python -m distlab course release OUT`` / ``course grade DIR --out grades.csv``
    The instructor's commands: write the labs' student notebooks, grade submissions
    (:mod:`distlab.course.grading`).

``python -m distlab train --algo ALGO --nproc 4``
    Trains with one of distlab's algorithms (:data:`ALGORITHMS`) on N processes started by
    :func:`distlab.launch`, and prints rank 0's final metrics as one JSON line (``loss``
    always). Under ``torchrun`` the same command trains on the processes torchrun started,
    on one node or many (env:// rendezvous; NCCL when every rank has a GPU)::

        torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d \\
                 --rdzv-endpoint=$MASTER_ADDR:29500 -m distlab train --algo zero --stage 2

    ``docs/cluster.md`` says what changes on a real cluster, ``docs/slurm/train.sbatch``
    is a Slurm job.

Each algorithm has one small builder below: it turns the flags into the algorithm's
frozen config (validated before any process starts: a bad flag is refused by the config
that owns it) and returns the function every rank runs. Flags left out keep the config's
defaults, the workload's too: ``--batch-size`` is the workload's ``batch_size`` as that
algorithm defines it (the global batch of a step for most; one push for the parameter
server; a local step's batch over the sampled clients for FedAvg). Not here: Hogwild!
(parameters in one machine's shared memory, no torch.distributed traffic) and simulated
staleness (a one-process simulation); both run from their labs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import MISSING, fields, replace

TASKS = {"linear": "linear", "digits": "mlp", "text": "transformer"}
"""``--task``: the :class:`~distlab.problems.workloads.Workload` model that learns it."""
WORKLOAD_FLAGS = {"steps": "num_steps", "lr": "lr", "batch_size": "batch_size",
                  "hidden": "hidden", "depth": "depth", "seed": "seed"}
"""Flags (argparse names) that set a field of the algorithm's workload."""


def main(argv=None) -> int:
    """The ``distlab`` command: parse ``argv`` and run the demo or a training job."""
    from distlab import __version__
    parser = argparse.ArgumentParser(prog="distlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"distlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="sync vs async SGD on 4 real workers; writes an HTML report")
    d.add_argument("--out", default="distlab-demo.html", help="the report's path")
    d.add_argument("--steps", type=int, default=None, help="server updates per run")
    d.add_argument("--straggler", type=float, default=3.0, help="slowdown of worker 0")
    t = sub.add_parser("train", help="train with one algorithm (under torchrun or not)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="algorithms:\n" + "\n".join(
                           f"  {k:10} {build.__doc__.splitlines()[0]} (flags: "
                           f"{', '.join('--' + f.replace('_', '-') for f in knobs) or 'none'})"
                           for k, (build, knobs) in ALGORITHMS.items()))
    t.add_argument("--algo", choices=list(ALGORITHMS), default="ddp")
    t.add_argument("--nproc", type=int, default=4, help="processes, when not under torchrun")
    t.add_argument("--timeout", type=float, default=600, help="seconds (distlab's launcher)")
    w = t.add_argument_group("the workload (default: the algorithm's own)")
    w.add_argument("--task", choices=list(TASKS), default=None,
                   help="linear regression, the digits MLP, or the transformer on the text")
    w.add_argument("--steps", type=int, help="optimizer steps (workload.num_steps)")
    w.add_argument("--lr", type=float)
    w.add_argument("--batch-size", type=int, help="workload.batch_size, as the algorithm "
                   "defines it (for most: the global batch of one step)")
    w.add_argument("--hidden", type=int)
    w.add_argument("--depth", type=int)
    w.add_argument("--seed", type=int)
    k = t.add_argument_group("the algorithm's knobs (default: its config's own)")
    k.add_argument("--variant", help="ddp: naive, flat, overlap or bucketed")
    k.add_argument("--stage", type=int, help="zero: 0, 1, 2 or 3")
    k.add_argument("--optimizer", help="zero, fsdp: sgd, adam, adamw; local_sgd: sgd, adam, "
                   "lamb, onebit_adam")
    k.add_argument("--staleness", type=int, help="ps: the SSP bound (0 = BSP; leave it out "
                   "for fully asynchronous)")
    k.add_argument("--num-servers", type=int, help="ps: server shards")
    k.add_argument("--period", type=int, help="local_sgd: local steps between averages")
    k.add_argument("--num-clients", type=int, help="fedavg: clients K")
    k.add_argument("--client-fraction", type=float, help="fedavg: fraction C sampled a round")
    k.add_argument("--local-steps", type=int, help="fedavg: local steps E per round")
    k.add_argument("--checkpoint-dir", help="elastic: a folder every node can reach")
    k.add_argument("--checkpoint-every", type=int, help="elastic: steps between checkpoints")
    k.add_argument("--tp", type=int, help="mesh: tensor-parallel degree (dp = ranks / tp)")
    k.add_argument("--schedule", help="pipeline: gpipe, 1f1b, interleaved or zb-h1")
    k.add_argument("--virtual-stages", dest="virtual_stages", type=int,
                   help="pipeline, interleaved: model chunks per rank")
    k.add_argument("--microbatches", "--num-microbatches", dest="num_microbatches", type=int,
                   help="pipeline: microbatches per batch")
    from distlab.course.grading.cli import add_parser as add_course_parser
    course = add_course_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "course":
        from distlab.course.grading.cli import run as course_command
        return course_command(args, course)
    if args.command == "demo":
        from distlab.course.demo import demo
        from distlab.course.settings import scale
        demo(args.out, args.steps or scale(200, 60), args.straggler)
        return 0
    try:
        return train_command(args)
    except BadFlags as e:
        t.error(str(e))   # exit status 2, the usage and the message, no traceback


class BadFlags(ValueError):
    """Flags the algorithm refused, before any process started."""


def train_command(args) -> int:
    """Train ``args.algo``; rank 0 prints its final metrics as one JSON line."""
    t0 = time.time()
    build, knobs = ALGORITHMS[args.algo]
    unused = [k for k in _KNOB_NAMES if k not in knobs and getattr(args, k) is not None]
    if unused:
        raise BadFlags(f"--algo {args.algo} does not take " + ", ".join(
            "--" + k.replace("_", "-") for k in unused))
    if _under_torchrun():
        import torch.distributed as dist

        from distlab.worker import init_from_env
        init_from_env()
        try:
            world_size, backend = dist.get_world_size(), dist.get_backend()
            metrics = _built(build, args, world_size)()
            if dist.get_rank() != 0:
                return 0
        finally:
            dist.destroy_process_group()
    else:
        from distlab.launcher import launch, resolve_backend
        per_rank = _built(build, args, args.nproc)     # bad flags fail here, before any process
        metrics = launch(per_rank, args.nproc, timeout=args.timeout)[0]
        world_size, backend = args.nproc, resolve_backend(None, args.nproc)
    print(json.dumps({"algo": args.algo, "world_size": world_size, "backend": backend,
                      "seconds": round(time.time() - t0, 2), **metrics}, default=str),
          flush=True)
    return 0


# --- one builder per algorithm: (args, world_size) -> the function every rank runs --------

def _ddp(args, world_size: int):
    """synchronous data-parallel SGD, DDP from scratch"""
    from distlab.data_parallel import sync_sgd
    config = sync_sgd.SyncSGDConfig(workload=_workload(args, sync_sgd.SyncSGDConfig),
                                    world_size=world_size, **_given(args, "variant"))
    return lambda group=None: sync_sgd.train(config, group)["final"]


def _zero(args, world_size: int, **stage):
    """ZeRO stages 0-3: optimizer state, gradients, parameters sharded"""
    from distlab.course import lab04_sharding as zero
    config = zero.ZeroConfig(workload=_workload(args, zero.ZeroConfig), world_size=world_size,
                             **_given(args, "stage", "optimizer"), **stage)

    def per_rank(group=None):
        result = zero.train(config, group)
        return {"loss": _loss_of(config.workload, result["params"]),
                "bytes_per_step": result["bytes_per_step"], "memory": result["memory"]}
    return per_rank


def _fsdp(args, world_size: int):
    """FSDP: ZeRO stage 3, parameters gathered layer by layer"""
    return _zero(args, world_size, stage=3)


def _ps(args, world_size: int):
    """parameter server, asynchronous or with an SSP staleness bound"""
    import torch.distributed as dist

    from distlab.asynchronous import parameter_server as ps
    knobs = _given(args, "staleness", "num_servers")
    config = ps.ParameterServerConfig(workload=_workload(args, ps.ParameterServerConfig),
                                      num_workers=world_size - knobs.get(
                                          "num_servers", ps.ParameterServerConfig.num_servers),
                                      **knobs)

    def per_rank(group=None):
        if dist.get_backend(group) != "gloo":
            group = dist.new_group(backend="gloo")   # a server receives from any source
        result = ps.train(config, group)
        return {k: result[k] for k in ("role", "loss", "version", "lost", "stopped")
                if k in result}
    return per_rank


def _local_sgd(args, world_size: int):
    """local SGD: average the models every --period steps"""
    from distlab.communication_efficient import local_sgd
    config = local_sgd.LocalSGDConfig(workload=_workload(args, local_sgd.LocalSGDConfig),
                                      world_size=world_size,
                                      **_given(args, "period", "optimizer"))
    return lambda group=None: _without_params(local_sgd.train(config, group))


def _fedavg(args, world_size: int):
    """federated averaging over clients hosted by the ranks"""
    from distlab.communication_efficient import fedavg
    config = fedavg.FedAvgConfig(workload=_workload(args, fedavg.FedAvgConfig),
                                 world_size=world_size, **_given(
                                     args, "num_clients", "client_fraction", "local_steps"))
    return lambda group=None: _without_params(fedavg.train(config, group))


def _elastic(args, world_size: int):
    """checkpointed synchronous SGD that resumes from --checkpoint-dir"""
    from distlab.fault_tolerance import elastic
    folder = args.checkpoint_dir or ""   # none: no checkpoints, unless --checkpoint-every
    knobs = {} if folder else {"checkpoint_every": 0}
    knobs.update(_given(args, "checkpoint_every"))
    config = elastic.TrainConfig(folder, workload=_workload(args, elastic.TrainConfig), **knobs)

    def per_rank(group=None):
        # torchrun --max-restarts counts its restarts; the worker resumes either way.
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        result = elastic.train(config, group, attempt=attempt)
        return {"loss": result["history"][-1][1], "start_step": result["start_step"]}
    return per_rank


def _tp(args, world_size: int):
    """tensor parallel (Megatron-LM): every weight matrix split over all the ranks"""
    return _mesh(args, world_size, tp=world_size)


def _mesh(args, world_size: int, tp: int | None = None):
    """data parallel x tensor parallel on a grid of --tp ranks per replica"""
    from distlab.model_parallel import mesh
    degree = tp or args.tp or mesh.MeshConfig.tp
    if world_size % degree:
        raise BadFlags(f"--tp {degree} does not divide the {world_size} ranks")
    config = mesh.MeshConfig(workload=_workload(args, mesh.MeshConfig),
                             dp=world_size // degree, tp=degree)

    def per_rank(group=None):
        result = mesh.train(config, group)
        return {"loss": result["losses"][-1], "dp": config.dp, "tp": config.tp,
                "bytes_sent": result["bytes_sent"], "comm_time": result["comm_time"]}
    return per_rank


def _pipeline(args, world_size: int):
    """pipeline parallel: one stage per rank, GPipe, 1F1B, interleaved 1F1B or ZB-H1"""
    from distlab.model_parallel import pipeline
    config = pipeline.PipelineConfig(workload=_workload(args, pipeline.PipelineConfig),
                                     num_stages=world_size,
                                     **_given(args, "schedule", "num_microbatches",
                                            "virtual_stages"))

    def per_rank(group=None):
        result = pipeline.train(config, group)
        return {"loss": _from_last_rank(result["losses"][-1] if result["losses"] else 0.0,
                                        group),
                "schedule": config.schedule, "num_microbatches": config.num_microbatches,
                "peak_activations": result["peak_activations"]}
    return per_rank


ALGORITHMS = {
    "ddp": (_ddp, ("variant",)),
    "zero": (_zero, ("stage", "optimizer")),
    "fsdp": (_fsdp, ("optimizer",)),
    "ps": (_ps, ("staleness", "num_servers")),
    "local_sgd": (_local_sgd, ("period", "optimizer")),
    "fedavg": (_fedavg, ("num_clients", "client_fraction", "local_steps")),
    "elastic": (_elastic, ("checkpoint_dir", "checkpoint_every")),
    "tp": (_tp, ()),
    "mesh": (_mesh, ("tp",)),
    "pipeline": (_pipeline, ("schedule", "num_microbatches", "virtual_stages")),
}
"""``{--algo: (build(args, world_size) -> the per-rank function, the knobs it reads)}``."""
_KNOB_NAMES = sorted({k for _, knobs in ALGORITHMS.values() for k in knobs})


# --- helpers ------------------------------------------------------------------------------

def _built(build, args, world_size: int):
    """``build(args, world_size)``, a refused value reported as :class:`BadFlags`."""
    try:
        return build(args, world_size)
    except BadFlags:
        raise
    except (ValueError, TypeError) as e:   # the config names the field and what it allows
        raise BadFlags(f"--algo {args.algo}: {e}") from e


def _given(args, *names) -> dict:
    """The knobs among ``names`` that were given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _workload(args, config_cls):
    """The default workload of ``config_cls`` with the workload flags given, data loaded.

    Loaded once here, the data travels to the ranks with the config.
    """
    default = next(f for f in fields(config_cls) if f.name == "workload")
    workload = default.default if default.default is not MISSING else default.default_factory()
    changes = {field: getattr(args, flag) for flag, field in WORKLOAD_FLAGS.items()
               if getattr(args, flag) is not None}
    if args.task is not None:
        changes["model"] = TASKS[args.task]
    return replace(workload, **changes).loaded()


def _loss_of(workload, params) -> float:
    """The loss of the flat parameters ``params`` on the workload's last batch."""
    import torch
    model = workload.build_model()
    torch.nn.utils.vector_to_parameters(params, model.parameters())
    *_, (X, y) = workload.batches()
    with torch.no_grad():
        return workload.loss(model(X), y).item()


def _from_last_rank(value: float, group=None) -> float:
    """``value`` as the group's last rank holds it (the pipeline's loss), on every rank."""
    import torch
    import torch.distributed as dist

    from distlab import comm
    from distlab.launcher import device
    t = torch.tensor([value], device=device())
    last = dist.get_world_size(group) - 1
    comm.broadcast(t, src=last if group is None else dist.get_global_rank(group, last),
                   group=group)
    return t.item()


def _without_params(result: dict) -> dict:
    # The weights and FedAvg's per-round client lists are not a summary line.
    return {k: v for k, v in result.items() if k not in ("params", "rounds")}


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


if __name__ == "__main__":
    sys.exit(main())
