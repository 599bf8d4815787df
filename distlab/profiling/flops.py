"""FLOPs per training step, the machine's peak, and the model FLOPs utilization (MFU).

Two counts of the floating-point operations of one training step of a transformer on D
tokens:

* **6·N·D** (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1):
  every one of the N parameters takes part in one multiply-add (2 FLOPs) per token in
  forward, and backward costs twice forward (the gradient of the input and of the weight),
  so 2 + 4 = 6 FLOPs per parameter per token. It counts the embeddings' parameters, which
  do no matmul (a lookup), and leaves attention's own matmuls out.
* **from the layer shapes** (:func:`layer_flops`; the count of Narayanan et al. 2021,
  "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
  section 5.1, and of PaLM's appendix B, Chowdhery et al. 2022): every ``nn.Linear`` of
  ``in`` by ``out`` costs 6·in·out per token, and attention's two matmuls (Q·Kᵀ and the
  weighted sum of V, 2·s·h FLOPs each per token and layer in forward) add
  **12·L·h·s** per token for L layers of width h over a context of s tokens (counted dense:
  the causal mask would halve it, but kernels rarely skip the masked half).

The lab uses the layer count, the matmuls the step really performs; 6·N·D is the quick
estimate beside it (for the tiny transformer the two differ by a few per cent: the
embedding and layer-norm parameters against the attention term).

The **MFU** (Chowdhery et al. 2022, appendix B) is the FLOPs a step must do over its wall
time, divided by the machine's peak: here the peak is measured, the median rate of a large
fp32 matmul on this process (:func:`peak_matmul_flops`), so it includes what the BLAS
library achieves with this process's threads.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from distlab.checks import is_int, is_number, require_arg


def six_n_d(num_params: int, tokens: int) -> int:
    """6·N·D: the training FLOPs of ``num_params`` parameters on ``tokens`` tokens."""
    require_arg("num_params", num_params, is_int(num_params) and num_params >= 1, "an int >= 1")
    require_arg("tokens", tokens, is_int(tokens) and tokens >= 1, "an int >= 1")
    return 6 * num_params * tokens


def layer_flops(model: nn.Module, tokens: int, seq_len: int) -> dict[str, int]:
    """The training FLOPs of ``tokens`` tokens from ``model``'s layer shapes.

    ``model`` is a :class:`~distlab.problems.transformer.TinyTransformer` (any module whose
    ``blocks()`` are its attention layers); ``seq_len`` is the context s. Returns
    ``{"linear": 6·D·Σ in·out, "attention": 12·L·h·s·D, "total": their sum}``; the
    element-wise work (layer norms, GeLU, softmax, the optimizer) is left out, as in
    Megatron's count, since it is small beside the matmuls.
    """
    require_arg("tokens", tokens, is_int(tokens) and tokens >= 1, "an int >= 1")
    require_arg("seq_len", seq_len, is_int(seq_len) and seq_len >= 1, "an int >= 1")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    linear = 6 * tokens * sum(m.in_features * m.out_features for m in linears)
    blocks = model.blocks() if hasattr(model, "blocks") else []
    hidden = blocks[0].attn.proj.in_features if blocks else 0
    attention = attention_flops(len(blocks), hidden, seq_len, tokens) if blocks else 0
    return {"linear": linear, "attention": attention, "total": linear + attention}


def attention_flops(num_layers: int, hidden: int, seq_len: int, tokens: int) -> int:
    """12·L·h·s·D: attention's Q·Kᵀ and softmax·V in forward (2 matmuls of 2·s·h FLOPs per
    token and layer) and backward (twice that)."""
    for name, v in (("num_layers", num_layers), ("hidden", hidden), ("seq_len", seq_len),
                    ("tokens", tokens)):
        require_arg(name, v, is_int(v) and v >= 1, "an int >= 1")
    return 12 * num_layers * hidden * seq_len * tokens


def peak_matmul_flops(size: int = 512, repeats: int = 7, dtype=torch.float32) -> float:
    """The machine's measured peak: FLOP/s of a ``size``×``size`` matmul, median of
    ``repeats`` timed runs (after one warm-up), on this process and its torch threads.

    2·size³ FLOPs per matmul. Measure it in the process (and with the threads) whose steps
    the MFU is about: a distlab worker has one torch thread.
    """
    require_arg("size", size, is_int(size) and size >= 16, "an int >= 16")
    require_arg("repeats", repeats, is_int(repeats) and repeats >= 1, "an int >= 1")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)                                   # warm-up: BLAS threads, caches
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * size ** 3 / (time.perf_counter() - start))
    return statistics.median(rates)


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilization: ``flops`` done in ``seconds``, over the ``peak`` FLOP/s."""
    require_arg("flops", flops, is_number(flops) and flops >= 0, "a number >= 0")
    require_arg("seconds", seconds, is_number(seconds) and seconds > 0, "a number > 0")
    require_arg("peak", peak, is_number(peak) and peak > 0, "a number > 0 (FLOP/s)")
    return flops / seconds / peak
