"""ZeRO stages 1 and 2: shard the optimizer state, then the gradients, across the ranks.

Data-parallel training with Adam keeps, on *every* rank, the parameters, their gradients
and Adam's two moments: with Ψ fp32 parameters that is 4Ψ + 4Ψ + 8Ψ = 16Ψ bytes per rank,
however many ranks there are. ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", section 5 and Figure 1) removes the redundancy:

==========  ===============================  =====================  ==========================
stage       each rank keeps                  bytes per rank (fp32)  communication per step
==========  ===============================  =====================  ==========================
0 (naive)   everything                       (4 + 4 + K)Ψ           all-reduce grads: 2Ψ
1  P_os     1/N of the optimizer state       (4 + 4 + K/N)Ψ         reduce-scatter grads Ψ +
                                                                    all-gather params Ψ = 2Ψ
2  P_os+g   ... and 1/N of the gradients     (4 + (4 + K)/N)Ψ       the same 2Ψ
3  P_os+g+p ... and 1/N of the parameters    (4 + 4 + K)Ψ/N         3Ψ, see :mod:`distlab.sharding.fsdp`
==========  ===============================  =====================  ==========================

K is the optimizer's state in bytes per parameter (Adam: m and v, K = 8; SGD with momentum:
K = 4). Volumes are per rank, times (N-1)/N; in the alpha-beta model a ring reduce-scatter
or all-gather of n bytes costs (N-1)·alpha + (N-1)/N·n·beta, an all-reduce twice that. So
stages 1 and 2 cost what data parallelism costs (section 7.2.1), and save memory for free.

How the shards are cut (the layout PyTorch's FSDP2 uses): every parameter is flattened,
padded to a multiple of N and cut into N equal chunks; rank r owns chunk r of *every*
parameter. The optimizer a rank runs is an ordinary ``torch.optim`` optimizer over its
chunks, which are views into the parameters' own storage, so stepping them updates the model
in place and Adam, AdamW or SGD (any *elementwise* optimizer) gives bit for bit the update it
would give the whole tensor. An all-gather then hands every rank the chunks it did not step.

All communication goes through :mod:`distlab.comm`, so every byte is counted.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.nn import functional as F

from distlab import comm
from distlab.communication.collectives import ring_reduce_scatter

GRADIENT_MODES = ("averaged", "reduce_scatter", "sharded")
STAGES = (0, 1, 2, 3)
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"momentum": 0.9}), "adam": (torch.optim.Adam, {}),
              "adamw": (torch.optim.AdamW, {"weight_decay": 0.01})}


# -- the shard layout ---------------------------------------------------------------------

class ShardLayout:
    """Which elements of each tensor a rank owns: chunk r of the tensor flattened and padded.

    A tensor of n elements is padded to N·c elements, c = ceil(n / N), and viewed as (N, c):
    row r is rank r's chunk. Rank r's *shard* is that chunk without the padding (elements
    ``bounds(i, r)`` of the flat tensor; it may be shorter than c, or empty). Collectives
    move whole rows: a rank's row for all tensors is the concatenation of its chunks,
    ``row_len = sum(c)`` elements.

    Args:
        shapes: the full shapes of the tensors.
        world_size: N, the number of ranks that share them.
    """

    def __init__(self, shapes, world_size: int):
        self.shapes = [torch.Size(s) for s in shapes]
        self.world_size = world_size
        self.numels = [s.numel() for s in self.shapes]
        self.chunks = [math.ceil(n / world_size) for n in self.numels]
        self.offsets = [sum(self.chunks[:i]) for i in range(len(self.chunks))]
        self.row_len = sum(self.chunks)

    def bounds(self, i: int, rank: int) -> tuple[int, int]:
        """The range [start, stop) of tensor ``i``'s flat elements that ``rank`` owns."""
        c, n = self.chunks[i], self.numels[i]
        return min(rank * c, n), min((rank + 1) * c, n)

    def shard(self, i: int, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s shard of the full tensor ``full`` (a view, not a copy)."""
        start, stop = self.bounds(i, rank)
        return full.reshape(-1)[start:stop]

    def pack_row(self, shards, dtype=None) -> torch.Tensor:
        """One rank's shards laid out as its row, zero padded: shape (row_len,)."""
        row = torch.zeros(self.row_len, dtype=dtype or shards[0].dtype)
        for o, s in zip(self.offsets, shards):
            row[o:o + s.numel()] = s
        return row

    def pack_rows(self, fulls, dtype=None) -> torch.Tensor:
        """Full tensors laid out as the rows of all ranks: shape (N, row_len)."""
        N = self.world_size
        return torch.cat([F.pad(t.reshape(-1).to(dtype or t.dtype), (0, N * c - n)).view(N, c)
                          for t, n, c in zip(fulls, self.numels, self.chunks)], dim=1)

    def unpack_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`pack_rows`: (N, row_len) rows back to full tensors."""
        out = []
        for o, c, n, shape in zip(self.offsets, self.chunks, self.numels, self.shapes):
            flat = rows.new_empty(self.world_size * c)
            flat.view(self.world_size, c).copy_(rows[:, o:o + c])
            out.append(flat[:n].view(shape))
        return out

    def unpack_rows_into(self, rows: torch.Tensor, fulls) -> None:
        """:meth:`unpack_rows` written straight into existing contiguous tensors: one copy."""
        for o, c, n, t in zip(self.offsets, self.chunks, self.numels, fulls):
            flat, whole = t.view(-1), n // c if c else 0
            flat[:whole * c].view(whole, c).copy_(rows[:whole, o:o + c])
            if n > whole * c:
                flat[whole * c:].copy_(rows[whole, o:o + n - whole * c])


# -- the collectives ZeRO needs -----------------------------------------------------------

def reduce_scatter(rows: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``rows`` (N, L) over the ranks and return this rank's row of the sum, (L,).

    Gloo has no reduce-scatter, so on gloo this is the ring algorithm of
    :func:`distlab.communication.collectives.ring_reduce_scatter` (Patarasuk and Yuan 2009): N-1 steps, in
    each a rank passes one partial sum to its right neighbour and adds the one arriving from
    its left. Cost (N-1)·alpha + (N-1)/N·n·beta for n = N·L elements, half an all-reduce,
    and the ledger counts exactly those bytes. ``rows`` is overwritten. Other backends use
    their native reduce-scatter.
    """
    if dist.get_world_size(group) == 1:
        return rows[0]
    if dist.get_backend(group) != "gloo":
        out = rows.new_empty(rows.shape[1])
        comm.reduce_scatter_tensor(out, rows.reshape(-1), group=group)
        return out
    # N·L elements split N ways: chunk r is exactly row r.
    return ring_reduce_scatter(rows.view(-1), group, check=False)


def all_gather_rows(row: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``row`` (L,), stacked: (N, L). One ring all-gather, (N-1)/N·n bytes."""
    N = dist.get_world_size(group)
    out = row.new_empty(N * row.numel())
    comm.all_gather_into_tensor(out, row.contiguous(), group=group)
    return out.view(N, -1)


def average_gradients(params, group=None) -> None:
    """Naive data parallel: all-reduce every gradient (flattened into one buffer), divide by N.

    Cost: 2(N-1)·alpha + 2(N-1)/N·n·beta for n bytes of gradients.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


# -- stage 0: the baseline ----------------------------------------------------------------

class NaiveDistributedOptimizer:
    """Stage 0: every rank keeps the full optimizer state and steps every parameter.

    ``step()`` all-reduces the gradients (:func:`average_gradients`), then runs an ordinary
    ``optimizer_class`` over all parameters: N identical copies of the same work and state.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        optimizer_class: e.g. ``torch.optim.Adam``.
        group: the process group (default: the world).
        **defaults: the optimizer's hyperparameters (``lr=...``).
    """

    def __init__(self, params, optimizer_class, group=None, **defaults):
        self.optimizer = optimizer_class(params, **defaults)
        self.group = group

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        loss = None
        if closure is not None:          # the gradients must exist before they are averaged
            with torch.enable_grad():
                loss = closure()
        average_gradients([p for g in self.param_groups for p in g["params"]], self.group)
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


# -- stages 1 and 2 -----------------------------------------------------------------------

def _leaf_view(t: torch.Tensor) -> torch.Tensor:
    # A leaf that shares storage with the parameter: the local optimizer writes the model.
    return t.detach().requires_grad_(True)


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1 (and 2): each rank keeps and steps the optimizer state of its shards only.

    The convention is that of ``torch.distributed.optim.ZeroRedundancyOptimizer``:
    construct it with the model's parameters, the optimizer class and its hyperparameters,
    then call ``zero_grad``/``backward``/``step`` as usual. After ``step()`` every rank holds
    the same updated parameters, equal (to float32 rounding) to what ``optimizer_class`` on
    one process would produce.

    Args:
        params: parameters or parameter groups (dicts with their own hyperparameters).
            Parameters with ``requires_grad=False`` are kept out of the shards; one whose
            gradient is None (on every rank) is skipped by the step, as torch does.
        optimizer_class: an elementwise torch optimizer (SGD, Adam, AdamW, ...).
        group: the process group (default: the world).
        gradients: how ``p.grad`` arrives, so how gradients are communicated:
            ``"averaged"`` (default, as ZeroRedundancyOptimizer): ``p.grad`` already holds the
            average over ranks (from DDP, or :func:`average_gradients`); no gradient traffic.
            ``"reduce_scatter"`` (stage 1 as in the paper): ``p.grad`` is this rank's own
            gradient; ``step()`` reduce-scatters them so each rank gets the average of its
            shards only (written into its slice of ``p.grad``; the rest stays local).
            ``"sharded"`` (stage 2): each gradient is reduce-scattered as soon as backward
            has produced it, only this rank's shard is kept and ``p.grad`` is freed.
        **defaults: the optimizer's hyperparameters (``lr=...``).
    """

    def __init__(self, params, optimizer_class, group=None, *, gradients: str = "averaged",
                 **defaults):
        if gradients not in GRADIENT_MODES:
            raise ValueError(f"gradients={gradients!r} is not supported; use one of "
                             f"{GRADIENT_MODES}")
        super().__init__(params, defaults)
        self.group, self.gradients = group, gradients
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self._params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for p in self._params:
            if not p.is_contiguous():
                raise ValueError(f"ShardedOptimizer needs contiguous parameters; got one of "
                                 f"shape {tuple(p.shape)} with strides {p.stride()}")
        self.layout = ShardLayout([p.shape for p in self._params], self.world_size)
        self._shards = [_leaf_view(self.layout.shard(i, p.data, self.rank))
                        for i, p in enumerate(self._params)]
        index = {id(p): i for i, p in enumerate(self._params)}
        self.optim = optimizer_class(
            [{**_hyper(g), "params": [self._shards[index[id(p)]] for p in g["params"]
                                      if p.requires_grad]} for g in self.param_groups],
            **defaults)
        # Show the full hyperparameters (betas, eps...) on our groups, as torch does.
        for ours, local in zip(self.param_groups, self.optim.param_groups):
            ours.update(_hyper(local))
        self.defaults = self.optim.defaults
        self._consolidated = None
        self._hooks = []
        if gradients == "sharded":
            self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                           for i, p in enumerate(self._params)]

    # -- gradients --------------------------------------------------------------------

    def _make_hook(self, i):
        def reduce_now(p):
            # Stage 2: as soon as p's gradient is complete, keep only this rank's average.
            rows = _rows_of(self.layout, i, p.grad)   # (N, c), a fresh copy
            mine = reduce_scatter(rows, self.group)[: self._shards[i].numel()]
            mine /= self.world_size
            shard = self._shards[i]
            shard.grad = mine.clone() if shard.grad is None else shard.grad.add_(mine)
            p.grad = None   # the full gradient is freed at once
        return reduce_now

    def _gradients_to_shards(self) -> None:
        if self.gradients == "sharded":
            return
        have = [p.grad is not None for p in self._params]
        if self.gradients == "reduce_scatter" and any(have):
            rows = self.layout.pack_rows([p.grad if p.grad is not None else torch.zeros_like(p)
                                          for p in self._params])
            mine = reduce_scatter(rows, self.group) / self.world_size
            for i, p in enumerate(self._params):
                if p.grad is not None:
                    o, n = self.layout.offsets[i], self._shards[i].numel()
                    self.layout.shard(i, p.grad, self.rank).copy_(mine[o:o + n])
        for i, p in enumerate(self._params):
            # A view of this rank's slice of p.grad: no copy.
            self._shards[i].grad = (self.layout.shard(i, p.grad, self.rank) if have[i]
                                    else None)

    # -- the step ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Step this rank's shards with the local optimizer, then all-gather the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for ours, local in zip(self.param_groups, self.optim.param_groups):
            local.update(_hyper(ours))     # an LR scheduler may have changed ours
        self._gradients_to_shards()
        self.optim.step()
        rows = all_gather_rows(self.layout.pack_row(self._shards) if self._shards
                               else torch.zeros(0), self.group)
        self.layout.unpack_rows_into(rows, self._params)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for s in self._shards:
            s.grad = None

    # -- checkpoints: the unsharded torch format, loadable at any world size --------------

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the whole optimizer state on rank ``to`` (every rank must call this).

        One all-gather per kind of per-element state (``exp_avg``, ``exp_avg_sq``...); the
        result, kept on rank ``to``, has the format of ``optimizer_class(...).state_dict()``.
        """
        local = [self.optim.state.get(s, {}) for s in self._shards]
        keys = sorted({k for st in local for k, v in st.items() if torch.is_tensor(v)
                       and v.dim() == 1})
        full = {}
        for k in keys:
            dtype = next(st[k].dtype for st in local if k in st)
            row = self.layout.pack_row([st.get(k, torch.zeros(0, dtype=dtype)) for st in local],
                                       dtype=dtype)
            full[k] = self.layout.unpack_rows(all_gather_rows(row, self.group))
        if self.rank != to:
            self._consolidated = None
            return
        index = {id(p): i for i, p in enumerate(self._params)}
        state, groups, n = {}, [], 0
        for g, local_group in zip(self.param_groups, self.optim.param_groups):
            groups.append({**_hyper(local_group), "params": list(range(n, n + len(g["params"])))})
            for p in g["params"]:
                i = index.get(id(p))
                if i is not None and local[i]:
                    state[n] = {k: (full[k][i].clone() if k in full else _copy(v))
                                for k, v in local[i].items()}
                n += 1
        self._consolidated = {"state": state, "param_groups": groups}

    def state_dict(self) -> dict:
        """The state gathered by :meth:`consolidate_state_dict` (only on its ``to`` rank)."""
        if self._consolidated is None:
            raise RuntimeError(f"rank {self.rank} holds no consolidated state: call "
                               "consolidate_state_dict(to=rank) on every rank first")
        return self._consolidated

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an unsharded torch-format state dict (from any world size); keep our shards."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"state_dict has groups of "
                             f"{[len(g['params']) for g in groups]} parameters; this optimizer "
                             f"has {[len(g['params']) for g in self.param_groups]}")
        index = {id(p): i for i, p in enumerate(self._params)}
        local_index = {id(s): j for j, s in enumerate(s for g in self.optim.param_groups
                                                       for s in g["params"])}
        local_state = {}
        for g, saved in zip(self.param_groups, groups):
            g.update(_hyper(saved))
            for p, key in zip(g["params"], saved["params"]):
                i = index.get(id(p))
                st = state_dict["state"].get(key)
                if i is not None and st:
                    local_state[local_index[id(self._shards[i])]] = {
                        k: (self.layout.shard(i, v, self.rank).clone()
                            if torch.is_tensor(v) and v.dim() >= 1 and v.numel() == p.numel()
                            else _copy(v)) for k, v in st.items()}
        self.optim.load_state_dict({"state": local_state, "param_groups": [
            {**_hyper(g), "params": [local_index[id(s)] for s in local["params"]]}
            for g, local in zip(self.param_groups, self.optim.param_groups)]})


def _rows_of(layout: ShardLayout, i: int, grad: torch.Tensor) -> torch.Tensor:
    N, c, n = layout.world_size, layout.chunks[i], layout.numels[i]
    return F.pad(grad.reshape(-1), (0, N * c - n)).view(N, c)


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _copy(v):
    return v.clone() if torch.is_tensor(v) else v
