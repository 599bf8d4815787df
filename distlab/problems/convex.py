"""The small problems lab 03's asynchronous methods train, built the same on every rank.

A parameter server stores and ships the model as one flat vector, so everything here works
on flat parameters: :func:`build` gives ``(model, dataset, loss_fn)`` from a seed, and
:func:`flat_gradient` the loss and the gradient ``(P,)`` at a given flat vector, :func:`loss_at`
the loss alone.

* ``"linear_regression"`` - ``nn.Linear`` on :func:`distlab.problems.data.linear_regression`,
  mean squared error: convex, with a known answer.
* ``"digits"`` - a one-hidden-layer MLP on the 8x8 digits, cross-entropy (not convex, but
  small enough for a parameter server on a laptop).
* :func:`sparse_logistic` - Hogwild!'s problem: logistic regression on sparse examples, each
  touching ``nnz`` of ``num_features`` coordinates (convex).

The parameter server (:mod:`distlab.asynchronous.parameter_server`), Hogwild!
(:mod:`distlab.asynchronous.hogwild`) and the simulated mode
(:mod:`distlab.asynchronous.simulated_staleness`) train these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters

from distlab.checks import is_int, is_number, require_arg
from distlab.problems import data, models

PROBLEMS = ("linear_regression", "digits")


def build(problem: str, hidden: int = 32, seed: int = 0):
    """``(model, dataset, loss_fn)`` for ``problem``, identical on every rank for a seed."""
    if problem not in PROBLEMS:
        raise ValueError(f"problem={problem!r} is not one of {PROBLEMS}")
    if not is_int(hidden) or not 1 <= hidden <= 4096:
        raise ValueError(f"hidden={hidden!r} is out of range; allowed 1..4096")
    if not is_int(seed):
        raise ValueError(f"seed={seed!r} is out of range; allowed an int")
    if problem == "linear_regression":
        ds = data.linear_regression(seed=seed)
        return models.linear(ds.num_features, seed=seed), ds, F.mse_loss
    ds = data.digits(seed=seed)
    return (models.mlp(ds.num_features, hidden, ds.num_classes, depth=1, seed=seed), ds,
            F.cross_entropy)


def flat_gradient(model, loss_fn, X, y, flat: torch.Tensor, clip: float | None = None):
    """Loss and flat gradient ``(P,)`` of ``model`` at the parameters ``flat`` on ``(X, y)``.

    With ``clip``, the gradient's norm is clipped to it first (``clip_grad_norm_``, as in
    torch): what a worker of an asynchronous run does to bound a stale step.
    """
    if clip is not None and not (is_number(clip) and clip > 0):
        raise ValueError(f"clip={clip!r} is out of range; allowed a number > 0 or None")
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
    if not is_int(seed):
        raise ValueError(f"seed={seed!r} is out of range; allowed an int")
    ds = data.sparse_classification(d=num_features, nnz=nnz, seed=seed)
    cols = ds.X.ne(0).nonzero()[:, 1].reshape(len(ds.y), nnz)   # (N, nnz)
    return ds, cols


def log_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    """Mean logistic loss of the linear classifier ``w`` on ``(X, y)``."""
    return float(F.binary_cross_entropy_with_logits(X @ w, y))
