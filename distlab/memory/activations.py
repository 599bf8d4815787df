"""Activation memory of a transformer layer stack: Korthikanti et al.'s formula, and ours.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198), section 4 and Table 2, count the bytes one transformer layer keeps from
its forward pass for its backward pass, at 16 bits per value (with 1-byte dropout masks),
for sequence length s, micro-batch b, hidden size h, a heads and tensor-parallel size t:

==================================================  =============================
configuration                                       bytes per layer
==================================================  =============================
no parallelism                                      s·b·h·(34 + 5·a·s/h)
tensor parallel                                     s·b·h·(10 + 24/t + 5·a·s/(h·t))
tensor + sequence parallel                          s·b·h·(34/t + 5·a·s/(h·t))
selective recompute (attention's softmax/dropout)   the 5·a·s/h term is dropped
full recompute                                      2·s·b·h (the layer's input only)
==================================================  =============================

Of the 34: attention keeps 11·sbh (QKV input 2, Q and K 4, V 2, the output projection's
input 2, dropout mask 1), the MLP 19·sbh (input 2, the 4h pre-activation 8 and activation
8, dropout mask 1) and the two layer norms 4·sbh; the 5·a·s² ·b of attention are the
softmax (2), its dropout mask (1) and the dropped-out scores (2). With tensor parallelism
the 10·sbh left out of the 24/t are the layer norms' and dropouts' inputs, replicated on
every rank; sequence parallelism shards them too. No communication: it is a formula.

:func:`tiny_transformer_activation_bytes` is the same count for distlab's own
:class:`~distlab.problems.transformer.TinyTransformer`, in fp32, read off what its autograd
graph saves, and says how far it is from Megatron's and why.
"""
from __future__ import annotations

from fractions import Fraction

from distlab.checks import is_int, is_number, require_arg

RECOMPUTE = ("none", "selective", "full")


def activation_bytes(*, seq_len: int, batch_size: int, hidden: int, num_heads: int,
                     num_layers: int = 1, bytes_per_value: float = 2, tensor_parallel: int = 1,
                     sequence_parallel: bool = False, recompute: str = "none") -> int:
    """Bytes of activations ``num_layers`` transformer layers keep for backward, per rank.

    Korthikanti et al. 2022, Table 2, scaled by ``bytes_per_value / 2`` (the paper counts
    16-bit values; pass 4 for fp32). Embeddings, the final norm, the logits and the loss are
    not counted, as in the paper's per-layer count.

    Args:
        seq_len: s, tokens per sequence.
        batch_size: b, sequences per micro-batch.
        hidden: h, the model width.
        num_heads: a, attention heads.
        num_layers: L, transformer layers.
        bytes_per_value: bytes of one activation value (2 for fp16/bf16, 4 for fp32).
        tensor_parallel: t, the tensor-parallel size.
        sequence_parallel: shard the layer norms and dropouts over the sequence too.
        recompute: "none", "selective" (recompute attention's softmax part) or "full"
            (keep only each layer's input, recompute the rest).

    Example: ``activation_bytes(seq_len=2048, batch_size=1, hidden=12288, num_heads=96)``.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("hidden", hidden),
                        ("num_heads", num_heads), ("num_layers", num_layers),
                        ("tensor_parallel", tensor_parallel)):
        require_arg(name, value, is_int(value) and value >= 1, "an int >= 1")
    require_arg("bytes_per_value", bytes_per_value,
                is_number(bytes_per_value) and bytes_per_value > 0, "a number > 0")
    require_arg("sequence_parallel", sequence_parallel, isinstance(sequence_parallel, bool),
                "True or False")
    require_arg("recompute", recompute, recompute in RECOMPUTE, f"one of {RECOMPUTE}")
    s, b, h, a, t = seq_len, batch_size, hidden, num_heads, tensor_parallel
    if recompute == "full":
        per_value = Fraction(2)                       # only the layer's input, 2 bytes
    else:
        linear = Fraction(34, t) if sequence_parallel else 10 + Fraction(24, t)
        attention = Fraction(5 * a * s, h * t) if recompute == "none" else 0
        per_value = linear + attention
    total = s * b * h * per_value * num_layers * Fraction(bytes_per_value) / 2
    return round(total)


def tiny_transformer_activation_bytes(*, seq_len: int, batch_size: int, hidden: int,
                                      num_heads: int, num_layers: int, vocab_size: int) -> int:
    """Bytes :class:`~distlab.problems.transformer.TinyTransformer` (fp32) keeps for backward.

    Its own anatomy, read off what autograd saves (s = seq_len, b = batch_size, h = hidden,
    a = num_heads, V = vocab_size; 4 bytes a value). Per block, 16·sbh values: the block
    input (saved by ``ln1``), ``ln1``'s output (by ``qkv``), the fused Q, K, V (3, by
    attention), attention's output (1, by ``proj``: the head merge is a view of it), the
    residual sum (by ``ln2``), ``ln2``'s output (by ``fc1``), ``fc1``'s output (4, by the
    GeLU) and the GeLU's (4, by ``fc2``); plus each layer norm's mean and 1/std (2·sb
    each) and attention's log-sum-exp (a·sb). Outside the blocks: the position ids
    (s int64), the final norm's input, output and statistics (2·sbh + 2·sb), the
    log-softmax of the logits (sbV) and the loss's two scalars.

    Beside :func:`activation_bytes` at 4 bytes a value (68·sbh + 10·a·s²·b per layer): the
    same 16 values per sbh (64·sbh), the same tensors as Megatron's count; Megatron's other
    4·sbh are its two dropout masks (this model has no dropout), and its 10·a·s²·b are the
    s×s softmax, its dropout mask and output, which this model never stores because
    ``scaled_dot_product_attention`` is a fused (flash) kernel that keeps the log-sum-exp
    instead, 4·a·sb: what selective recomputation gets by recomputing, the kernel gets by
    not storing. Megatron leaves out the layer norms' statistics (4·4·sb), as small.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("hidden", hidden),
                        ("num_heads", num_heads), ("num_layers", num_layers),
                        ("vocab_size", vocab_size)):
        require_arg(name, value, is_int(value) and value >= 1, "an int >= 1")
    sb, sbh = seq_len * batch_size, seq_len * batch_size * hidden
    block = 4 * (16 * sbh + (2 * 2 + num_heads) * sb)
    outside = 8 * seq_len + 4 * (2 * sbh + 2 * sb + sb * vocab_size) + 2 * 4
    return num_layers * block + outside
