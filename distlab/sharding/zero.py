"""ZeRO stages 0 to 2: all-reduce, then shard the optimizer state, then the gradients.

Data-parallel training with Adam keeps, on *every* rank, the parameters, their gradients
and Adam's two moments: with Ψ fp32 parameters that is 4Ψ + 4Ψ + 8Ψ = 16Ψ bytes per rank,
however many ranks there are. ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", section 5 and Figure 1) removes the redundancy:

============  ===============================  =====================  ==========================
stage         each rank keeps                  bytes per rank (fp32)  communication per step
============  ===============================  =====================  ==========================
0 (naive)     everything                       (4 + 4 + K)Ψ           all-reduce grads: 2Ψ
1  P_os       1/N of the optimizer state       (4 + 4 + K/N)Ψ         reduce-scatter grads Ψ +
                                                                      all-gather params Ψ = 2Ψ
2  P_os+g     ... and 1/N of the gradients     (4 + (4 + K)/N)Ψ       the same 2Ψ
3  P_os+g+p   ... and 1/N of the parameters    (4 + 4 + K)Ψ/N         3Ψ, see :mod:`distlab.sharding.fsdp`
============  ===============================  =====================  ==========================

K is the optimizer's state in bytes per parameter (Adam: m and v, K = 8; SGD with momentum:
K = 4). Volumes are per rank, times (N-1)/N; in the alpha-beta model a ring reduce-scatter
or all-gather of n bytes costs (N-1)·alpha + (N-1)/N·n·beta, an all-reduce twice that. So
stages 1 and 2 cost what data parallelism costs (section 7.2.1), and save memory for free.

How the shards are cut (:mod:`distlab.sharding.layout`): stage 1 moves the parameters into
one flat buffer, rank r owning slice r (DeepSpeed's layout), so one all-gather into it *is*
the update; stage 2 gives rank r chunk r of *every* parameter (FSDP2's), so each gradient is
reduce-scattered alone as backward makes it. A rank's optimizer is an ordinary
``torch.optim`` one over its shards, views of the parameters: Adam, AdamW or SGD (any
*elementwise* optimizer) gives bit for bit the update it would give the whole tensor, and
an all-gather hands every rank the shards it did not step.

Ranks whose forward used different parameters (a data-dependent branch, routed experts)
must still meet in the same collectives: as in
:func:`distlab.data_parallel.ddp.average_gradients`, a gradient that is None on a rank
counts as zeros, and every rank communicates the parameters in one fixed order (parameter
order; stage 2 the reverse, roughly the order backward produces them), grouped by device
and dtype, whatever order its own backward ran in.

Mixed precision (section 3.1's "2 + 2 + K"): give 16-bit parameters and
``master_weights=True``. Each rank then keeps fp32 master weights of its shards only (K =
4 + 4 + 4 with Adam, all of it divided by N), the gradients are reduce-scattered and the
parameters all-gathered in 16 bits (half the bytes), and the step refreshes the 16-bit
shards from the masters. With fp16, scale the loss and step through the scaler:
``scaler.step(opt, opt.reduce_gradients(), group)``
(``distlab.precision.loss_scaling.DynamicLossScaler``): each rank checks its own
shards, so the overflow flag is agreed by an all-reduce MAX.

All communication goes through :mod:`distlab.comm`, so every byte is counted.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distlab.data_parallel.ddp import average_gradients, grad_or_zeros
from distlab.precision.mixed import gradients_to_masters, masters_to_params
from distlab.precision.mixed import master_weights as master_weights_of
from distlab.sharding import layout as L, zero_checkpoint
from distlab.sharding.zero_checkpoint import _hyper

GRADIENT_MODES = ("averaged", "reduce_scatter", "sharded")
STAGES = (0, 1, 2, 3)
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"momentum": 0.9}), "adam": (torch.optim.Adam, {}),
              "adamw": (torch.optim.AdamW, {"weight_decay": 0.01})}


# -- stage 0: the baseline ----------------------------------------------------------------

class NaiveDistributedOptimizer:
    """Stage 0: every rank keeps the full optimizer state and steps every parameter.

    ``step()`` averages the gradients with distlab's one averaging,
    :func:`distlab.data_parallel.ddp.average_gradients` (one all-reduce per dtype, a missing
    gradient counting as zeros), then runs an ordinary ``optimizer_class`` over all
    parameters: N identical copies of the same work and state. Cost per step:
    2(N-1)·alpha + 2(N-1)/N·n·beta for n bytes of gradients.

    Args:
        params: parameters or parameter groups, as for any torch optimizer (not empty).
        optimizer_class: e.g. ``torch.optim.Adam``.
        group: the process group (default: the world).
        **defaults: the optimizer's hyperparameters (``lr=...``).
    """

    def __init__(self, params, optimizer_class, group=None, **defaults):
        self.optimizer = optimizer_class(_not_empty(params, type(self).__name__), **defaults)
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

class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1 (and 2): each rank keeps and steps the optimizer state of its shards only.

    The convention is that of ``torch.distributed.optim.ZeroRedundancyOptimizer``:
    construct it with the model's parameters, the optimizer class and its hyperparameters,
    then call ``zero_grad``/``backward``/``step`` as usual. After ``step()`` every rank holds
    the same updated parameters, equal (to rounding) to what ``optimizer_class`` on one
    process would produce.

    Args:
        params: parameters or parameter groups (dicts with their own hyperparameters), not
            empty. Parameters with ``requires_grad=False`` are kept out of the shards; at
            stage 1 the others move into one flat buffer per dtype (``.data`` views of it).
        optimizer_class: an elementwise torch optimizer (SGD, Adam, AdamW, ...).
        group: the process group (default: the world).
        gradients: how ``p.grad`` arrives, so how gradients are communicated:
            ``"averaged"`` (default, as ZeroRedundancyOptimizer): ``p.grad`` already holds the
            average over ranks (from DDP, or :func:`~distlab.data_parallel.ddp.average_gradients`);
            no gradient traffic, and a None gradient is skipped by the step, as torch does.
            ``"reduce_scatter"`` (stage 1 as in the paper): ``p.grad`` is this rank's own
            gradient; ``step()`` reduce-scatters them so each rank gets the average of its
            shards only (written into its slice of ``p.grad``; the rest stays local).
            ``"sharded"`` (stage 2): each gradient is reduce-scattered as soon as backward
            has produced it and every one before it in the fixed order; only this rank's
            shard is kept and ``p.grad`` is freed. Every rank must run the same number of
            backward passes per step, each reaching at least one of these parameters (the
            rest are sent as zeros when that backward ends). In both these modes a
            gradient that is None on a rank counts as zeros (so a parameter no rank used
            is still stepped, with a zero gradient, as under
            :func:`~distlab.data_parallel.ddp.average_gradients`).
        master_weights: step fp32 copies of this rank's shards (for 16-bit parameters:
            the masters are the only fp32 copy; the 16-bit shards are refreshed from them
            after each step). They are copied from the parameters here: load the model's
            weights before building the optimizer.
        **defaults: the optimizer's hyperparameters (``lr=...``).
    """

    def __init__(self, params, optimizer_class, group=None, *, gradients: str = "averaged",
                 master_weights: bool = False, **defaults):
        if gradients not in GRADIENT_MODES:
            raise ValueError(f"gradients={gradients!r} is not supported; use one of "
                             f"{GRADIENT_MODES}")
        super().__init__(_not_empty(params, type(self).__name__), defaults)
        self._params = list({id(p): p for g in self.param_groups for p in g["params"]
                             if p.requires_grad}.values())
        for p in self._params:
            if not p.is_contiguous():
                raise ValueError(f"ShardedOptimizer needs contiguous parameters; got one of "
                                 f"shape {tuple(p.shape)} with strides {p.stride()}: pass "
                                 "p.contiguous() parameters (or use NaiveDistributedOptimizer)")
        if not isinstance(master_weights, bool):
            raise ValueError(f"master_weights={master_weights!r} is out of range; allowed "
                             "True or False")
        self.group, self.gradients, self.master_weights = group, gradients, master_weights
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        # One layout per (device, dtype): a float64 parameter travels as float64.
        kinds: dict[tuple, list[int]] = {}
        for i, p in enumerate(self._params):
            kinds.setdefault((p.device, p.dtype), []).append(i)
        # Stage 2 reduce-scatters each gradient alone; stage 1's parameters live in a buffer.
        layout_class = L.ShardLayout if gradients == "sharded" else L.FlatLayout
        self._buckets = [(idx, layout_class([self._params[i].shape for i in idx],
                                            self.world_size)) for idx in kinds.values()]
        self._flat = [layout.adopt([self._params[i] for i in idx])
                      if layout_class is L.FlatLayout else None for idx, layout in self._buckets]
        self._place = {i: (layout, j) for idx, layout in self._buckets
                       for j, i in enumerate(idx)}
        # Leaves sharing the parameters' storage: the local optimizer writes the model.
        self._shards = [self._shard(i, p.data).detach().requires_grad_(True)
                        for i, p in enumerate(self._params)]
        # What the local optimizer steps: the shards themselves, or their fp32 masters.
        self.master_params = master_weights_of(self._shards) if master_weights else self._shards
        self._reduced = False
        self.optim = local_optimizer(self, self._params, self.master_params, optimizer_class,
                                     defaults)
        self.defaults = self.optim.defaults
        self._consolidated = None
        self._hooks = []
        if gradients == "sharded":
            self._order = list(reversed(range(len(self._params))))   # ~ backward's order
            self._reset_backward()
            self._hooks = [p.register_post_accumulate_grad_hook(
                lambda p, i=i: self._on_grad_ready(i)) for i, p in enumerate(self._params)]

    @property
    def shards(self) -> list[torch.Tensor]:
        """This rank's shard of every parameter (views of them), with its gradient's shard."""
        return self._shards

    def _shard(self, i: int, full: torch.Tensor) -> torch.Tensor:
        layout, j = self._place[i]
        return layout.shard(j, full, self.rank)

    # -- gradients --------------------------------------------------------------------

    def _reset_backward(self) -> None:
        self._ready = [False] * len(self._params)
        self._next = 0                  # position in self._order of the next reduce-scatter
        self._end_queued = False

    def _on_grad_ready(self, i: int) -> None:
        # Stage 2. Reduce-scatter in the fixed order only: gloo pairs collectives by the
        # order they are issued, and another rank's backward may run in another order.
        self._ready[i] = True
        if not self._end_queued:
            self._end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        while self._next < len(self._order) and self._ready[self._order[self._next]]:
            self._reduce_scatter_one(self._order[self._next])
            self._next += 1

    def _end_of_backward(self) -> None:
        # The parameters this rank's backward did not reach: zeros, so every rank joins.
        for i in self._order[self._next:]:
            self._reduce_scatter_one(i)
        self._reset_backward()

    def _reduce_scatter_one(self, i: int) -> None:
        p, shard = self._params[i], self._shards[i]
        layout, j = self._place[i]
        rows = layout.rows(j, p.grad if p.grad is not None else torch.zeros_like(p))  # (N, c)
        mine = L.reduce_scatter(rows, self.group)[: shard.numel()] / self.world_size
        shard.grad = mine if shard.grad is None else shard.grad.add_(mine)
        p.grad = None   # the full gradient is freed at once

    def _gradients_to_shards(self) -> None:
        if self.gradients == "sharded":
            return
        if self.gradients == "reduce_scatter":
            for idx, layout in self._buckets:
                grads = [grad_or_zeros(self._params[i]) for i in idx]   # unused: zeros, joins
                mine = L.reduce_scatter(layout.pack_rows(grads), self.group)
                mine /= self.world_size
                for j, i in enumerate(idx):
                    o, n = layout.row_offset(j, self.rank), self._shards[i].numel()
                    layout.shard(j, grads[j], self.rank).copy_(mine[o:o + n])
        for i, p in enumerate(self._params):
            # A view of this rank's slice of p.grad: no copy.
            self._shards[i].grad = None if p.grad is None else self._shard(i, p.grad)

    # -- the step ---------------------------------------------------------------------

    @torch.no_grad()
    def reduce_gradients(self) -> list[torch.Tensor]:
        """Bring this step's gradients to this rank's shards (once per step; ``step`` calls
        it too) and return the tensors the local optimizer will step, their ``.grad`` set:
        what a loss scaler unscales and checks before ``step``."""
        if not self._reduced:
            self._gradients_to_shards()
            if self.master_weights:   # fp32 gradients for the masters, during the step only
                gradients_to_masters(self._shards, self.master_params)
            self._reduced = True
        return self.master_params

    @torch.no_grad()
    def step(self, closure=None):
        """Step this rank's shards with the local optimizer, then all-gather the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_shards_alias_params()
        copy_hyperparameters(self.optim.param_groups, self.param_groups)   # LR schedulers
        self.reduce_gradients()
        self.optim.step()
        self._reduced = False
        if self.master_weights:        # the 16-bit shards, rounded from their masters
            masters_to_params(self._shards, self.master_params)
        for (idx, layout), flat in zip(self._buckets, self._flat):
            if flat is not None:     # the parameters live in it: the gather is the update
                L.all_gather_rows(flat[self.rank], self.group, out=flat)
            else:                    # this rank's row is packed into the output, not unpacked
                rows = L.all_gather_shards(layout, [self._shards[i] for i in idx], self.group)
                layout.unpack_rows_into(rows, [self._params[i] for i in idx], skip=self.rank)
        return loss

    def _check_shards_alias_params(self) -> None:
        # The all-gather leaves this rank's own row out of the parameters because the
        # shards are views of them; ``p.data = ...`` after construction breaks that.
        for p, s in zip(self._params, self._shards):
            if s.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                raise RuntimeError(f"a parameter of shape {tuple(p.shape)} no longer holds "
                                   "this rank's shard (its .data was replaced after the "
                                   "ShardedOptimizer was built, e.g. by model.to(device)): "
                                   "build the optimizer after moving or casting the model")

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._reduced = False
        for s, m in zip(self._shards, self.master_params):
            s.grad = m.grad = None

    # -- checkpoints: the unsharded torch format, loadable at any world size --------------

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the whole optimizer state on rank ``to`` (every rank must call this).

        One all-gather per kind of per-element state (``exp_avg``, ``exp_avg_sq``...); the
        result, kept on rank ``to``, has the format of ``optimizer_class(...).state_dict()``
        (``distlab.sharding.zero_checkpoint``). With ``master_weights`` the masters are
        not in it (the model's own checkpoint holds their 16-bit rounding).
        """
        self._consolidated = zero_checkpoint.consolidate(self, to)

    def state_dict(self) -> dict:
        """The state gathered by :meth:`consolidate_state_dict` (only on its ``to`` rank)."""
        if self._consolidated is None:
            raise RuntimeError(f"rank {self.rank} holds no consolidated state: call "
                               "consolidate_state_dict(to=rank) on every rank first")
        return self._consolidated

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an unsharded torch-format state dict (from any world size); keep our shards."""
        zero_checkpoint.load(self, state_dict)


def local_optimizer(wrapper, params, stepped, optimizer_class, defaults):
    """The torch optimizer a wrapper optimizer (ZeRO's, or FSDP's fp32 masters) delegates
    to: ``stepped[i]`` (a shard, or its master) stands for ``params[i]`` in the wrapper's
    groups, frozen parameters left out; the wrapper's groups then show its full
    hyperparameters (betas, eps...), as torch's own optimizers do."""
    index = {id(p): i for i, p in enumerate(params)}
    optim = optimizer_class(
        [{**_hyper(g), "params": [stepped[index[id(p)]] for p in g["params"]
                                  if p.requires_grad]} for g in wrapper.param_groups],
        **defaults)
    copy_hyperparameters(wrapper.param_groups, optim.param_groups)
    return optim


def copy_hyperparameters(to_groups, from_groups) -> None:
    """Each group's hyperparameters (not its parameters) from the matching group."""
    for to, source in zip(to_groups, from_groups):
        to.update(_hyper(source))


def _not_empty(params, who: str) -> list:
    params = list(params)
    if not params:
        raise ValueError(f"{who} got an empty parameter list: there is nothing to shard or "
                         "step; pass the model's parameters (model.parameters()), or leave "
                         "a model without parameters out of the optimizer")
    return params
