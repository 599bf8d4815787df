"""What lab 03's asynchronous methods need beyond the shared :class:`Workload`.

What they train is a :class:`~distlab.problems.workloads.Workload` like everywhere else
(:data:`WORKLOAD`: least-squares linear regression; ``model="mlp"``, ``depth=1`` for the
digits). But a parameter server stores and ships the model as one flat vector, and a stale
gradient is taken at parameters other than the model's current ones, so the algorithms work
on flat parameters: :func:`flat_gradient` gives the loss and the gradient ``(P,)`` at a given
flat vector, :func:`loss_at` the loss alone.

Hogwild!'s problem is **not** a Workload: :func:`sparse_logistic` is logistic regression on
sparse examples, each touching ``nnz`` of ``num_features`` coordinates (convex), trained with
hand-written single-example updates on a shared vector, with no ``nn.Module`` and no batches.

The parameter server (:mod:`distlab.asynchronous.parameter_server`), Hogwild!
(:mod:`distlab.asynchronous.hogwild`) and the simulated mode
(:mod:`distlab.asynchronous.simulated_staleness`) use these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters

from distlab.checks import is_int, is_number, require, require_arg
from distlab.problems import data
from distlab.problems.workloads import Workload

WORKLOAD = Workload("linear", hidden=32, depth=1, batch_size=32, lr=0.05, num_steps=200)
"""Lab 03's default: linear regression, 32 examples per gradient, lr 0.05, 200 updates (with
``model="mlp"``: a one-hidden-layer MLP of width 32 on the digits)."""
MODELS = ("linear", "mlp")
"""The workloads a flat-vector method trains: their data are rows ``(X, y)`` to shard."""


def require_flat_workload(config) -> None:
    """Refuse, naming ``config.workload``, what a flat-vector method cannot train.

    A :class:`Workload` of a model in :data:`MODELS` (rows ``(X, y)`` that workers can
    shard, a model small enough to ship as one vector).
    """
    w = config.workload
    require(config, "workload", isinstance(w, Workload) and w.model in MODELS,
            f"a distlab.problems.workloads.Workload with model in {MODELS} (a flat "
            "parameter vector trained on rows (X, y))")


def flat_gradient(model, loss_fn, X, y, flat: torch.Tensor, clip: float | None = None):
    """Loss and flat gradient ``(P,)`` of ``model`` at the parameters ``flat`` on ``(X, y)``.

    ``loss_fn`` is the workload's (``workload.loss``). With ``clip``, the gradient's norm is
    clipped to it first (``clip_grad_norm_``, as in torch): what a worker of an
    asynchronous run does to bound a stale step.
    """
    require_arg("clip", clip, clip is None or (is_number(clip) and clip > 0),
                "a number > 0 or None")
    vector_to_parameters(flat, model.parameters())
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(X), y)
    loss.backward()
    if clip is not None:
        clip_grad_norm_(model.parameters(), clip)
    return loss.detach(), parameters_to_vector([p.grad for p in model.parameters()])


def loss_at(model, loss_fn, X, y, flat: torch.Tensor) -> float:
    """The loss of ``model`` with the parameters ``flat`` on ``(X, y)`` (no gradient)."""
    with torch.no_grad():
        vector_to_parameters(flat, model.parameters())
        return float(loss_fn(model(X), y))


def sparse_logistic(num_features: int = 2000, nnz: int = 10, seed: int = 0):
    """Hogwild!'s dataset, and per example the indices of its non-zero features ``(N, nnz)``."""
    require_arg("num_features", num_features, is_int(num_features) and num_features >= 2,
                "an int >= 2")
    require_arg("nnz", nnz, is_int(nnz) and 1 <= nnz <= num_features,
                f"1..num_features={num_features}")
    require_arg("seed", seed, is_int(seed), "an int")
    ds = data.sparse_classification(d=num_features, nnz=nnz, seed=seed)
    cols = ds.X.ne(0).nonzero()[:, 1].reshape(len(ds.y), nnz)   # (N, nnz)
    return ds, cols


def log_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    """Mean logistic loss of the linear classifier ``w`` on ``(X, y)``."""
    return float(F.binary_cross_entropy_with_logits(X @ w, y))
