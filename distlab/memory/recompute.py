"""Activation checkpointing: keep less from forward, recompute it in backward.

Chen et al. 2016 ("Training Deep Nets with Sublinear Memory Cost") keep only the inputs of
chosen segments and run each segment's forward again when backward reaches it: memory for
one more forward. Korthikanti et al. 2022 (section 5) recompute *selectively*: only the
part whose activations are large and cheap to recompute, attention (its s×s scores).

For :class:`~distlab.problems.transformer.TinyTransformer`, :func:`with_recompute` wraps,
through ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``,

* ``"full"``: every block; a block then keeps only its input (sbh values, the
  ``recompute="full"`` row of :func:`~distlab.memory.activations.activation_bytes`) and runs
  its forward twice;
* ``"selective"``: every block's attention sublayer (QKV projection, attention, output
  projection); it keeps its input instead of Q, K, V, attention's output and log-sum-exp
  (4·sbh + a·sb values fewer per block). Megatron's selective recomputation is narrower (the
  softmax and dropout inside attention only); with a fused attention kernel, which never
  stores the s×s scores, that part would save only the log-sum-exp here.

:func:`compare_recompute` measures, for each choice, the activations kept
(:func:`~distlab.memory.measure.measure_step`), the FLOPs backward pays (counted by
``torch.utils.flop_counter``) and the time of forward plus backward (median of interleaved
repeats, so a busy machine slows every choice alike). The non-reentrant checkpoint stops
recomputing once it has every tensor backward needs, so a block's last layer (``fc2``,
whose output nobody saved) is not run again. No communication.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from distlab.checks import is_int, require_arg
from distlab.memory.activations import RECOMPUTE
from distlab.memory.measure import measure_step


def with_recompute(model: torch.nn.Module, recompute: str) -> torch.nn.Module:
    """``model`` (a TinyTransformer), changed in place so backward recomputes ``recompute``.

    Args:
        model: has ``blocks()``, each with an ``attn`` sublayer (any model for "none").
        recompute: "none", "selective" (each block's attention) or "full" (each block).

    Parameter names and values do not change, so state dicts and optimizers carry over.
    Example: ``with_recompute(TinyTransformer(vocab), "full")``.
    """
    require_arg("recompute", recompute, recompute in RECOMPUTE, f"one of {RECOMPUTE}")
    if recompute == "none":
        return model
    if not callable(getattr(model, "blocks", None)):
        raise TypeError(f"with_recompute(recompute={recompute!r}) needs a model with blocks() "
                        f"(a TinyTransformer); got a {type(model).__name__}")
    for block in model.blocks():
        if recompute == "full":
            _recompute_forward(block)
        elif recompute == "selective":
            _recompute_forward(block.attn)
    return model


def compare_recompute(build_model, batch, loss_fn, recompute=RECOMPUTE,
                      repeats: int = 5) -> dict[str, dict]:
    """Activations kept and time paid by each recompute choice, on the same model and batch.

    Args:
        build_model: ``build_model()`` -> a fresh TinyTransformer (same seed every call).
        batch: ``(X, y)``.
        loss_fn: ``loss_fn(model(X), y)`` -> the loss.
        recompute: the choices to compare.
        repeats: timed forward+backward passes per choice, interleaved.

    Returns:
        ``{choice: {"saved_activations", "peak" (bytes), "forward_flops",
        "backward_flops" (counted matrix products), "seconds", "seconds_min",
        "seconds_max"}}``; ``seconds`` is the median of forward plus backward.
    """
    for choice in recompute:
        require_arg("recompute", choice, choice in RECOMPUTE, f"one of {RECOMPUTE}")
    require_arg("repeats", repeats, is_int(repeats) and repeats >= 1, "an int >= 1")
    X, y = batch
    models = {c: with_recompute(build_model(), c) for c in recompute}
    out = {}
    for choice, model in models.items():
        r = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, loss_fn)
        out[choice] = {"saved_activations": r["saved_activations"], "peak": r["peak"],
                       **_counted_flops(model, batch, loss_fn)}
    times = {c: [] for c in recompute}
    for _ in range(repeats):
        for choice, model in models.items():     # interleaved: A B C A B C ...
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss_fn(model(X), y).backward()
            times[choice].append(time.perf_counter() - start)
    for choice, ts in times.items():
        out[choice].update(seconds=statistics.median(ts), seconds_min=min(ts),
                           seconds_max=max(ts))
    return out


def _counted_flops(model, batch, loss_fn) -> dict[str, int]:
    # FLOPs of the matrix products (torch's FlopCounterMode), forward and backward apart:
    # the recomputation shows up in backward's.
    X, y = batch
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as forward:
        loss = loss_fn(model(X), y)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return {"forward_flops": forward.get_total_flops(),
            "backward_flops": backward.get_total_flops()}


def _recompute_forward(module: torch.nn.Module) -> None:
    # The instance's forward, run under checkpoint: nn.Module.__call__ (and its hooks) stay.
    forward = module.forward

    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    module.forward = recomputed
    module.recomputes_forward = True   # FSDP refuses a unit gathered outside this forward
