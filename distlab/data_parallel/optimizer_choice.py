"""The optimizer for large models: SGD with momentum against Adam and AdamW, measured.

Adam (Kingma and Ba 2015, algorithm 1) scales each coordinate's step by a running estimate
of its gradient's second moment, so parameters whose gradients are small or rare (the
embeddings and attention of a transformer) move as fast as the rest; AdamW (Loshchilov and
Hutter 2019) decouples the weight decay from that scaling. SGD with momentum (Sutskever et
al. 2013) takes one learning rate for every coordinate, and on a transformer, whose
curvature differs by orders of magnitude between blocks, that rate is either too small for
some or unstable for others (Zhang et al. 2020, "Why are adaptive methods good for
attention models?"). The price is memory: per parameter, Adam keeps two fp32 moments
(K = 8 bytes), SGD with momentum one (K = 4), which is what ZeRO shards
(:func:`distlab.sharding.memory.predicted_bytes`, Rajbhandari et al. 2020).

:func:`compare` runs each optimizer with a small learning-rate sweep on the digits MLP
through :mod:`distlab.data_parallel.sync_sgd` and on the character transformer through
:mod:`distlab.model_parallel.mesh` (``dp=world_size, tp=1``), all on real ranks, one launch
per workload; each row adds the optimizer state measured on the model
(:func:`distlab.sharding.memory.measure`) and ZeRO's prediction for stages 0 to 3.

Communication: that of the loops it runs, one all-reduce of the 4n gradient bytes per step,
``2(p-1) alpha + 2(p-1)/p·4n beta``; the optimizer adds none (every rank steps the whole
model; ZeRO would shard the K·n state bytes, :mod:`distlab.sharding.zero`).
"""
from __future__ import annotations

from dataclasses import replace

from distlab import launcher
from distlab.checks import is_int, require_arg
from distlab.data_parallel import sync_sgd
from distlab.model_parallel import mesh
from distlab.problems.workloads import OPTIMIZERS, Workload
from distlab.sharding.memory import measure, predicted_bytes

MLP = Workload(model="mlp", hidden=16, depth=1, batch_size=32, num_steps=60)
"""The digits MLP: one hidden layer of 16, 60 steps of a global batch of 32."""
TRANSFORMER = Workload(model="transformer", hidden=32, depth=1, num_heads=4, block_size=16,
                       batch_size=16, num_steps=100)
"""The character transformer: d_model 32, one block, 16 characters of context, 100 steps."""
LRS = {"sgd": (0.1, 0.3, 1.0), "adam": (0.003, 0.01, 0.03), "adamw": (0.003, 0.01, 0.03)}
"""Each optimizer's sweep: three rates a factor of about 3 apart."""
MOMENTUM = 0.9
"""SGD's momentum (Sutskever et al. 2013)."""
WEIGHT_DECAY = 0.01
"""AdamW's decoupled weight decay (Adam and SGD run without one)."""
FINAL_STEPS = 10
"""``final_loss`` is the mean loss of the last this many steps (one batch's loss is noisy)."""


def compare(workloads=(MLP, TRANSFORMER), lrs: dict | None = None, world_size: int = 2,
            timeout: float = 300) -> list[dict]:
    """Train every workload with every optimizer at every rate of ``lrs`` on
    ``world_size`` real ranks: one row per run.

    Args:
        workloads: ``"mlp"`` (or ``"linear"``) workloads go through sync SGD, transformers
            through the mesh with ``dp=world_size, tp=1``; their ``lr`` and optimizer fields
            are set here.
        lrs: ``{optimizer name: rates}`` (None: :data:`LRS`).
        world_size: ranks, 1 to 8 (it must divide each workload's ``batch_size``).

    Returns:
        Rows ``{"workload", "optimizer", "lr", "final_loss", "best_loss", "losses",
        "num_params", "state_bytes_per_param"}`` (measured after one step, Adam's step
        counters included) and ``"zero{s}_state_bytes"``, ZeRO stage s's predicted
        optimizer-state bytes per rank at ``world_size``, s = 0..3.
    """
    lrs = LRS if lrs is None else lrs
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= 8,
                "an int in 1..8")
    require_arg("lrs", lrs, isinstance(lrs, dict) and lrs and set(lrs) <= set(OPTIMIZERS)
                and all(len(r) >= 1 for r in lrs.values()),
                f"a dict from names in {OPTIMIZERS} to rates")
    rows = []
    for workload in workloads:
        require_arg("workloads", workload, isinstance(workload, Workload), "Workloads")
        workload = workload.loaded()              # once: every variant keeps the data
        variants = [with_optimizer(workload, name, lr) for name in lrs for lr in lrs[name]]
        for variant, losses in zip(variants, _train(variants, world_size, timeout)):
            rows.append(_row(variant, losses, world_size))
    return rows


def with_optimizer(workload: Workload, name: str, lr: float) -> Workload:
    """``workload`` stepped by ``name`` at ``lr``: SGD with :data:`MOMENTUM`, Adam, or AdamW
    with :data:`WEIGHT_DECAY`."""
    return replace(workload, optimizer_name=name, lr=lr,
                   momentum=MOMENTUM if name == "sgd" else 0.0,
                   weight_decay=WEIGHT_DECAY if name == "adamw" else 0.0)


def state_bytes(workload: Workload) -> dict:
    """The optimizer state one rank holds after a step (measured by
    :func:`~distlab.sharding.memory.measure`), and the parameter count:
    ``{"num_params", "optimizer_state"}``."""
    model = workload.build_model()
    optimizer = workload.optimizer(model.parameters())
    X, y = next(replace(workload, num_steps=1).batches())
    workload.loss(model(X), y).backward()
    optimizer.step()                     # the state exists from the first step on
    return {"num_params": sum(p.numel() for p in model.parameters()),
            "optimizer_state": measure(model, optimizer)["optimizer_state"]}


def _train(variants: list[Workload], world_size: int, timeout: float) -> list[list[float]]:
    """Each variant's global-batch loss per step, all in one launch of ``world_size`` ranks."""
    if variants[0].model == "transformer":
        configs = [mesh.MeshConfig(workload=v, dp=world_size, tp=1) for v in variants]
        results = launcher.start(mesh.sweep, world_size, configs, timeout=timeout).result()
        return [r["losses"] for r in results[0]]     # the same global loss on every rank
    configs = [sync_sgd.SyncSGDConfig(workload=v, world_size=world_size,
                                      eval_every=v.num_steps) for v in variants]
    results = launcher.start(_sync_sweep, world_size, configs, timeout=timeout).result()
    # Each rank's loss is its share's mean: the global batch's loss is their mean.
    return [[sum(step) / world_size for step in zip(*(r[i]["losses"] for r in results))]
            for i in range(len(configs))]


def _sync_sweep(configs: list, group=None) -> list[dict]:
    """Worker: :func:`~distlab.data_parallel.sync_sgd.train` for every config in turn."""
    return [{"losses": sync_sgd.train(c, group)["losses"]} for c in configs]


def _row(workload: Workload, losses: list[float], world_size: int) -> dict:
    state = state_bytes(workload)
    n, name = state["num_params"], workload.optimizer_name
    return {"workload": workload.model, "optimizer": name, "lr": workload.lr,
            "final_loss": sum(losses[-FINAL_STEPS:]) / len(losses[-FINAL_STEPS:]),
            "best_loss": min(losses), "losses": losses, "num_params": n,
            "state_bytes_per_param": state["optimizer_state"] / n,
            **{f"zero{s}_state_bytes": predicted_bytes(n, s, world_size, name)["optimizer_state"]
               for s in range(4)}}


__all__ = ["compare", "with_optimizer", "state_bytes", "MLP", "TRANSFORMER", "LRS"]
