"""Expert parallelism: the experts of a mixture-of-experts layer spread over the ranks.

GShard (Lepikhin et al. 2020, section 2.2 and figure 3) and Switch (Fedus et al. 2021,
section 2.2 and figure 3): with E experts on p ranks, rank j holds experts
``j·E/p .. (j+1)·E/p - 1`` and a copy of the router. Each rank routes its own T tokens
(:func:`distlab.model_parallel.experts.route`) and fills one buffer of ``capacity`` places
per expert, (E, C, d), zeros where no token came. Then

1. **dispatch**: one all-to-all sends each rank the places of its own experts from every
   rank, (p, E/p, C, d);
2. each local expert runs on the p·C places sent to it;
3. **combine**: the reverse all-to-all returns every output to the rank its token came
   from, which adds the gated outputs of each token's kept choices (dropped ones add
   nothing: :mod:`distlab.model_parallel.experts`).

Every buffer has the same size on every rank, so both all-to-alls have equal splits. The
backward pass of an all-to-all is the all-to-all that undoes it (:class:`AllToAll`): two
more per step. Router gradients are averaged over the ranks
(:func:`distlab.data_parallel.ddp.average_gradients`); an expert's gradient already sums
over every rank's tokens, through the combine's reverse all-to-all.

Cost per step (alpha-beta, :func:`distlab.communication.alpha_beta.all_to_all`, n the
bytes of E·C·d values per rank): four all-to-alls, ``4·((p-1)·alpha + (p-1)/p·n·beta)``,
plus the router's gradient all-reduce; the experts' weights are never sent. Where the
tokens are data (:func:`train`'s task), nothing before the layer learns, so autograd skips
the dispatch's backward: three all-to-alls.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distlab import comm
from distlab.checks import is_int, is_number, require
from distlab.communication.all_to_all import ALL_TO_ALLS, model_bytes
from distlab.data_parallel.ddp import average_gradients
from distlab.metrics import report
from distlab.model_parallel.experts import (MoE, MoEOutput, capacity, check_moe,
                                            load_balancing_loss, route)


@dataclass(frozen=True)
class ExpertParallelConfig:
    """A mixture-of-experts layer trained on a tiny token task, its experts over the ranks."""
    world_size: int = 2
    """Ranks; each holds ``num_experts / world_size`` experts and routes its own tokens."""
    num_experts: int = 4
    """Experts E (a multiple of ``world_size``)."""
    top_k: int = 1
    """Experts per token: 1 (Switch) or 2 (GShard)."""
    capacity_factor: float = 1.25
    """Places per expert = ceil(capacity_factor · tokens · top_k / num_experts)."""
    d_model: int = 8
    """Width of a token."""
    expert_hidden: int = 16
    """Hidden width of each expert's MLP."""
    tokens: int = 16
    """Tokens each rank routes per step."""
    num_steps: int = 3
    """Optimizer steps (SGD)."""
    lr: float = 0.1
    """SGD's learning rate."""
    aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss in the training loss (Switch's alpha)."""
    seed: int = 0
    """Seeds the weights and the data: every rank and the reference build the same."""
    all_to_all: str = "pairwise"
    """``"pairwise"`` (from point-to-point messages) or ``"torch"`` (dist.all_to_all_single)."""

    def __post_init__(self):
        for name, low in (("world_size", 1), ("num_experts", 1), ("d_model", 1),
                          ("expert_hidden", 1), ("tokens", 1), ("num_steps", 1), ("seed", 0)):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= low, f"an int >= {low}")
        require(self, "world_size", self.world_size <= 64, "an int in 1..64")
        require(self, "num_experts", self.num_experts % self.world_size == 0,
                f"a multiple of world_size={self.world_size}: every rank holds an equal "
                "share of the experts")
        require(self, "top_k", is_int(self.top_k) and self.top_k in (1, 2)
                and self.top_k <= self.num_experts,
                f"1 or 2, and at most num_experts={self.num_experts}")
        require(self, "capacity_factor", is_number(self.capacity_factor)
                and self.capacity_factor > 0, "a number > 0")
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
        require(self, "aux_loss_weight", is_number(self.aux_loss_weight)
                and self.aux_loss_weight >= 0, "a number >= 0")
        require(self, "all_to_all", isinstance(self.all_to_all, str)
                and self.all_to_all in ALL_TO_ALLS,
                f"one of {list(ALL_TO_ALLS)}")


def train(config: ExpertParallelConfig, group=None) -> dict:
    """Worker: train the expert-parallel layer on this rank's share of every batch.

    Returns this rank's ``losses`` (the global loss, as :func:`reference` computes it), its
    tokens' ``kept`` and ``dropped`` choices per expert over the run, the all-to-all
    ``bytes_sent`` counted by the ledger and the formula's ``model_bytes``, and ``by_op``.
    """
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    if p != config.world_size:
        raise ValueError(f"the config is for world_size={config.world_size}, the group has "
                         f"{p} ranks")
    layer = ExpertParallelMoE(build_moe(config), group, config.all_to_all)
    optimizer = torch.optim.SGD(layer.parameters(), lr=config.lr)
    comm.ledger().reset()
    losses, hist = [], {"kept": [0] * config.num_experts, "dropped": [0] * config.num_experts}
    for step, (X, y) in enumerate(batches(config)):
        X, y = X.chunk(p)[rank], y.chunk(p)[rank]                    # (T, d): my tokens
        out = layer(X)
        loss = objective(out, X, y, config)
        loss.backward()
        layer.finish_gradient_synchronization()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        comm.all_reduce(total, group=group)
        losses.append(total.item() / p)
        tally(hist, out)
        report(step=step, loss=losses[-1], **comm.ledger().totals())
    ops = comm.ledger().by_op()
    sent = sum(ops[o]["bytes_sent"] for o in ("send", "all_to_all") if o in ops)
    per_call = model_bytes(layer.buffer_bytes(config.tokens, config.d_model), p)
    calls = 3   # dispatch, combine, the combine's backward; the tokens need no gradient
    return {"rank": rank, "losses": losses, **hist, "bytes_sent": sent,
            "model_bytes": calls * config.num_steps * per_call, "by_op": ops}


def reference(config: ExpertParallelConfig) -> dict:
    """The same training in one process, each rank's tokens routed as one group: the
    ``losses`` every rank must report and the ``kept`` and ``dropped`` counts of all ranks."""
    moe = build_moe(config)
    optimizer = torch.optim.SGD(moe.parameters(), lr=config.lr)
    losses, hist = [], {"kept": [0] * config.num_experts, "dropped": [0] * config.num_experts}
    for X, y in batches(config):
        out = moe(X, groups=config.world_size)
        loss = objective(out, X, y, config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        tally(hist, out)
    return {"losses": losses, **hist}


def start(config: ExpertParallelConfig, **launch_kwargs):
    """:func:`distlab.start` :func:`train` on ``config.world_size`` ranks; ``launch_kwargs``
    go to the launcher (``timeout``, ``on_metrics``, ``on_output``, ...)."""
    from distlab.launcher import start as _start
    return _start(train, config.world_size, config, **launch_kwargs)


def run(config: ExpertParallelConfig, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, **launch_kwargs).result()


# ----------------------------------------------------------------------------------------
# The layer, and the all-to-all autograd goes through.
# ----------------------------------------------------------------------------------------

class ExpertParallelMoE(nn.Module):
    """This rank's part of a :class:`~distlab.model_parallel.experts.MoE`: the router and
    its ``E/p`` experts. ``forward(x)`` takes this rank's tokens (T, d); every rank of
    ``group`` must pass the same T (the buffers, so the all-to-alls, must be equal)."""

    def __init__(self, moe: MoE, group=None, all_to_all: str = "pairwise"):
        super().__init__()
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a distlab.model_parallel.experts.MoE, got "
                            f"{type(moe).__name__}")
        p, rank = dist.get_world_size(group), dist.get_rank(group)
        E = moe.num_experts
        check_moe(E, moe.top_k, moe.capacity_factor)
        if E % p:
            raise ValueError(f"num_experts={E} is not divisible by the {p} ranks of the group")
        if all_to_all not in ALL_TO_ALLS:
            raise ValueError(f"all_to_all={all_to_all!r} is unknown; allowed "
                             f"{list(ALL_TO_ALLS)}")
        self.group, self.all_to_all, self.num_experts = group, all_to_all, E
        self.top_k, self.capacity_factor = moe.top_k, moe.capacity_factor
        self.router = copy.deepcopy(moe.router)
        local = E // p
        self.experts = nn.ModuleList(copy.deepcopy(moe.experts[rank * local + i])
                                     for i in range(local))

    def forward(self, x: torch.Tensor) -> MoEOutput:
        T, d = x.shape
        E, p, local = self.num_experts, dist.get_world_size(self.group), len(self.experts)
        r = route(self.router(x), self.top_k, self.capacity_factor)
        C = r.capacity
        token, choice = r.kept.nonzero(as_tuple=True)
        place = r.experts[token, choice] * C + r.slots[token, choice]   # row in (E·C, d)
        buffers = x.new_zeros(E * C, d).index_add(0, place, x[token])    # (E·C, d)
        arrived = AllToAll.apply(buffers, self.group, self.all_to_all)   # (p·local·C, d)
        arrived = arrived.view(p, local, C, d).transpose(0, 1).reshape(local, p * C, d)
        done = torch.stack([expert(h) for expert, h in zip(self.experts, arrived)])
        done = done.view(local, p, C, d).transpose(0, 1).reshape(p * local * C, d)
        back = AllToAll.apply(done, self.group, self.all_to_all)         # (E·C, d): my places
        gated = r.gates[token, choice, None] * back[place]             # (kept choices, d)
        output = x.new_zeros(T, d).index_add(0, token, gated)
        return MoEOutput(output, load_balancing_loss(r), r.experts, r.kept)

    def finish_gradient_synchronization(self) -> None:
        """After backward: average the router's gradients over the group (each rank's
        covers its own tokens), and divide the experts' by p (each already sums, through
        the combine's reverse all-to-all, every rank's mean over its T tokens: one mean
        over pT). An expert no token reached has a zero gradient, never None, so an
        optimizer steps it as the single-process layer does. Cost: one all-reduce of the
        router's gradients (:func:`distlab.data_parallel.ddp.average_gradients`)."""
        average_gradients(self.router.parameters(), self.group)
        p = dist.get_world_size(self.group)
        for param in self.experts.parameters():
            if param.requires_grad:
                param.grad.div_(p)

    def buffer_bytes(self, tokens: int, d_model: int) -> int:
        """Bytes one all-to-all sends from each rank for ``tokens`` tokens: E·C·d floats."""
        C = capacity(tokens, self.num_experts, self.top_k, self.capacity_factor)
        return self.num_experts * C * d_model * self.router.weight.element_size()


class AllToAll(torch.autograd.Function):
    """An equal-split all-to-all of rows whose backward is the all-to-all that undoes it.

    Forward, rank r's chunk s goes to rank s; so the gradient of the chunk that rank s now
    holds from r must go back to r: the same equal-split all-to-all, on the gradient.
    """

    @staticmethod
    def forward(ctx, x, group, algorithm):
        ctx.group, ctx.algorithm = group, algorithm
        return ALL_TO_ALLS[algorithm](x.contiguous(), group=group, check=False)

    @staticmethod
    def backward(ctx, grad):
        undo = ALL_TO_ALLS[ctx.algorithm](grad.contiguous(), group=ctx.group, check=False)
        return undo, None, None


# ----------------------------------------------------------------------------------------
# The tiny token task: the same weights and data on every rank and in the reference.
# ----------------------------------------------------------------------------------------

def build_moe(config: ExpertParallelConfig) -> MoE:
    """The full layer, from ``config.seed``: every rank builds the same and keeps its part."""
    torch.manual_seed(config.seed)
    return MoE(config.d_model, config.expert_hidden, config.num_experts, config.top_k,
               config.capacity_factor)


def batches(config: ExpertParallelConfig):
    """``num_steps`` global batches ``(X, y)``, (world_size · tokens, d) each: random tokens
    and a fixed random nonlinear target, ``y = sin(X W)``. Rank r takes rows r·T .. (r+1)·T."""
    g = torch.Generator().manual_seed(config.seed + 1)
    W = torch.randn(config.d_model, config.d_model, generator=g)
    for _ in range(config.num_steps):
        X = torch.randn(config.world_size * config.tokens, config.d_model, generator=g)
        yield X, torch.sin(X @ W)


def tally(hist: dict, out: MoEOutput) -> None:
    """Add ``out``'s kept and dropped choices per expert into ``hist``, in place."""
    for kind, counts in out.histogram(len(hist["kept"])).items():
        hist[kind] = [a + b for a, b in zip(hist[kind], counts)]


def objective(out: MoEOutput, X, y, config: ExpertParallelConfig) -> torch.Tensor:
    """The residual block's MSE, ``x + moe(x)`` against y, plus the weighted auxiliary loss."""
    return F.mse_loss(X + out.output, y) + config.aux_loss_weight * out.aux_loss
