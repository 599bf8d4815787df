"""Tensor parallelism: every parallel layer against the unsplit layer, outputs and gradients.

One launch per world size runs all the layer checks (launches are the slow part).
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import distlab
from distlab.model_parallel import mesh
from distlab.model_parallel import tensor_parallel as tp
from distlab.problems.models import mlp
from distlab.problems.transformer import Block, CausalSelfAttention, FeedForward, TinyTransformer
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def check_all_layers():
    """Runs on every rank: each parallel layer matches its full layer."""
    r, p = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    x = torch.randn(3, 5, 8, requires_grad=True)            # (B, T, C), same on all ranks

    # f: identity forward, all-reduce backward; g: the reverse.
    fx = tp.copy_to_parallel(x)
    assert_close(fx, x)
    (fx * (r + 1)).sum().backward()
    assert_close(x.grad, torch.full_like(x, p * (p + 1) / 2))   # sum over ranks of (r+1)
    x.grad = None
    gx = tp.reduce_from_parallel(x * (r + 1))
    assert_close(gx, x * p * (p + 1) / 2)
    gx.sum().backward()
    assert_close(x.grad, torch.full_like(x, r + 1.0))           # identity, then local r+1
    x.grad = None

    # Column- and row-parallel linear, back to back, against two full Linears.
    fc1, fc2 = nn.Linear(8, 4 * p), nn.Linear(4 * p, 6)
    col, row = tp.ColumnParallelLinear.from_linear(fc1), tp.RowParallelLinear.from_linear(fc2)
    y = fc2(torch.relu(fc1(x)))
    y.square().sum().backward()
    x_grad, x.grad = x.grad.clone(), None
    y_tp = row(torch.relu(col(x)))
    y_tp.square().sum().backward()
    assert_close(y_tp, y, msg="column + row parallel forward")
    assert_close(x.grad, x_grad, msg="dL/dX through f")
    assert_close(col.weight.grad, tp.column_shard(fc1.weight.grad, r, p))
    assert_close(col.bias.grad, tp.column_shard(fc1.bias.grad, r, p))
    assert_close(row.weight.grad, tp.row_shard(fc2.weight.grad, r, p))
    assert_close(row.bias.grad, fc2.bias.grad)
    assert_close(col.gather().weight, fc1.weight)
    assert_close(row.gather().weight, fc2.weight)

    # Attention with heads split, MLP block, whole transformer block.
    for full in (CausalSelfAttention(8, 2 * p), FeedForward(8), Block(8, p)):
        x.grad = None
        full.zero_grad()
        if isinstance(full, CausalSelfAttention):
            par = tp.ParallelSelfAttention.from_attention(full)
        elif isinstance(full, FeedForward):
            par = tp.ParallelMLP.from_modules(full.fc1, full.act, full.fc2)
        else:
            par = tp.shard_transformer(_Wrap(full)).block
        y = full(x)
        y.square().sum().backward()
        x_grad, x.grad = x.grad.clone(), None
        y_tp = par(x)
        y_tp.square().sum().backward()
        name = type(full).__name__
        assert_close(y_tp, y, msg=f"{name} forward")
        assert_close(x.grad, x_grad, msg=f"{name} input grad")
        g_full, g_par = _grads(full), _grads(par)
        for n, g in g_par.items():
            if n.endswith("qkv.weight") or n.endswith("qkv.bias"):
                want = tp.column_shard(g_full[n], r, p, parts=3)
            elif n.endswith("fc1.weight") or n.endswith("fc1.bias"):
                want = tp.column_shard(g_full[n], r, p)
            elif n.endswith("proj.weight") or n.endswith("fc2.weight"):
                want = tp.row_shard(g_full[n], r, p)
            else:                                  # replicated: biases after g, layer norms
                want = g_full[n]
            assert_close(g, want, msg=f"{name} grad of {n}")

    # Whole models: shard, compare, gather back to the original weights.
    for model, inp in ((mlp(64, 4 * p, 10, depth=2, seed=3), torch.randn(7, 64)),
                       (mlp(64, 4 * p, 10, depth=1, seed=3), torch.randn(7, 64)),
                       (TinyTransformer(11, 8, p, 2, block_size=5, seed=3),
                        torch.randint(11, (2, 5)))):
        par = (tp.shard_transformer if isinstance(model, TinyTransformer) else tp.shard_mlp)(model)
        y = model(inp)
        y.sum().backward()
        y_tp = par(inp)
        y_tp.sum().backward()
        assert_close(y_tp, y)
        assert_close(par[0].weight.grad if not isinstance(model, TinyTransformer)
                     else par[0].tok.weight.grad,
                     tp.column_shard(model[0].weight.grad, r, p)
                     if not isinstance(model, TinyTransformer) else model[0].tok.weight.grad)
        back = tp.gather_model(par)
        assert back.state_dict().keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert_close(back.state_dict()[k], v, msg=f"gathered {k}")
    return True


class _Wrap(nn.Module):
    """Lets shard_transformer split a single block."""
    def __init__(self, block):
        super().__init__()
        self.block = block

    def blocks(self):
        return [self.block]


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layers_match_full_layers(world_size):
    assert distlab.launch(check_all_layers, world_size) == [True] * world_size


def test_uneven_splits_are_refused_before_launch():
    with pytest.raises(ValueError, match=r"hidden=10 is not divisible .* degree 4.*8 or 12"):
        tp.TensorParallelConfig(degree=4, hidden=10)
    with pytest.raises(ValueError, match=r"num_heads=3 is not divisible"):
        tp.TensorParallelConfig(degree=2, hidden=32, num_heads=3)
    with pytest.raises(ValueError, match=r"degree=0"):
        tp.TensorParallelConfig(degree=0, hidden=8)
    # The training config checks when it is made, before any process starts.
    with pytest.raises(ValueError, match=r"hidden=10 is not divisible"):
        mesh.MeshConfig(Workload(hidden=10), dp=1, tp=4)
    with pytest.raises(ValueError, match=r"num_heads=2 is not divisible"):
        mesh.MeshConfig(Workload("transformer", hidden=32, num_heads=2), dp=1, tp=4)


def test_column_and_row_shards_tile_the_weight():
    w = torch.arange(24.0).view(6, 4)
    assert_close(torch.cat([tp.column_shard(w, r, 2) for r in range(2)]), w)
    assert_close(torch.cat([tp.row_shard(w, r, 2) for r in range(2)], dim=1), w)
    # Fused [Q; K; V]: rank 0 gets the first half of each of Q, K and V.
    qkv = torch.arange(12.0)
    assert tp.column_shard(qkv, 0, 2, parts=3).tolist() == [0, 1, 4, 5, 8, 9]


def test_shards_refuse_bad_ranks_and_uneven_splits():
    w = torch.zeros(6, 4)
    with pytest.raises(ValueError, match=r"rank=2 is out of range; allowed an int in 0..1"):
        tp.column_shard(w, 2, 2)
    with pytest.raises(ValueError, match=r"degree=0"):
        tp.row_shard(w, 0, 0)
    with pytest.raises(ValueError, match=r"rows=6 is not divisible by the tensor-parallel degree 4"):
        tp.column_shard(w, 0, 4)
    with pytest.raises(ValueError, match=r"columns=4 is not divisible .* degree 3"):
        tp.row_shard(w, 0, 3)
