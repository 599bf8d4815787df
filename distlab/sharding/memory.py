"""Memory per rank: measured on the tensors each rank holds, beside ZeRO's formulas.

ZeRO (Rajbhandari et al. 2020, section 3.1 and Figure 1) counts the "model states" of mixed
precision Adam training with Ψ parameters: fp16 parameters 2Ψ, fp16 gradients 2Ψ, and K = 12
bytes of optimizer state per parameter (fp32 master weights, momentum and variance), so
(2 + 2 + K)Ψ bytes per rank in data parallelism. Each stage divides part of it by N ranks:

    stage 0   (2 + 2 + K)Ψ          stage 2   2Ψ + (2 + K)Ψ/N
    stage 1   (2 + 2)Ψ + KΨ/N       stage 3   (2 + 2 + K)Ψ/N

In fp32 the parameters are their own master weights: 4Ψ of parameters, 4Ψ of gradients and
K = 8 (Adam, AdamW: m and v) or K = 4 (SGD with momentum). :func:`predicted_bytes` gives
these, and with ``param_bytes=2, master_bytes=4`` the paper's 2 + 2 + K, K = 4 + 8 = 12
(``ShardedOptimizer(..., master_weights=True)``, ``distlab.precision.mixed``; at stage 3
``FullyShardedDataParallel(..., param_dtype=torch.bfloat16)`` with
:class:`~distlab.sharding.fsdp_mixed.MasterWeightOptimizer`, whose masters count here as
optimizer state since the optimizer steps them).
:func:`measure` adds up the bytes of the storages a rank really holds (each storage once,
so views and tied weights are not counted twice).
Activations and the transient buffers of one collective are not model states and are left
out, as in the paper.
"""
from __future__ import annotations

import torch

from distlab.checks import is_int, is_number, require_arg

CATEGORIES = ("params", "grads", "optimizer_state")
STATE_BYTES_PER_PARAM = {"sgd": 4, "adam": 8, "adamw": 8}
"""K in fp32: SGD with momentum keeps one buffer, Adam and AdamW two."""


def predicted_bytes(num_params: int, stage: int, world_size: int, optimizer: str = "adam",
                    param_bytes: int = 4, master_bytes: int = 0) -> dict[str, float]:
    """ZeRO's model-state bytes per rank (Rajbhandari et al. 2020, Figure 1).

    Args:
        num_params: Ψ, the number of trainable parameters.
        stage: 0 (plain data parallel) to 3.
        world_size: N.
        optimizer: "sgd" (with momentum), "adam" or "adamw".
        param_bytes: bytes per parameter and per gradient value (4 for fp32, 2 for 16 bits).
        master_bytes: bytes per parameter of the master weights, counted in the optimizer
            state (0 in fp32 training; 4 for the fp32 masters of 16-bit training).
    """
    _require_sizes(num_params, stage, world_size)
    require_arg("param_bytes", param_bytes, is_number(param_bytes) and param_bytes > 0,
                "a number > 0")
    require_arg("master_bytes", master_bytes, is_number(master_bytes) and master_bytes >= 0,
                "a number >= 0")
    if optimizer not in STATE_BYTES_PER_PARAM:
        raise ValueError(f"optimizer={optimizer!r} is unknown; allowed "
                         f"{sorted(STATE_BYTES_PER_PARAM)}")
    psi, n, k = num_params, world_size, STATE_BYTES_PER_PARAM[optimizer] + master_bytes
    return {"params": param_bytes * psi / (n if stage >= 3 else 1),
            "grads": param_bytes * psi / (n if stage >= 2 else 1),
            "optimizer_state": k * psi / (n if stage >= 1 else 1)}


def paper_bytes(num_params: int, stage: int, world_size: int, k: int = 12) -> float:
    """The paper's own mixed-precision formula, total bytes per rank (Figure 1)."""
    _require_sizes(num_params, stage, world_size)
    require_arg("k", k, is_number(k) and k >= 0, "a number >= 0")
    psi, n = num_params, world_size
    return [(2 + 2 + k) * psi, (2 + 2) * psi + k * psi / n, 2 * psi + (2 + k) * psi / n,
            (2 + 2 + k) * psi / n][stage]


def _require_sizes(num_params, stage, world_size) -> None:
    # The paper's Ψ = 7.5e9 is a float: any number >= 0 counts as a parameter count.
    require_arg("num_params", num_params, is_number(num_params) and num_params >= 0,
                "a number >= 0")
    require_arg("stage", stage, is_int(stage) and stage in (0, 1, 2, 3), "0, 1, 2, 3")
    require_arg("world_size", world_size, is_int(world_size) and world_size >= 1, "an int >= 1")


def _local_optimizer(optimizer):
    # ShardedOptimizer steps .optim, NaiveDistributedOptimizer wraps .optimizer.
    for name in ("optim", "optimizer"):
        inner = getattr(optimizer, name, None)
        if isinstance(inner, torch.optim.Optimizer):
            return inner
    return optimizer


def model_state_tensors(model: torch.nn.Module, optimizer) -> dict[str, list[torch.Tensor]]:
    """``{category: [tensor, ...]}`` for the ``CATEGORIES``, in the order
    :func:`measure` counts them (a storage reached twice counts in the first category)."""
    local = _local_optimizer(optimizer)
    local_params = [p for g in local.param_groups for p in g["params"]]
    shards = list(getattr(optimizer, "shards", []))    # ZeRO: 16-bit gradient shards
    params = list(model.parameters())
    return {
        "params": params,
        "grads": [p.grad for p in params + shards + local_params if p.grad is not None],
        "optimizer_state": local_params + [v for st in local.state.values()
                                           for v in st.values() if torch.is_tensor(v)],
    }


def measure(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds now.

    Every storage is counted once, in the first category that reaches it: a sharded
    optimizer's parameters are views of the model's, so they count as parameters; fp32
    master weights (what the optimizer steps in 16-bit training) are optimizer state.

    Args:
        model: the model as this rank holds it (an FSDP wrapper holds shards).
        optimizer: a torch optimizer, :class:`~distlab.sharding.zero.ShardedOptimizer` or
            :class:`~distlab.sharding.zero.NaiveDistributedOptimizer`.
    """
    tensors = model_state_tensors(model, optimizer)
    seen, out = set(), {}
    for category in CATEGORIES:
        total = 0
        for t in tensors[category]:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        out[category] = total
    return out
