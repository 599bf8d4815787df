"""What TP, SP and DP cost: bytes per step, the TP-vs-DP crossover, activation memory.

Data and tensor parallelism send the same kind of message, a ring all-reduce over p
ranks, ``2(p-1)/p·n`` bytes per rank
(:func:`distlab.communication.alpha_beta.ring_all_reduce_bytes`); they differ in what n is:

* **data parallelism** all-reduces the *gradients* once per step: n = Ψ weights, whatever
  the batch (Li et al. 2020, "PyTorch Distributed", section 3);
* **tensor parallelism** (Megatron, Shoeybi et al. 2019, section 3) all-reduces the
  *activations*: per block and step 4 times B·T·C values (``g`` after attention and after
  the MLP forward, ``f`` before each of them backward), whatever the weights;
* **sequence parallelism** (Korthikanti et al. 2022, section 4.2.2) turns each of those
  into a reduce-scatter and an all-gather, the same bytes, and adds one all-reduce of the
  LayerNorm and bias gradients of the sequence regions (6·C values per block; in
  :mod:`~distlab.model_parallel.sequence_parallel` the embedding's and the head's too).

So, per step, with the same p and dtype on both sides, TP's traffic exceeds DP's once the
tokens per step pass

    B·T > Ψ / (4·L·C)

(L blocks of width C). For one block Ψ = 12C² + 13C, and the crossover is B·T = 3C + 13/4:
a few thousand tokens for a C of 1024, which every real batch passes, so TP's traffic
is the larger and TP is kept inside a node (Narayanan et al. 2021, section 3.2), DP across.
For the whole model Ψ also counts the embedding and head, which TP does not split nor
communicate (:func:`crossover`).

What sequence parallelism buys for no extra activation traffic is memory:
:func:`saved_activation_bytes` counts, per rank, what autograd keeps for backward in each
variant, beside the paper's 16-bit formula (:func:`paper_activation_bytes`).
"""
from __future__ import annotations

from distlab.checks import is_int, require_arg
from distlab.communication.alpha_beta import ring_all_gather_bytes, ring_all_reduce_bytes
from distlab.problems.workloads import Workload


def crossover(workload: Workload) -> float:
    """The tokens per step (batch_size · block_size) above which tensor parallelism's
    activation all-reduces send more bytes than data parallelism's gradient all-reduce,
    for ``workload``'s transformer: ``Ψ / (4·L·C)`` (see the module)."""
    _check_transformer(workload)
    return parameter_count(workload) / (4 * workload.depth * workload.hidden)


def block_crossover(d_model: int) -> float:
    """The same for one block alone: ``(12C² + 13C) / (4C) = 3C + 13/4`` tokens."""
    require_arg("d_model", d_model, is_int(d_model) and d_model >= 1, "an int >= 1")
    return block_parameters(d_model) / (4 * d_model)


def volumes(workload: Workload, world_size: int, itemsize: int = 4) -> dict[str, int]:
    """Bytes each rank sends per step under ``"dp"``, ``"tp"``, ``"sp"`` and
    ``"sp_regather"`` (over ``world_size`` ranks each), and the same for one block
    (``"dp_per_block"``, ...), in the ring's α-β model. TP and SP count the global batch's
    tokens: a tensor-parallel group computes all of them."""
    _check_transformer(workload)
    require_arg("world_size", world_size, is_int(world_size) and world_size >= 1, "an int >= 1")
    require_arg("itemsize", itemsize, is_int(itemsize) and itemsize >= 1, "an int >= 1")
    B, T, C, L, p = (workload.batch_size, workload.block_size, workload.hidden,
                     workload.depth, world_size)
    activations = 4 * ring_all_reduce_bytes(itemsize * B * T * C, p)   # = 4 RS + 4 AG
    regathers = 2 * ring_all_gather_bytes(itemsize * B * T * C, p)     # in backward
    region = ring_all_reduce_bytes(itemsize * (6 * C * L + _replicated(workload)), p)
    block = {"dp": ring_all_reduce_bytes(itemsize * block_parameters(C), p),
             "tp": activations, "sp": activations + ring_all_reduce_bytes(itemsize * 6 * C, p),
             "sp_regather": activations + regathers
             + ring_all_reduce_bytes(itemsize * 6 * C, p)}
    return {"dp": ring_all_reduce_bytes(itemsize * parameter_count(workload), p),
            "tp": L * activations, "sp": L * activations + region,
            "sp_regather": L * (activations + regathers) + region,
            **{f"{name}_per_block": v for name, v in block.items()}}


def parameter_count(workload: Workload) -> int:
    """Ψ of ``workload``'s :class:`~distlab.problems.transformer.TinyTransformer`."""
    _check_transformer(workload)
    return workload.depth * block_parameters(workload.hidden) + _replicated(workload)


def block_parameters(d_model: int) -> int:
    """One block's weights: QKV 3C² + 3C, projection C² + C, MLP 8C² + 5C, LayerNorms 4C."""
    C = d_model
    return 12 * C * C + 13 * C


def saved_activation_bytes(workload: Workload, degree: int, sequence_parallel: bool,
                           regather: bool = False) -> int:
    """Bytes autograd keeps from forward for backward, per rank, in the transformer of
    :mod:`~distlab.model_parallel.sequence_parallel` (``sequence_parallel=False``: plain
    Megatron TP).

    The paper's accounting (Korthikanti et al. 2022, section 4.1) applied to the lab's
    transformer, whose activations are 32-bit, with no dropout, and whose CPU attention
    (flash) keeps its output and a log-sum-exp per row instead of the (T, T) scores: the
    ``5as/(ht)`` term is gone. Per block, in units of B·T·C values:

    * tensor parallel, ``4 + 13/t``: the inputs of the 2 LayerNorms and of the QKV and fc1
      projections whole (the paper's 10, with its 2 dropout masks); Q, K, V (3), the
      attention output and its reshape (2), fc1's output and GeLU's (8) split (its 24);
    * sequence parallel, ``2 + 15/t``: the LayerNorm inputs split too; the gathered inputs
      of QKV and fc1 stay whole;
    * with ``regather``, ``17/t``: those kept as shards as well, the paper's ``34/t``.

    Plus the head: the final LayerNorm's input and output (B·T·C each) and the log-softmax
    (B·T·V), split by t under sequence parallelism. Small terms (LayerNorm means and
    deviations, log-sum-exps) are left out.
    """
    _check_transformer(workload)
    require_arg("degree", degree, is_int(degree) and degree >= 1, "an int >= 1")
    require_arg("sequence_parallel", sequence_parallel, isinstance(sequence_parallel, bool),
                "True or False")
    require_arg("regather", regather, isinstance(regather, bool), "True or False")
    B, T, C, L, t = (workload.batch_size, workload.block_size, workload.hidden,
                     workload.depth, degree)
    V = _vocab_size()
    per_block = 17 / t if regather else (2 + 15 / t) if sequence_parallel else 4 + 13 / t
    head = (2 * C + V) / (t if sequence_parallel else 1)
    return round(4 * B * T * (L * per_block * C + head))


def paper_activation_bytes(s: int, b: int, h: int, a: int, t: int,
                           sequence_parallel: bool) -> float:
    """Korthikanti et al. 2022, equations 2 and 4: activation bytes per layer, 16-bit.

    ``sbh(10 + 24/t + 5as/(ht))`` with tensor parallelism, ``sbh(34/t + 5as/(ht))`` with
    sequence parallelism too (s tokens, b sequences, h hidden, a heads, t ranks).
    """
    for name, v in (("s", s), ("b", b), ("h", h), ("a", a), ("t", t)):
        require_arg(name, v, is_int(v) and v >= 1, "an int >= 1")
    require_arg("sequence_parallel", sequence_parallel, isinstance(sequence_parallel, bool),
                "True or False")
    attention = 5 * a * s / (h * t)
    return s * b * h * ((34 / t if sequence_parallel else 10 + 24 / t) + attention)


def _replicated(workload: Workload) -> int:
    # Embedding (tokens and positions) and head (LayerNorm, projection to the vocabulary).
    V, C, T = _vocab_size(), workload.hidden, workload.block_size
    return V * C + T * C + 2 * C + C * V + V


def _vocab_size() -> int:
    from distlab.problems.transformer import CharTokenizer, load_text
    return CharTokenizer(load_text()).vocab_size


def _check_transformer(workload: Workload) -> None:
    require_arg("workload", workload, isinstance(workload, Workload)
                and workload.model == "transformer", "a Workload with model='transformer'")
