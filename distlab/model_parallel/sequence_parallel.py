"""Sequence parallelism: tensor parallelism that also splits the LayerNorm regions by tokens.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4.2.2 and figure 5. Megatron tensor parallelism (Shoeybi et al. 2019,
:mod:`distlab.model_parallel.tensor_parallel`) splits attention and the MLP over t ranks,
but every rank still holds the whole (B, T, C) residual stream, its LayerNorms (and
dropouts) computed t times over, and their activations stored t times. These regions work
token by token, so they can be split along the *sequence*: rank r keeps tokens
``r*T/t .. (r+1)*T/t``, a (B, T/t, C) shard. Two conjugate operators join the regions:

========= ============================================ ============================================
           forward                                      backward
========= ============================================ ============================================
``g``      all-gather along T (before column-parallel)  reduce-scatter along T
``g-bar``  reduce-scatter along T (after row-parallel)  all-gather along T
========= ============================================ ============================================

``g`` replaces Megatron's ``f`` (identity / all-reduce) and ``g-bar`` its ``g`` (all-reduce /
identity). A ring all-reduce *is* a reduce-scatter followed by an all-gather, so the bytes
do not change: per block and step, 4 all-reduces of B·T·C activations become 4
reduce-scatters and 4 all-gathers of the same size, (p-1)/p·n bytes each, 2(p-1)/p·n
together, exactly an all-reduce's (:func:`distlab.communication.alpha_beta.ring_all_reduce`).
Activations per layer fall from ``sbh(10 + 24/t + 5as/(ht))`` bytes to
``sbh(34/t + 5as/(ht))`` (the paper's equations 2 and 4, 16-bit, with dropout; section 4.2.2
also re-gathers the column-parallel input in backward instead of storing it, which this
module does when ``regather`` is set;
:func:`distlab.model_parallel.crossover.saved_activation_bytes` counts what each variant
stores).

One price: weights used inside a sequence region (LayerNorms, the row-parallel biases, and
here the replicated embedding and head, which also run on the shard) see only this
rank's tokens, so their gradients are *partial sums* and one all-reduce over the group adds
them after backward (Megatron does the same for its LayerNorms): 2(p-1)/p bytes of those
weights, small beside the activations.

On gloo (no reduce-scatter of its own) both collectives are distlab's rings
(:func:`distlab.communication.collectives.ring_reduce_scatter`, ``ring_all_gather``), so the
ledger counts their real point-to-point bytes. A ring chunks the flattened tensor, so the
shards travel as (T, B, C), sequence first, the layout Megatron keeps all the time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distlab import comm
from distlab.checks import is_int, require
from distlab.communication.collectives import ring_all_gather, ring_reduce_scatter
from distlab.data_parallel.ddp import average_gradients
from distlab.launcher import device
from distlab.memory.measure import measure_step
from distlab.metrics import report
from distlab.model_parallel.tensor_parallel import (ParallelMLP, ParallelSelfAttention,
                                                    TensorParallelConfig, shard_transformer)
from distlab.problems.transformer import TinyTransformer, attend
from distlab.problems.workloads import Workload, train_reference

TINY = Workload(model="transformer", hidden=16, depth=2, num_heads=4, block_size=8,
                batch_size=4, lr=0.1, num_steps=3)


@dataclass(frozen=True)
class SequenceParallelConfig:
    """The lab's transformer trained tensor-parallel over ``degree`` ranks, with or without
    sequence parallelism."""
    workload: Workload = field(default_factory=lambda: TINY)
    """What is trained (a ``"transformer"``): d_model, 4·d_model and the heads are split."""
    degree: int = 2
    """Tensor-parallel degree t: ranks sharing every weight matrix (and every sequence)."""
    sequence_parallel: bool = True
    """True: LayerNorm regions on (B, T/t, C) shards; False: plain Megatron TP."""
    regather: bool = False
    """True: keep each column-parallel input as its shard and all-gather it again in
    backward (section 4.2.2: activations 34/t, 2 more all-gathers per block)."""

    def __post_init__(self):
        w = self.workload
        require(self, "workload", isinstance(w, Workload) and w.model == "transformer",
                "a Workload with model='transformer'")
        require(self, "degree", is_int(self.degree) and 1 <= self.degree <= 16, "an int in 1..16")
        require(self, "sequence_parallel", isinstance(self.sequence_parallel, bool),
                "True or False")
        require(self, "regather", isinstance(self.regather, bool)
                and (self.sequence_parallel or not self.regather),
                "True or False (True only with sequence_parallel=True)")
        TensorParallelConfig(self.degree, w.hidden, w.num_heads)
        require(self, "degree", w.block_size % self.degree == 0,
                f"a divisor of block_size={w.block_size}: every rank gets T/t tokens")


def train(config: SequenceParallelConfig, group=None) -> dict:
    """Worker: train ``config.workload`` over the ranks of ``group`` (default: the world).

    Step 0 runs under :func:`distlab.memory.measure.measure_step`. Returns the global-batch
    ``losses`` (as one process computes them), the communication of one step ``by_op``
    and ``bytes_sent`` (the loss's own all-reduce, for reporting, left out), and ``memory``,
    step 0's measurement (``memory["saved_activations"]``: bytes backward will read).
    """
    w, dev = config.workload, device()
    full = w.build_model()
    model = (SequenceParallelTransformer.from_transformer(full, group, config.regather)
             if config.sequence_parallel else shard_transformer(full, group)).to(dev)
    loss_fn = model.loss if config.sequence_parallel else w.loss
    optimizer = w.optimizer(model.parameters())
    losses, memory, step_comm = [], None, None
    for step, (X, y) in enumerate(w.batches()):
        X, y = X.to(dev), y.to(dev)
        comm.ledger().reset()
        if step == 0:
            memory = measure_step(model, optimizer, (X, y), loss_fn)
            loss = torch.tensor(memory["loss"])
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(X), y)
            loss.backward()
            getattr(model, "finish_gradient_synchronization", lambda: None)()
            optimizer.step()
        step_comm = step_comm or comm.ledger().by_op()
        loss = loss.detach().clone()
        if config.sequence_parallel:       # each rank holds its tokens' share of the mean
            comm.all_reduce(loss, group=group)
        losses.append(loss.item())
        report(step=step, loss=losses[-1],
               bytes_sent=sum(s["bytes_sent"] for s in comm.ledger().by_op().values()))
    return {"rank": dist.get_rank(group), "losses": losses, "by_op": step_comm,
            "bytes_sent": sum(s["bytes_sent"] for s in step_comm.values()), "memory": memory}


def reference(config: SequenceParallelConfig) -> list[float]:
    """The unsplit transformer trained in one process: the losses every rank must report."""
    return train_reference(config.workload)


def start(config: SequenceParallelConfig, **launch_kwargs):
    """:func:`distlab.start` :func:`train` on ``degree`` ranks, the text loaded once here."""
    from distlab.launcher import start as _start
    config = replace(config, workload=config.workload.loaded())
    return _start(train, config.degree, config, **launch_kwargs)


def run(config: SequenceParallelConfig, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, **launch_kwargs).result()


# ----------------------------------------------------------------------------------------
# The conjugate operators g and g-bar (figure 5), as autograd Functions.
# ----------------------------------------------------------------------------------------

class Conjugate(torch.autograd.Function):
    """One collective forward, its conjugate backward: ``g`` and ``g-bar`` of figure 5.

    The gradient of an all-gather is a reduce-scatter of the gradients (each rank's shard
    went to every rank, so its gradient is the sum of theirs), and the reverse.
    """

    @staticmethod
    def forward(ctx, x, group, there, back):
        ctx.group, ctx.back = group, back
        return there(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad, ctx.group), None, None, None


def gather_from_sequence_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """``g``: all-gather the (B, T/t, C) shards forward, reduce-scatter the gradient back."""
    return Conjugate.apply(x, group, all_gather_sequence, reduce_scatter_sequence)


def scatter_to_sequence_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """``g-bar``: reduce-scatter the (B, T, C) partial sums forward, all-gather back."""
    return Conjugate.apply(x, group, reduce_scatter_sequence, all_gather_sequence)


class GatheredLinear(torch.autograd.Function):
    """``g`` then a column-parallel linear, storing only the (B, T/t, C) shard for backward.

    Section 4.2.2: the gathered (B, T, C) input is what the weight's gradient needs; rather
    than keep it from forward to backward, backward gathers it again. One more all-gather,
    (p-1)/p·B·T·C bytes, for B·T·C·(1 - 1/t) fewer stored values.
    """

    @staticmethod
    def forward(ctx, shard, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(shard, weight)
        return F.linear(all_gather_sequence(shard, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):                                      # (B, T, out/t)
        shard, weight = ctx.saved_tensors
        full = all_gather_sequence(shard, ctx.group)              # (B, T, C), once more
        grad_shard = reduce_scatter_sequence(grad @ weight, ctx.group)
        rows = grad.flatten(0, 1)                                 # (B·T, out/t)
        grad_bias = rows.sum(0) if ctx.has_bias else None
        return grad_shard, rows.T @ full.flatten(0, 1), grad_bias, None


def all_gather_sequence(shard: torch.Tensor, group=None) -> torch.Tensor:
    """(B, T/t, C) per rank -> the whole (B, T, C), rank r's tokens at r·T/t.

    Cost: :func:`distlab.communication.alpha_beta.ring_all_gather` of the whole tensor.
    """
    t, r = dist.get_world_size(group), dist.get_rank(group)
    B, S, C = shard.shape
    full = shard.new_empty(t * S, B, C)                           # (T, B, C): shards contiguous
    full[r * S:(r + 1) * S] = shard.transpose(0, 1)
    ring_all_gather(full, group, check=False)
    return full.transpose(0, 1).contiguous()                      # (B, T, C)


def reduce_scatter_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, T, C) partial sums on every rank -> this rank's (B, T/t, C) tokens of the sum.

    Cost: :func:`distlab.communication.alpha_beta.ring_reduce_scatter` of the whole tensor.
    """
    t = dist.get_world_size(group)
    B, T, C = x.shape
    by_token = x.transpose(0, 1).contiguous()                     # (T, B, C)
    mine = ring_reduce_scatter(by_token, group, check=False)      # (T/t · B · C,)
    return mine.view(T // t, B, C).transpose(0, 1).contiguous()   # (B, T/t, C)


# ----------------------------------------------------------------------------------------
# The sequence-parallel transformer, built from distlab's Megatron layers.
# ----------------------------------------------------------------------------------------

class SequenceParallelBlock(nn.Module):
    """A pre-norm block on a (B, T/t, C) shard: LayerNorm and residual on this rank's tokens,
    attention and MLP tensor-parallel on all tokens (figure 5).

    Holds the Megatron layers
    (:class:`~distlab.model_parallel.tensor_parallel.ParallelSelfAttention`,
    :class:`~distlab.model_parallel.tensor_parallel.ParallelMLP`) for
    their weight shards, but calls their linears without ``f`` and ``g``: ``g`` and
    ``g-bar`` take their places.
    """

    def __init__(self, ln1: nn.LayerNorm, attn: ParallelSelfAttention, ln2: nn.LayerNorm,
                 mlp: ParallelMLP, group=None, regather: bool = False):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        self.group, self.regather = group, regather

    @classmethod
    def from_block(cls, block: nn.Module, group=None, regather: bool = False):
        """Shard a :class:`distlab.problems.transformer.Block` over ``group``."""
        buffers = [name for name, _ in block.named_buffers()]   # rebuilt layers lose them
        if buffers:
            raise ValueError(f"block holds the buffer {buffers[0]!r}, which the sequence-"
                             "parallel block does not carry; keep buffers in the embedding "
                             "or the head")
        mlp = block.mlp
        return cls(copy.deepcopy(block.ln1),
                   ParallelSelfAttention.from_attention(block.attn, group), copy.deepcopy(block.ln2),
                   ParallelMLP.from_modules(mlp.fc1, mlp.act, mlp.fc2, group), group, regather)

    def forward(self, x):                                         # (B, T/t, C) -> same
        proj, fc2 = self.attn.proj, self.mlp.fc2
        a = attend(self._gathered(self.ln1(x), self.attn.qkv), self.attn.num_heads)  # (B, T, C/t)
        x = x + scatter_to_sequence_region(F.linear(a, proj.weight), self.group) + proj.bias
        m = self.mlp.act(self._gathered(self.ln2(x), self.mlp.fc1))                  # (B, T, 4C/t)
        return x + scatter_to_sequence_region(F.linear(m, fc2.weight), self.group) + fc2.bias

    def _gathered(self, shard, column):
        """``column(g(shard))``: all tokens through this rank's output units, (B, T, out/t)."""
        if self.regather:
            return GatheredLinear.apply(shard, column.weight, column.bias, self.group)
        return F.linear(gather_from_sequence_region(shard, self.group), column.weight,
                        column.bias)


class SequenceParallelTransformer(nn.Sequential):
    """:class:`~distlab.problems.transformer.TinyTransformer` with every block sequence
    parallel. The embedding and the head are replicated weights run on this rank's tokens
    only, so no activation is gathered at the ends: ``forward`` gives (B, T/t, V) logits and
    :meth:`loss` this rank's share of the mean. Its layers and ``state_dict`` keys are the
    unsplit model's (:func:`~distlab.model_parallel.tensor_parallel.gather_model` works)."""

    def __init__(self, *layers, group=None):
        super().__init__(*layers)
        self.group = group

    @classmethod
    def from_transformer(cls, model: nn.Module, group=None, regather: bool = False):
        if not isinstance(model, TinyTransformer):
            raise TypeError("model must be a distlab.problems.transformer.TinyTransformer, "
                            f"got {type(model).__name__}")
        blocks = [SequenceParallelBlock.from_block(b, group, regather) for b in model.blocks()]
        # One deepcopy of both ends keeps a head tied to the embedding tied: its gradient
        # then sums both uses, as in the unsplit model.
        embedding, head = copy.deepcopy((model[0], model[-1]))
        return cls(embedding, *blocks, head, group=group)

    def tokens(self, T: int) -> slice:
        """This rank's positions of a length-T sequence."""
        S = T // dist.get_world_size(self.group)
        return slice(dist.get_rank(self.group) * S, (dist.get_rank(self.group) + 1) * S)

    def forward(self, idx):                                       # (B, T) ids, every rank
        mine = self.tokens(idx.shape[1])
        emb = self[0]
        positions = torch.arange(mine.start, mine.stop, device=idx.device)
        x = emb.tok(idx[:, mine]) + emb.pos(positions)            # (B, T/t, C)
        for block in list(self)[1:-1]:
            x = block(x)
        return self[-1](x)                                        # (B, T/t, V)

    def loss(self, logits, y):
        """This rank's tokens' cross-entropy over t: the ranks' losses sum to the mean."""
        y = y[:, self.tokens(y.shape[1])]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) \
            / dist.get_world_size(self.group)

    def sequence_region_parameters(self) -> list[nn.Parameter]:
        """The replicated weights that saw only this rank's tokens: all but the shards."""
        sharded = {id(p) for b in list(self)[1:-1]       # column shards, row weights
                   for p in (*b.attn.qkv.parameters(), *b.mlp.fc1.parameters(),
                             b.attn.proj.weight, b.mlp.fc2.weight)}
        return [p for p in self.parameters() if id(p) not in sharded]

    def finish_gradient_synchronization(self) -> None:
        """Sum the partial gradients of :meth:`sequence_region_parameters` over the group.

        A sum, not an average: each rank's gradient covers its own tokens. Through the one
        averaging of distlab, times t. Cost: one ring all-reduce of those weights' bytes.
        """
        params = self.sequence_region_parameters()
        average_gradients(params, self.group)
        t = dist.get_world_size(self.group)
        for p in params:
            if p.requires_grad:
                p.grad.mul_(t)
