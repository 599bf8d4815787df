"""PyTorch's own tensor parallelism (DeviceMesh, DTensor) beside distlab's Megatron layers.

:mod:`distlab.model_parallel.tensor_parallel` writes Megatron's layers by hand (Shoeybi et
al. 2019, section 3): weight shards as plain tensors, ``f`` and ``g`` as autograd
Functions. ``torch.distributed.tensor`` says the same thing declaratively: a
``DeviceMesh`` of ranks, and a *placement* per tensor, ``Shard(dim)``, ``Replicate()`` or
``Partial()`` (a sum not yet taken). ``parallelize_module`` with a plan turns a module's
``nn.Linear`` weights into DTensors:

* ``ColwiseParallel``: the weight (out, in) becomes ``Shard(0)``, the input ``Replicate()``;
  backward sums the input's gradient over the mesh (Megatron's ``f``);
* ``RowwiseParallel``: the weight becomes ``Shard(1)``; its output is ``Partial()``, made
  ``Replicate()`` by an all-reduce (Megatron's ``g``);
* ``SequenceParallel`` (Korthikanti et al. 2022, section 4.2.2): a LayerNorm whose input and
  output are ``Shard(1)``, tokens split, with ``ColwiseParallel(input_layouts=Shard(1))``
  all-gathering before the column-parallel linear and ``RowwiseParallel(output_layouts=
  Shard(1))`` reduce-scattering after the row-parallel one (distlab's
  :mod:`~distlab.model_parallel.sequence_parallel`).

The communication is the same as Megatron's (per block per step: 4 all-reduces of the
B·T·C activations, each ``2(p-1)·alpha + 2(p-1)/p·n·beta``; or under sequence parallelism
4 reduce-scatters and 4 all-gathers, the same bytes), but DTensor's collectives are
torch's functional ones, so :mod:`distlab.comm`'s ledger does not see them.

All of it runs on CPU with gloo in torch 2.13 (``init_device_mesh("cpu", (p,))``): the MLP,
the attention and ``SequenceParallel``. One thing DTensor cannot express for this model:
the fused [Q; K; V] projection, whose ``Shard(0)`` would give rank 0 all of Q and half of
K. Megatron's :func:`~distlab.model_parallel.tensor_parallel.column_shard` with
``parts=3`` splits each of Q, K and V; here the rows are permuted first so that a plain
``Shard(0)`` does the same, and each rank's attention counts its own heads
(torchtitan keeps separate ``wq``, ``wk``, ``wv`` for this reason).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               PrepareModuleOutput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from distlab.checks import is_int, require_arg
from distlab.model_parallel.sequence_parallel import TINY, SequenceParallelTransformer
from distlab.model_parallel.tensor_parallel import column_shard, shard_transformer
from distlab.problems.workloads import Workload


def compare(workload: Workload = TINY, world_size: int = 2, sequence_parallel: bool = False,
            **launch_kwargs) -> dict:
    """Run one forward and backward of ``workload``'s first batch through DTensor TP and
    through distlab's Megatron layers (or, with ``sequence_parallel``, torch's and
    distlab's sequence parallelism), same weights, on ``world_size`` gloo ranks.

    Returns rank 0's ``{"dtensor": logits, "distlab": logits, "max_abs_diff": float,
    "grad_max_abs_diff": float, "gradients": {"dtensor": {name: grad}, "distlab": {...}}}``
    (the differences are the largest over every rank's outputs and gradient shards; a
    sharded weight's gradient is this rank's shard, in Megatron's layout).
    Example: ``compare(world_size=2)["max_abs_diff"]`` -> about 1e-7.
    """
    from distlab.launcher import launch
    require_arg("workload", workload, isinstance(workload, Workload)
                and workload.model == "transformer", "a Workload with model='transformer'")
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= 16,
                "an int in 1..16")
    require_arg("sequence_parallel", sequence_parallel, isinstance(sequence_parallel, bool),
                "True or False")
    results = launch(compare_on_ranks, world_size, workload.loaded(), sequence_parallel,
                     backend="gloo", **launch_kwargs)
    return {**results[0], "max_abs_diff": max(r["max_abs_diff"] for r in results),
            "grad_max_abs_diff": max(r["grad_max_abs_diff"] for r in results)}


def compare_on_ranks(workload: Workload, sequence_parallel: bool = False) -> dict:
    """Worker (on the world group, the mesh's): :func:`compare` for this rank."""
    t, r = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (t,))
    full = workload.build_model()
    X, y = next(iter(workload.batches()))
    if sequence_parallel:
        ours = SequenceParallelTransformer.from_transformer(full)
        loss_fn = ours.loss
    else:
        ours, loss_fn = shard_transformer(full), workload.loss
    theirs = parallelize_transformer(full, mesh, sequence_parallel)
    mine = ours(X)                                  # (B, T, V), or (B, T/t, V) under SP
    loss_fn(mine, y).backward()
    if sequence_parallel:
        ours.finish_gradient_synchronization()
    logits = theirs(X)                              # (B, T, V) on every rank
    workload.loss(logits, y).backward()
    if sequence_parallel:                           # ours holds this rank's tokens only
        S = X.shape[1] // t
        logits = logits[:, r * S:(r + 1) * S]
    grads = {"dtensor": {n: _local(p.grad) for n, p in theirs.named_parameters()},
             "distlab": {n: p.grad for n, p in ours.named_parameters()}}
    diffs = [(g - grads["distlab"][n]).abs().max().item()
             for n, g in grads["dtensor"].items()]
    return {"dtensor": logits.detach(), "distlab": mine.detach(),
            "max_abs_diff": (logits - mine).abs().max().item(),
            "grad_max_abs_diff": max(diffs), "gradients": grads}


def parallelize_transformer(model: nn.Module, mesh, sequence_parallel: bool = False):
    """A copy of a :class:`~distlab.problems.transformer.TinyTransformer` split over
    ``mesh`` by ``parallelize_module``: every block's attention and MLP column- then
    row-parallel; with ``sequence_parallel`` its LayerNorms on token shards, the embedding's
    output split by tokens and the head's input gathered again."""
    out = copy.deepcopy(model)
    t = mesh.size()
    for block in out.blocks():
        _interleave_qkv(block.attn.qkv, t)
        block.attn.num_heads //= t                 # each rank attends with its own heads
        parallelize_module(block, mesh, block_plan(sequence_parallel))
    if sequence_parallel:
        # Embedding weights stay replicated; its output is cut to this rank's tokens
        # (Replicate -> Shard(1) is local; backward all-gathers the gradient), and the
        # head gets the whole sequence back (an all-gather forward).
        parallelize_module(out[0], mesh, PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1)))
        parallelize_module(out[-1], mesh, PrepareModuleInput(
            input_layouts=Shard(1), desired_input_layouts=Replicate(),
            use_local_output=True))
    return out


def block_plan(sequence_parallel: bool = False) -> dict:
    """The ``parallelize_module`` plan of one :class:`~distlab.problems.transformer.Block`."""
    if not sequence_parallel:
        return {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}
    return {"ln1": SequenceParallel(), "ln2": SequenceParallel(),
            "attn.qkv": ColwiseParallel(input_layouts=Shard(1)),
            "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp.fc1": ColwiseParallel(input_layouts=Shard(1)),
            "mlp.fc2": RowwiseParallel(output_layouts=Shard(1))}


def _interleave_qkv(qkv: nn.Linear, t: int) -> None:
    # Rows [Q; K; V] -> [Q_0; K_0; V_0; Q_1; ...]: chunk r of Shard(0) is Megatron's
    # column_shard(W, r, t, parts=3), whole heads of Q, K and V.
    with torch.no_grad():
        for p in (qkv.weight, qkv.bias):
            p.copy_(torch.cat([column_shard(p, r, t, parts=3) for r in range(t)]))


def _local(grad: torch.Tensor) -> torch.Tensor:
    # A sharded weight's gradient is compared by its shard, a replicated one whole.
    if not isinstance(grad, DTensor):
        return grad
    return grad.to_local() if any(isinstance(pl, Shard) for pl in grad.placements) \
        else grad.full_tensor()
