"""Context parallelism: an attention layer trained with its sequence split over the ranks.

Every rank holds the layer's weights (replicated, as in data parallelism) and a p-th of
every sequence; only attention needs the other tokens, and gets them one of two ways:

* ``method="ring"``: :func:`~distlab.model_parallel.ring_attention.ring_attention` (Liu et
  al. 2023), K/V blocks passed around a ring, exact by the online softmax;
* ``method="ulysses"``: :func:`~distlab.model_parallel.ulysses.ulysses_attention` (Jacobs et
  al. 2023), an all-to-all from sequence shards to head shards and back.

The projections before and after attention act token by token, so they need nothing from
other ranks; the weights' gradients, each rank's sum over its own tokens, are averaged by
:func:`distlab.data_parallel.ddp.average_gradients` (equal shards: the average of the
ranks' mean losses is the mean loss). :func:`train` equals :func:`reference`, one process
attending over the whole sequence.

Cost per step, per rank (alpha-beta, n = B·(T/p)·H·d·itemsize, one rank's Q, K or V):
attention as :func:`predicted_bytes` gives it (ring: forward 2(p-1) blocks of n, backward
4p-2; Ulysses: 8 all-to-alls of (p-1)/p·n), plus the gradient all-reduce of the weights,
2(p-1)/p of 4·C·(C+1)·itemsize with C = H·d. Memory per rank, measured by
:mod:`distlab.memory.measure` in :func:`memory_sweep`: full attention keeps the
(B, H, T, T) scores, Ulysses (B, H/p, T, T), ring one (B, H, T/p, T/p) block at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distlab import comm
from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication.all_to_all import ALL_TO_ALLS, model_bytes
from distlab.data_parallel.ddp import average_gradients
from distlab.metrics import report
from distlab.model_parallel.ring_attention import (LAYOUTS, chunk_ids, full_attention,
                                                   ring_attention, shard_sequence)
from distlab.model_parallel.ulysses import check_heads, ulysses_attention
from distlab.problems.transformer import CausalSelfAttention

METHODS = ("ring", "ulysses")
"""How attention reaches the other ranks' tokens."""


@dataclass(frozen=True)
class ContextParallelConfig:
    """One attention layer (the lab transformer's), its sequence split over ``world_size`` ranks."""
    method: str = "ring"
    """How attention sees the other shards: ``"ring"`` or ``"ulysses"``."""
    world_size: int = 2
    """Ranks sharing each sequence (the context-parallel degree)."""
    causal: bool = True
    """Mask keys after each query (a decoder); False: every token sees every token."""
    layout: str = "contiguous"
    """Ring only: ``"contiguous"`` shards, or ``"zigzag"`` (balanced causal work)."""
    all_to_all: str = "torch"
    """Ulysses only: ``"torch"`` (``dist.all_to_all_single``) or ``"pairwise"`` (messages)."""
    seq_len: int = 16
    """Tokens per sequence, T."""
    heads: int = 2
    """Attention heads, H (Ulysses needs H divisible by ``world_size``)."""
    head_dim: int = 4
    """Width of a head, d; the layer's width is H·d."""
    batch_size: int = 2
    """Sequences per step, B."""
    num_steps: int = 3
    """Optimizer steps (SGD) on one fixed batch of random inputs and targets."""
    lr: float = 0.1
    """SGD learning rate."""
    seed: int = 0
    """Seeds the weights and the batch (the same on every rank)."""

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("layout", LAYOUTS),
                              ("all_to_all", tuple(ALL_TO_ALLS))):
            v = getattr(self, name)
            require(self, name, isinstance(v, str) and v in allowed, f"one of {allowed}")
        require(self, "layout", self.method == "ring" or self.layout == "contiguous",
                "'contiguous' with method='ulysses' (its all-to-all restores the order)")
        require(self, "causal", isinstance(self.causal, bool), "True or False")
        for name in ("world_size", "seq_len", "heads", "head_dim", "batch_size", "num_steps"):
            require(self, name, is_int(getattr(self, name)) and getattr(self, name) >= 1,
                    "an int >= 1")
        require(self, "world_size", self.world_size <= 64, "an int in 1..64")
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
        require(self, "seed", is_int(self.seed), "an int")
        chunks = len(chunk_ids(0, 1, self.layout)) * self.world_size
        require(self, "seq_len", self.seq_len % chunks == 0,
                f"a multiple of {chunks}: layout={self.layout!r} cuts it into {chunks} "
                f"equal chunks over {self.world_size} ranks")
        if self.method == "ulysses":
            check_heads(self.heads, self.world_size)


def train(config: ContextParallelConfig, group=None) -> dict:
    """Worker: ``config.num_steps`` steps with this rank's shard of every sequence.

    Returns ``losses`` (the whole batch's, as one process computes it), ``bytes_sent`` (the
    attention's bytes sent per step, from the ledger), ``model_bytes`` (the same from
    :func:`predicted_bytes`), ``by_op`` and the trained ``weights``.
    """
    p = dist.get_world_size(group)
    if p != config.world_size:
        raise ValueError(f"the config is for world_size={config.world_size}; the group has {p}")
    rank = dist.get_rank(group)
    layer = ContextParallelAttention(build_layer(config), config.method, config.causal,
                                     config.layout, group, config.all_to_all)
    X, Y = (shard_sequence(t, rank, p, config.layout) for t in batch(config))   # (B, T/p, C)
    optimizer = torch.optim.SGD(layer.parameters(), lr=config.lr)
    comm.ledger().reset()
    losses = []
    for step in range(config.num_steps):
        loss = F.mse_loss(layer(X), Y)
        loss.backward()
        layer.finish_gradient_synchronization()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        comm.all_reduce(total, group=group)
        losses.append(total.item() / p)
        report(step=step, loss=losses[-1], **comm.ledger().totals())
    by_op = comm.ledger().by_op()
    # Everything but the all-reduces (of the gradients and the loss) is the attention's.
    attention = sum(s["bytes_sent"] for op, s in by_op.items() if op != "all_reduce")
    return {"rank": rank, "losses": losses, "by_op": by_op,
            "bytes_sent": attention // config.num_steps,
            "model_bytes": sum(predicted_bytes(config).values()),
            "weights": {k: v.detach().clone() for k, v in layer.layer.state_dict().items()}}


def reference(config: ContextParallelConfig) -> dict:
    """One process attending over the whole sequence: the ``losses`` and ``weights``."""
    layer = ContextParallelAttention(build_layer(config), "full", config.causal)
    X, Y = batch(config)
    optimizer = torch.optim.SGD(layer.parameters(), lr=config.lr)
    losses = []
    for _ in range(config.num_steps):
        loss = F.mse_loss(layer(X), Y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses,
            "weights": {k: v.detach().clone() for k, v in layer.layer.state_dict().items()}}


def start(config: ContextParallelConfig, **launch_kwargs):
    """:func:`distlab.start` :func:`train` on ``config.world_size`` ranks; ``launch_kwargs``
    go to the launcher (``timeout``, ``on_metrics``, ``on_output``, ...)."""
    from distlab.launcher import start as _start
    return _start(train, config.world_size, config, **launch_kwargs)


def run(config: ContextParallelConfig, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, **launch_kwargs).result()


def predicted_bytes(config: ContextParallelConfig) -> dict[str, int]:
    """Attention's bytes each rank sends per step: ``{"forward": ..., "backward": ...}``.

    n = B·(T/p)·H·d·4 (float32). Ring: forward 2(p-1)·n (K and V, p-1 hops), backward
    2(p-1)·n + 2p·n (K and V again, dK and dV one hop more, home; 0 on one rank). Ulysses: 4 all-to-alls
    each way, each (p-1)/p·n.
    """
    require_arg("config", config, isinstance(config, ContextParallelConfig),
                "a ContextParallelConfig")
    p = config.world_size
    n = config.batch_size * config.seq_len // p * config.heads * config.head_dim * 4
    if config.method == "ring":
        home = 2 * p * n if p > 1 else 0          # dK, dV: p hops, the last one home
        return {"forward": 2 * (p - 1) * n, "backward": 2 * (p - 1) * n + home}
    return {"forward": 4 * model_bytes(n, p), "backward": 4 * model_bytes(n, p)}


def predicted_scores_bytes(method: str, seq_len: int, world_size: int, heads: int,
                           batch_size: int = 1, layout: str = "contiguous") -> int:
    """Bytes of the attention scores one rank holds at once (float32): the T^2 term.

    ``"full"``: B·H·T^2; ``"ulysses"``: B·(H/p)·T^2; ``"ring"``: one block, B·H·(T/p)^2
    (``(T/2p)^2`` with ``layout="zigzag"``).
    """
    require_arg("method", method, method in ("full", *METHODS), f"one of {('full', *METHODS)}")
    for name, v in (("seq_len", seq_len), ("world_size", world_size), ("heads", heads),
                    ("batch_size", batch_size)):
        require_arg(name, v, is_int(v) and v >= 1, "an int >= 1")
    require_arg("layout", layout, layout in LAYOUTS, f"one of {LAYOUTS}")
    T, p = seq_len, world_size
    if method == "full":
        return batch_size * heads * T * T * 4
    if method == "ulysses":
        return batch_size * heads // p * T * T * 4
    c = T // (len(chunk_ids(0, 1, layout)) * p)
    return batch_size * heads * c * c * 4


def memory_sweep(seq_lens: list[int], world_size: int, heads: int = 4, head_dim: int = 4,
                 causal: bool = True, batch_size: int = 1) -> list[dict]:
    """Peak memory per rank of one training step, measured, against sequence length.

    One launch of ``world_size`` ranks; for each T the step of :func:`train` is measured
    by :func:`distlab.memory.measure.measure_step` for full attention (one process's
    whole sequence), ring and Ulysses. Returns one row per (method, T): ``method``,
    ``seq_len``, ``world_size``, ``peak_bytes`` (the largest over the ranks) and
    ``scores_bytes`` (:func:`predicted_scores_bytes`).
    """
    from distlab.launcher import launch
    require_arg("seq_lens", seq_lens, isinstance(seq_lens, (list, tuple)) and len(seq_lens) > 0,
                "a non-empty list of sequence lengths")
    configs = {(m, T): ContextParallelConfig(method=m, world_size=world_size, causal=causal,
                                             seq_len=T, heads=heads, head_dim=head_dim,
                                             batch_size=batch_size, num_steps=1)
               for T in seq_lens for m in METHODS}
    per_rank = launch(_measure_all, world_size, configs)
    rows = []
    for T in seq_lens:
        for m in ("full", *METHODS):
            rows.append({"method": m, "seq_len": T, "world_size": world_size,
                         "peak_bytes": max(r[(m, T)] for r in per_rank),
                         "scores_bytes": predicted_scores_bytes(m, T, world_size, heads,
                                                                batch_size)})
    return rows


# ----------------------------------------------------------------------------------------
# The layer, its batch, and the measurement worker.
# ----------------------------------------------------------------------------------------

class ContextParallelAttention(nn.Module):
    """An attention layer's projections around context-parallel attention.

    ``layer`` is a :class:`distlab.problems.transformer.CausalSelfAttention` (its fused
    ``qkv`` and its ``proj``); ``method`` is ``"ring"``, ``"ulysses"`` or ``"full"`` (one
    process, the whole sequence); ``layout`` is ring's, ``all_to_all`` Ulysses'. Input and
    output (B, T/p, C), this rank's tokens.
    """

    def __init__(self, layer: CausalSelfAttention, method: str, causal: bool,
                 layout: str = "contiguous", group=None, all_to_all: str = "torch"):
        super().__init__()
        require_arg("layer", layer, isinstance(layer, CausalSelfAttention),
                    "a distlab.problems.transformer.CausalSelfAttention")
        require_arg("method", method, method in (*METHODS, "full"), f"one of {(*METHODS, 'full')}")
        require_arg("causal", causal, isinstance(causal, bool), "True or False")
        require_arg("layout", layout, layout in LAYOUTS, f"one of {LAYOUTS}")
        require_arg("all_to_all", all_to_all, all_to_all in ALL_TO_ALLS,
                    f"one of {tuple(ALL_TO_ALLS)}")
        self.layer, self.method, self.causal = layer, method, causal
        self.layout, self.group, self.all_to_all = layout, group, all_to_all

    def forward(self, x):
        B, n, C = x.shape
        H = self.layer.num_heads
        q, k, v = (t.view(B, n, H, C // H).transpose(1, 2)            # (B, H, T/p, d)
                   for t in self.layer.qkv(x).split(C, dim=-1))
        if self.method == "ring":
            y = ring_attention(q, k, v, self.group, self.causal, self.layout)
        elif self.method == "ulysses":
            y = ulysses_attention(q, k, v, self.group, self.causal, self.all_to_all)
        else:
            y = full_attention(q, k, v, self.causal)
        return self.layer.proj(y.transpose(1, 2).reshape(B, n, C))    # (B, T/p, C)

    def finish_gradient_synchronization(self) -> None:
        """After backward: average the replicated weights' gradients over the group (each
        rank's covers its own tokens; equal shards, so the average is the whole
        sequence's). Frozen weights are left alone. Cost: one all-reduce of the weights'
        gradients (:func:`distlab.data_parallel.ddp.average_gradients`)."""
        if self.method != "full":
            average_gradients(self.parameters(), self.group)


def build_layer(config: ContextParallelConfig) -> CausalSelfAttention:
    """The layer's weights, seeded: the same on every rank and in the reference."""
    torch.manual_seed(config.seed)
    return CausalSelfAttention(config.heads * config.head_dim, config.heads)


def batch(config: ContextParallelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, each (B, T, C), seeded."""
    g = torch.Generator().manual_seed(config.seed + 1)
    shape = (config.batch_size, config.seq_len, config.heads * config.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _measure_all(configs: dict) -> dict:
    """Worker: each config's measured peak bytes on this rank, and full attention's."""
    from distlab.memory.measure import measure_step
    rank, p = dist.get_rank(), dist.get_world_size()
    out = {}
    for (method, T), config in configs.items():
        X, Y = batch(config)
        if method == METHODS[0]:        # the whole sequence in one process, once per T
            full = ContextParallelAttention(build_layer(config), "full", config.causal)
            out[("full", T)] = measure_step(full, torch.optim.SGD(full.parameters(), lr=0.1),
                                            (X, Y), F.mse_loss)["peak"]
        layer = ContextParallelAttention(build_layer(config), method, config.causal,
                                         config.layout)
        X, Y = (shard_sequence(t, rank, p, config.layout) for t in (X, Y))
        out[(method, T)] = measure_step(layer, torch.optim.SGD(layer.parameters(), lr=0.1),
                                        (X, Y), F.mse_loss)["peak"]
    return out
