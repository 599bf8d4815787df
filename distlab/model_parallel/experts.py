"""A mixture-of-experts layer, in one process: the reference expert parallelism must equal.

Shazeer et al. 2017 ("Outrageously large neural networks: the sparsely-gated
mixture-of-experts layer") replace one MLP by E expert MLPs and a *router*, a linear layer
that scores every token against every expert; each token goes to its top-k experts only,
so the parameters grow E-fold while the compute per token stays that of k MLPs.

* **Top-k gating.** ``probs = softmax(x W_router)`` (T, E); a token's output is
  ``sum_j gate_j · expert_{e_j}(x)`` over its k best experts e_j. With k = 2 the two gates
  are renormalized to sum to 1 (GShard, Lepikhin et al. 2020, Algorithm 1); with k = 1 the
  gate is the router's probability itself, as in Switch (Fedus et al. 2021, eq. 2), so the
  router learns from the task loss too (renormalized, a single gate would always be 1).
* **Capacity.** Every expert takes at most ``capacity = ceil(cf · T · k / E)`` tokens of a
  group of T (Switch, section 2.2; cf the capacity factor): expert buffers have a fixed
  size, which is what lets expert parallelism exchange them with equal-sized all-to-alls.
  Tokens claim places in order: every token's first choice in token order, then the
  second choices (GShard, Algorithm 1).
* **Dropping.** A choice past its expert's capacity is *dropped*: it adds nothing. A token
  whose every choice is dropped gets output **zero** from this layer, so in a residual block
  ``x + moe(x)`` it passes on unchanged (Switch, section 2.2).
* **Load balancing.** Switch's auxiliary loss (eq. 4), ``E · sum_i f_i · P_i``: f_i the
  fraction of tokens whose first choice is expert i, P_i the mean router probability of
  expert i. It is 1 when routing is uniform and grows as tokens crowd onto few experts;
  the training loss adds it times a small weight (Switch uses 0.01).

``MoE.forward(x, groups=g)`` routes each of g equal groups of tokens on its own (its own
capacity, its own auxiliary loss, averaged over groups), as GShard's local groups do: with
one group per rank it is exactly what :mod:`distlab.model_parallel.expert_parallel`
computes, on the union of all ranks' tokens. This module communicates nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distlab.checks import is_int, is_number, require_arg


class MoE(nn.Module):
    """``num_experts`` expert MLPs behind a linear router; top-``top_k`` gating with
    ``capacity_factor``. Tokens are rows: the input is (T, d_model)."""

    def __init__(self, d_model: int, expert_hidden: int, num_experts: int, top_k: int = 1,
                 capacity_factor: float = 1.25):
        super().__init__()
        for name, v in (("d_model", d_model), ("expert_hidden", expert_hidden)):
            require_arg(name, v, is_int(v) and v >= 1, "an int >= 1")
        check_moe(num_experts, top_k, capacity_factor)
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(expert_mlp(d_model, expert_hidden)
                                     for _ in range(num_experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor, groups: int = 1) -> "MoEOutput":
        """Route each of ``groups`` equal slices of the tokens ``x`` (T, d) on its own."""
        if x.shape[0] % groups:
            raise ValueError(f"{x.shape[0]} tokens do not split into groups={groups} equal "
                             "groups")
        outputs, auxes, routings = [], [], []
        for xg in x.chunk(groups):                                 # (T/g, d) each
            r = route(self.router(xg), self.top_k, self.capacity_factor)
            out = xg.new_zeros(xg.shape)
            for e, expert in enumerate(self.experts):
                # Each token alone through its expert: no buffers here. An expert no token
                # reached runs on none, so its gradient is zero, not None (as on p ranks).
                token, choice = ((r.experts == e) & r.kept).nonzero(as_tuple=True)
                out = out.index_add(0, token, r.gates[token, choice, None] * expert(xg[token]))
            outputs.append(out)
            auxes.append(load_balancing_loss(r))
            routings.append(r)
        return MoEOutput(torch.cat(outputs), torch.stack(auxes).mean(),
                         torch.cat([r.experts for r in routings]),
                         torch.cat([r.kept for r in routings]))


@dataclass
class MoEOutput:
    """What a mixture-of-experts layer returns for T tokens."""
    output: torch.Tensor
    """(T, d): the gated sum of each token's kept experts' outputs (zero if all dropped)."""
    aux_loss: torch.Tensor
    """Switch's load-balancing loss (eq. 4), a scalar (the mean over groups)."""
    experts: torch.Tensor
    """(T, k) int64: each token's chosen experts, best first."""
    kept: torch.Tensor
    """(T, k) bool: False where the choice was dropped (its expert was full)."""

    def histogram(self, num_experts: int) -> dict:
        """``{"kept": [...], "dropped": [...]}``: choices per expert, kept and dropped."""
        count = lambda mask: torch.bincount(self.experts[mask], minlength=num_experts).tolist()
        return {"kept": count(self.kept), "dropped": count(~self.kept)}


@dataclass
class Routing:
    """Where each of T tokens goes: its k experts, gates and places in their buffers."""
    probs: torch.Tensor
    """(T, E): the router's softmax."""
    experts: torch.Tensor
    """(T, k) int64: the chosen experts, best first."""
    gates: torch.Tensor
    """(T, k): the weights of the chosen experts' outputs."""
    slots: torch.Tensor
    """(T, k) int64: the place each choice claims in its expert's buffer."""
    kept: torch.Tensor
    """(T, k) bool: ``slots < capacity``."""
    capacity: int
    """Places in every expert's buffer."""


def route(logits: torch.Tensor, top_k: int, capacity_factor: float) -> Routing:
    """Top-k gating with capacity for one group of tokens; ``logits`` (T, E)."""
    T, E = logits.shape
    probs = logits.softmax(dim=-1)
    top, experts = probs.topk(top_k, dim=-1)                         # (T, k)
    gates = top if top_k == 1 else top / top.sum(dim=-1, keepdim=True)
    # Places in order of claim: choice-major (all first choices, then all second ones).
    onehot = F.one_hot(experts.t().reshape(-1), E)                  # (k·T, E)
    place = ((onehot.cumsum(dim=0) - 1) * onehot).sum(dim=-1)       # (k·T,)
    slots = place.view(top_k, T).t()                                 # (T, k)
    cap = capacity(T, E, top_k, capacity_factor)
    return Routing(probs, experts, gates, slots, slots < cap, cap)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Places per expert for a group of ``num_tokens``: ``ceil(cf · T · k / E)``."""
    require_arg("num_tokens", num_tokens, is_int(num_tokens) and num_tokens >= 0, "an int >= 0")
    check_moe(num_experts, top_k, capacity_factor)
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """Switch's auxiliary loss (Fedus et al. 2021, eq. 4) without its weight alpha:
    ``E · sum_i f_i · P_i``; f_i (no gradient) the fraction of first choices on expert i,
    P_i the mean router probability for expert i (through which the loss trains the router)."""
    E = routing.probs.shape[1]
    f = F.one_hot(routing.experts[:, 0], E).float().mean(dim=0)      # (E,)
    return E * (f * routing.probs.mean(dim=0)).sum()


def expert_mlp(d_model: int, hidden: int) -> nn.Module:
    """One expert: ``Linear(d, h), ReLU, Linear(h, d)``, the transformer's MLP."""
    return nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, d_model))


def check_moe(num_experts, top_k, capacity_factor) -> None:
    """Refuse a layer that cannot route: k > E, cf <= 0, k other than 1 or 2."""
    require_arg("num_experts", num_experts, is_int(num_experts) and num_experts >= 1,
                "an int >= 1")
    require_arg("top_k", top_k, is_int(top_k) and top_k in (1, 2) and top_k <= num_experts,
                f"1 or 2, and at most num_experts={num_experts}")
    require_arg("capacity_factor", capacity_factor,
                is_number(capacity_factor) and capacity_factor > 0, "a number > 0")
