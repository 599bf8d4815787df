"""Tensor parallelism: split every weight matrix across ranks (Megatron-LM).

Shoeybi et al. 2019, "Megatron-LM", section 3. A transformer's MLP ``Y = GeLU(X A) B`` is
split so that ranks never exchange the big hidden activation:

* ``A`` is split by *columns* (:class:`ColumnParallelLinear`): rank r computes
  ``GeLU(X A_r)``, its own slice of the hidden units, with no communication (GeLU is
  applied elementwise, so it commutes with the split);
* ``B`` is split by *rows* (:class:`RowParallelLinear`): rank r computes the partial
  product ``GeLU(X A_r) B_r``, and one all-reduce sums the partials into ``Y``.

Two conjugate operators make the gradients right (section 3, figure 3):

====== ============================== ==============================
        forward                        backward
====== ============================== ==============================
``f``   identity                       all-reduce of the input grad
``g``   all-reduce of the partials     identity
====== ============================== ==============================

``f`` sits where a replicated input enters the parallel region (every rank's slice of the
hidden units contributes to dL/dX, so those contributions are summed), ``g`` where the
region ends. Self-attention is split the same way, by heads: Q, K, V projections are
column-parallel (rank r owns heads ``r*h/p .. (r+1)*h/p``), the output projection is
row-parallel.

Cost (alpha-beta model, ring all-reduce of n bytes over p ranks: 2(p-1)alpha +
2(p-1)/p n beta): one all-reduce of the activations (batch x tokens x d_model) per MLP or
attention block in the forward pass, one more in the backward pass; weights are never sent.
Compare data parallelism: one all-reduce of all the *gradients* per step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distlab import comm
from distlab.checks import is_int, require, require_arg
from distlab.problems.transformer import attend


# ----------------------------------------------------------------------------------------
# Checking a split before any process starts.
# ----------------------------------------------------------------------------------------

def check_divisible(field: str, value: int, degree: int) -> None:
    """Raise ValueError unless ``value`` splits evenly over ``degree`` ranks.

    Megatron-LM gives every rank an equal slice; an uneven slice would make the all-reduce
    sum tensors of different shapes. We refuse it, naming a size that would work.
    """
    if value % degree:
        lower, upper = value - value % degree, value - value % degree + degree
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"{field}={value} is not divisible by the tensor-parallel degree "
                         f"{degree}; every rank needs an equal share: use {field}={hint}, or "
                         f"a degree that divides {value}")


@dataclass(frozen=True)
class TensorParallelConfig:
    """How a model is split by tensor parallelism; validated before launch."""
    degree: int
    """Ranks that share each weight matrix (1 = no tensor parallelism)."""
    hidden: int
    """Width that is split: the MLP hidden size (or d_model and 4 d_model in a transformer)."""
    num_heads: int = 0
    """Attention heads split across ranks (0: no attention in the model)."""

    def __post_init__(self):
        require(self, "degree", is_int(self.degree) and self.degree >= 1, "an int >= 1")
        require(self, "hidden", is_int(self.hidden) and self.hidden >= 1, "an int >= 1")
        require(self, "num_heads", is_int(self.num_heads) and self.num_heads >= 0,
                "an int >= 0 (0: no attention)")
        check_divisible("hidden", self.hidden, self.degree)
        if self.num_heads:
            check_divisible("num_heads", self.num_heads, self.degree)


# ----------------------------------------------------------------------------------------
# The conjugate communication operators f and g, as autograd Functions.
# ----------------------------------------------------------------------------------------

class CopyToParallelRegion(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()       # all_reduce is in place
        comm.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromParallelRegion(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        comm.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """``f(x)``: hand a replicated tensor to a parallel region."""
    return CopyToParallelRegion.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """``g(x)``: sum the ranks' partial results at the end of a parallel region."""
    return ReduceFromParallelRegion.apply(x, group)


# ----------------------------------------------------------------------------------------
# Slicing full weights into shards (and the inverse).
# ----------------------------------------------------------------------------------------

def column_shard(t: torch.Tensor, rank: int, degree: int, parts: int = 1) -> torch.Tensor:
    """Rank ``rank``'s rows of a weight (out, in) or bias (out,): its output units.

    ``parts`` > 1 for stacked matrices such as attention's fused [Q; K; V]: each part is
    split separately, so every rank gets whole heads of Q, K and V.
    """
    _check_shard(rank, degree, parts)
    check_divisible("rows", t.shape[0] // parts, degree)
    return torch.cat([p.chunk(degree, dim=0)[rank] for p in t.chunk(parts, dim=0)], dim=0)


def row_shard(t: torch.Tensor, rank: int, degree: int) -> torch.Tensor:
    """Rank ``rank``'s columns of a weight (out, in): its input units."""
    _check_shard(rank, degree)
    check_divisible("columns", t.shape[1], degree)
    return t.chunk(degree, dim=1)[rank]


def _check_shard(rank: int, degree: int, parts: int = 1) -> None:
    if not (is_int(degree) and degree >= 1 and is_int(parts) and parts >= 1):
        raise ValueError(f"degree={degree!r}, parts={parts!r}: allowed ints >= 1")
    require_arg("rank", rank, is_int(rank) and 0 <= rank < degree, f"an int in 0..{degree - 1}")


def _parameter(t: torch.Tensor) -> nn.Parameter:
    """A parameter holding a copy of ``t``: same dtype, device, and frozen if ``t`` is."""
    return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Linear:
    """A full ``nn.Linear`` holding ``weight`` and ``bias``, as trainable as ``like``'s."""
    full = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                     dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        full.weight.copy_(weight)
        if bias is not None:
            full.bias.copy_(bias)
    full.weight.requires_grad_(like.weight.requires_grad)
    if bias is not None:
        full.bias.requires_grad_(like.bias.requires_grad)
    return full


def _gather(shard: torch.Tensor, dim: int, group, parts: int = 1) -> torch.Tensor:
    degree = dist.get_world_size(group)
    pieces = [torch.empty_like(shard) for _ in range(degree)]
    comm.all_gather(pieces, shard.detach().contiguous(), group=group)
    # Undo column_shard: part k of the full tensor is part k of every rank's shard, in order.
    per_rank = [p.chunk(parts, dim=dim) for p in pieces]
    return torch.cat([torch.cat([r[k] for r in per_rank], dim=dim) for k in range(parts)], dim=dim)


# ----------------------------------------------------------------------------------------
# The parallel layers.
# ----------------------------------------------------------------------------------------

class ColumnParallelLinear(nn.Module):
    """``Y_r = f(X) A_r^T + b_r``: this rank's slice of the output units (section 3, eq. 3).

    Input replicated (B, ..., in); output split (B, ..., out/p). No communication forward;
    backward all-reduces dL/dX (through ``f``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None,
                 parts: int = 1):
        super().__init__()
        self.group, self.parts = group, parts
        self.weight = _parameter(weight)                          # (out/p, in)
        self.bias = None if bias is None else _parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, parts: int = 1):
        """Shard an existing ``nn.Linear``: keep this rank's output rows."""
        r, p = dist.get_rank(group), dist.get_world_size(group)
        check_divisible("out_features", linear.out_features // parts, p)
        bias = None if linear.bias is None else column_shard(linear.bias, r, p, parts)
        return cls(column_shard(linear.weight, r, p, parts), bias, group, parts)

    def forward(self, x):
        return F.linear(copy_to_parallel(x, self.group), self.weight, self.bias)

    def gather(self) -> nn.Linear:
        """The full ``nn.Linear`` (every rank gets it; a collective over ``group``)."""
        w = _gather(self.weight, 0, self.group, self.parts)
        b = None if self.bias is None else _gather(self.bias, 0, self.group, self.parts)
        return _linear(w, b, self)


class RowParallelLinear(nn.Module):
    """``Y = g(X_r B_r^T) + b``: partial products summed by one all-reduce (section 3).

    Input split (B, ..., in/p), as a column-parallel layer leaves it; output replicated.
    The bias is added once, after the sum (added before, it would be counted p times).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.group = group
        self.weight = _parameter(weight)                          # (out, in/p)
        self.bias = None if bias is None else _parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None):
        """Shard an existing ``nn.Linear``: keep this rank's input columns."""
        r, p = dist.get_rank(group), dist.get_world_size(group)
        check_divisible("in_features", linear.in_features, p)
        return cls(row_shard(linear.weight, r, p), linear.bias, group)

    def forward(self, x):
        y = reduce_from_parallel(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def gather(self) -> nn.Linear:
        """The full ``nn.Linear`` (every rank gets it; a collective over ``group``)."""
        return _linear(_gather(self.weight, 1, self.group), self.bias, self)


class ParallelMLP(nn.Module):
    """Column-parallel, activation, row-parallel: two linears, one all-reduce each way."""

    def __init__(self, fc1: ColumnParallelLinear, act: nn.Module, fc2: RowParallelLinear):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    @classmethod
    def from_modules(cls, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, group=None):
        return cls(ColumnParallelLinear.from_linear(fc1, group), copy.deepcopy(act),
                   RowParallelLinear.from_linear(fc2, group))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ParallelSelfAttention(nn.Module):
    """Causal self-attention with the heads split across ranks (section 3, figure 3b).

    Rank r computes Q, K, V and attention for its ``num_heads / p`` heads alone: heads are
    independent, so nothing is exchanged until the row-parallel output projection.
    """

    def __init__(self, qkv: ColumnParallelLinear, proj: RowParallelLinear, num_heads: int):
        super().__init__()
        self.qkv, self.proj, self.num_heads = qkv, proj, num_heads   # num_heads: local

    @classmethod
    def from_attention(cls, attn: nn.Module, group=None):
        """Shard a :class:`distlab.problems.transformer.CausalSelfAttention`."""
        p = dist.get_world_size(group)
        check_divisible("num_heads", attn.num_heads, p)
        return cls(ColumnParallelLinear.from_linear(attn.qkv, group, parts=3),
                   RowParallelLinear.from_linear(attn.proj, group), attn.num_heads // p)

    def forward(self, x):
        return self.proj(attend(self.qkv(x), self.num_heads))


# ----------------------------------------------------------------------------------------
# Sharding whole models onto ranks, and gathering them back.
# ----------------------------------------------------------------------------------------

def shard_mlp(model: nn.Sequential, group=None) -> nn.Sequential:
    """Split a ReLU MLP (:func:`distlab.problems.models.mlp`) over the ranks of ``group``.

    Linear layers are paired: the first of each pair column-parallel, the second
    row-parallel, so there is one all-reduce per pair. An unpaired last Linear (the
    classifier of an even-depth MLP) stays replicated: its input is already whole.
    Between the two linears of a pair the hidden units are split, so only elementwise
    layers without weights or buffers (activations) may sit there; outside the pairs any
    layer does (a BatchNorm there sees the whole batch on every rank).
    """
    layers = list(model)
    linear_at = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    out = [copy.deepcopy(m) for m in layers]
    for a, b in zip(linear_at[0::2], linear_at[1::2]):
        for i in range(a + 1, b):
            if list(layers[i].parameters()) + list(layers[i].buffers()):
                raise ValueError(
                    f"layer {i} ({type(layers[i]).__name__}) sits between the column-parallel "
                    f"layer {a} and the row-parallel layer {b}, where each rank holds only "
                    "its slice of the hidden units; only elementwise activations may go "
                    f"there: move it before layer {a} or after layer {b}, or use tp=1")
        out[a] = ColumnParallelLinear.from_linear(layers[a], group)
        out[b] = RowParallelLinear.from_linear(layers[b], group)
    return nn.Sequential(*out)


def shard_transformer(model: nn.Module, group=None) -> nn.Module:
    """Split every block of a :class:`distlab.problems.transformer.TinyTransformer` over ``group``.

    Attention and MLP become parallel; embeddings, layer norms and the head stay
    replicated (they are small, and their inputs are whole on every rank).
    """
    out = copy.deepcopy(model)
    for i, block in enumerate(out.blocks()):
        lost = [n for part in ("attn", "mlp") for n, _ in getattr(block, part).named_buffers()]
        if lost:      # the parallel layers are rebuilt from the weights alone
            raise ValueError(f"block {i} holds the buffer {lost[0]!r} inside attention or the "
                             "MLP, which the tensor-parallel layers do not carry; keep "
                             "buffers in the embedding, the norms or the head, or use tp=1")
        mlp = block.mlp
        block.attn = ParallelSelfAttention.from_attention(block.attn, group)
        block.mlp = ParallelMLP.from_modules(mlp.fc1, mlp.act, mlp.fc2, group)
    return out


def gather_model(model: nn.Module) -> nn.Module:
    """The unsplit model, on every rank: each parallel layer becomes a full ``nn.Linear``.

    A collective: every rank of each layer's group must call it. Its ``state_dict`` has the
    keys of the model that was sharded, so ``original.load_state_dict(...)`` takes it.
    """
    # Process groups cannot be deep-copied: let the copy share them.
    groups = {id(m.group): m.group for m in model.modules() if hasattr(m, "group")}
    out = copy.deepcopy(model, memo=dict(groups))
    for name, module in list(out.named_modules()):
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, module.gather())
        elif isinstance(module, ParallelSelfAttention):
            module.num_heads *= dist.get_world_size(module.qkv.group)
    # Parallel MLP and attention blocks hold plain Linears now: they compute the same thing.
    return out
