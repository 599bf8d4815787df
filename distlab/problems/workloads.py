"""What the course trains: one :class:`Workload` that every algorithm's config composes.

* ``"linear"``: least-squares linear regression (:func:`distlab.problems.models.linear`) on a
  synthetic problem with a known answer (:func:`distlab.problems.data.linear_regression`);
* ``"mlp"``: the ReLU MLP classifier (:func:`distlab.problems.models.mlp`) on the digits
  (:func:`distlab.problems.data.digits`);
* ``"transformer"``: :class:`distlab.problems.transformer.TinyTransformer` learning the next
  character of the text that ships with distlab.

A :class:`Workload` fixes the model, the data, the loss, the batches and the optimizer,
seeded, so every rank builds the same model and draws the same batches without
communicating, and :func:`train_reference` gives the single-process loss curve that
tensor-, pipeline- and data-parallel training must reproduce. An algorithm's config holds a
``workload`` field instead of re-declaring ``lr``, ``seed``, ``num_steps``, ``batch_size``
or ``hidden``; how it splits the batches over ranks (or clients) is the algorithm's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from distlab.checks import is_int, is_number, require

MODELS = ("linear", "mlp", "transformer")
OPTIMIZERS = ("sgd", "adam", "adamw")
"""``torch.optim.SGD`` (with ``momentum``), ``torch.optim.Adam``, ``torch.optim.AdamW``."""


@dataclass(frozen=True)
class Workload:
    """What to train, on what, for how long."""
    model: str = "mlp"
    """``"linear"`` (regression), ``"mlp"`` (digits) or ``"transformer"`` (the shipped text)."""
    hidden: int = 64
    """MLP hidden width, or the transformer's d_model (unused by ``"linear"``)."""
    depth: int = 2
    """MLP hidden layers, or transformer blocks."""
    num_heads: int = 4
    """Attention heads (transformer only)."""
    block_size: int = 32
    """Characters of context (transformer only)."""
    batch_size: int = 64
    """Examples (or text windows) per optimizer step, over all ranks."""
    lr: float = 0.1
    """Learning rate."""
    optimizer_name: str = "sgd"
    """A key of :data:`OPTIMIZERS`: what :meth:`optimizer` builds."""
    momentum: float = 0.0
    """SGD's momentum (``"sgd"`` only)."""
    weight_decay: float = 0.0
    """L2 penalty (``"sgd"``, ``"adam"``) or decoupled weight decay (``"adamw"``)."""
    num_steps: int = 20
    """Optimizer steps."""
    seed: int = 0
    """Seeds the model's initial weights and the batches."""
    dataset: object = field(default=None, repr=False, compare=False)
    """The loaded data, set by :meth:`loaded` (None: each process loads its own)."""
    loaded_for: tuple | None = field(default=None, repr=False, compare=False)
    """The ``(model, seed)`` that ``dataset`` was loaded for, set by :meth:`loaded`."""

    def __post_init__(self):
        require(self, "model", self.model in MODELS, f"one of {MODELS}")
        for name in ("hidden", "depth", "batch_size", "num_steps", "block_size"):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= 1, "an int >= 1")
        if self.model == "transformer":
            require(self, "num_heads", is_int(self.num_heads) and self.num_heads >= 1
                    and self.hidden % self.num_heads == 0,
                    f"an int >= 1 dividing hidden={self.hidden} (each head gets "
                    "hidden/num_heads dims)")
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
        require(self, "optimizer_name", self.optimizer_name in OPTIMIZERS,
                f"one of {OPTIMIZERS}")
        require(self, "momentum", is_number(self.momentum) and 0 <= self.momentum < 1,
                "a number in [0, 1)")
        require(self, "weight_decay", is_number(self.weight_decay) and self.weight_decay >= 0,
                "a number >= 0")
        require(self, "seed", is_int(self.seed) and 0 <= self.seed <= 2 ** 31,
                "an int in 0..2^31")
        if self.loaded_for != (self.model, self.seed):
            # replace(w.loaded(), seed=1) must not keep the data of the old seed.
            object.__setattr__(self, "dataset", None)
            object.__setattr__(self, "loaded_for", None)

    def build_model(self) -> nn.Module:
        """The full, unsplit model (the same weights on every rank, from ``seed``)."""
        if self.model == "linear":
            from distlab.problems.models import linear
            return linear(self.loaded().dataset.num_features, seed=self.seed)
        if self.model == "mlp":
            from distlab.problems.models import mlp
            return mlp(64, self.hidden, 10, self.depth, seed=self.seed)
        from distlab.problems.transformer import CharTokenizer, TinyTransformer, load_text
        return TinyTransformer(CharTokenizer(load_text()).vocab_size, self.hidden,
                               self.num_heads, self.depth, self.block_size, seed=self.seed)

    def loaded(self) -> "Workload":
        """This workload with its data loaded, to send to the workers.

        Loaded once by the caller, the data travels to every worker with the config.
        """
        if self.dataset is not None:
            return self
        key = (self.model, self.seed)
        if self.model == "linear":
            from distlab.problems.data import linear_regression
            return replace(self, dataset=linear_regression(seed=self.seed), loaded_for=key)
        if self.model == "mlp":
            from distlab.problems.data import digits
            return replace(self, dataset=digits(seed=self.seed), loaded_for=key)
        from distlab.problems.transformer import CharTokenizer, load_text
        text = load_text()
        return replace(self, dataset=CharTokenizer(text).encode(text), loaded_for=key)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The global batch ``(X, y)`` of every step, in order."""
        data = self.loaded().dataset
        if self.model in ("linear", "mlp"):
            g = torch.Generator().manual_seed(self.seed + 1)
            for _ in range(self.num_steps):
                idx = torch.randint(len(data.y), (self.batch_size,), generator=g)
                yield data.X[idx], data.y[idx]
        else:
            from distlab.problems.transformer import get_batch
            for step in range(self.num_steps):
                yield get_batch(data, self.batch_size, self.block_size, self.seed + 1 + step)

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean squared error (``"linear"``), or mean cross-entropy (over examples, or over
        characters)."""
        if self.model == "linear":
            return F.mse_loss(output, y)
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1))

    def optimizer(self, params) -> torch.optim.Optimizer:
        """The optimizer every rank and the single-process reference step with (plain SGD
        by default)."""
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)


def train_reference(workload: Workload) -> list[float]:
    """Single-process training: the loss of every step, the curve to reproduce."""
    return train_reference_model(workload)[0]


def train_reference_model(workload: Workload) -> tuple[list[float], torch.nn.Module]:
    """Single-process training: the loss of every step and the trained model (whose final
    parameters a sharded run must gather)."""
    model = workload.build_model()
    optimizer = workload.optimizer(model.parameters())
    losses = []
    for X, y in workload.batches():
        loss = workload.loss(model(X), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model
