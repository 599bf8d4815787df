"""A tiny character-level transformer language model, and the text it learns from.

A GPT in the style of nanoGPT (Radford et al. 2019; Vaswani et al. 2017, section 3) at toy
size: pre-norm blocks of causal self-attention and a GeLU MLP. It is an ``nn.Sequential``
of embedding, blocks and head, so :mod:`distlab.model_parallel.pipeline` can cut it into stages, and its
blocks name their layers ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` so
:func:`distlab.model_parallel.tensor_parallel.shard_transformer` can split them.

The text (``distlab/problems/texts/tiny_text.txt``, a few KB of prose written for distlab) ships with
the package: nothing is downloaded.
"""
from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn


def load_text(name: str = "tiny_text.txt") -> str:
    """The text shipped in ``distlab/problems/texts``."""
    return resources.files("distlab.problems").joinpath("texts", name).read_text(encoding="utf-8")


class CharTokenizer:
    """One token per distinct character of a text (sorted, so the same on every rank)."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int, seed: int):
    """``batch_size`` random windows of the text: inputs (B, T) and next characters (B, T).

    Seeded, so every rank draws the same batch without communicating.
    """
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=g)
    X = torch.stack([tokens[s: s + block_size] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1: s + block_size + 1] for s in starts.tolist()])
    return X, y


def attend(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Causal attention from fused projections: (B, T, 3C) -> (B, T, C), ``num_heads`` heads.

    Shared by the full model and the tensor-parallel one (which passes its local heads).
    """
    B, T, C3 = qkv.shape
    q, k, v = qkv.split(C3 // 3, dim=-1)                          # each (B, T, C)
    heads = lambda t: t.view(B, T, num_heads, -1).transpose(1, 2)  # (B, h, T, C/h)
    y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)               # (B, T, C)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)   # Q, K, V stacked: [W_q; W_k; W_v]
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.proj(attend(self.qkv(x), self.num_heads))


class FeedForward(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_model, 4 * d_model), nn.GELU(), \
            nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d_model), CausalSelfAttention(d_model, num_heads)
        self.ln2, self.mlp = nn.LayerNorm(d_model), FeedForward(d_model)

    def forward(self, x):                      # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embedding(nn.Module):
    """Token plus learned position embeddings: (B, T) ids -> (B, T, C)."""

    def __init__(self, vocab_size: int, d_model: int, block_size: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, d_model), nn.Embedding(block_size, d_model)

    def forward(self, idx):
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class Head(nn.Module):
    """Final layer norm and the projection to next-character logits: (B, T, V)."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.ln, self.out = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size)

    def forward(self, x):
        return self.out(self.ln(x))


class TinyTransformer(nn.Sequential):
    """Embedding, ``num_layers`` blocks, head: a char-level GPT of a few thousand weights."""

    def __init__(self, vocab_size: int, d_model: int = 32, num_heads: int = 4,
                 num_layers: int = 2, block_size: int = 32, seed: int = 0):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        torch.manual_seed(seed)
        super().__init__(Embedding(vocab_size, d_model, block_size),
                         *[Block(d_model, num_heads) for _ in range(num_layers)],
                         Head(d_model, vocab_size))

    def blocks(self) -> list[Block]:
        return [m for m in self if isinstance(m, Block)]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-character prediction: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def generate(model: nn.Module, tokenizer: CharTokenizer, prompt: str, length: int = 100,
             block_size: int = 32, seed: int = 0) -> str:
    """Sample ``length`` characters after ``prompt`` (single process)."""
    g = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt)[None]
    for _ in range(length):
        logits = model(ids[:, -block_size:])[:, -1]
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=g)
        ids = torch.cat([ids, nxt], dim=1)
    return tokenizer.decode(ids[0])
