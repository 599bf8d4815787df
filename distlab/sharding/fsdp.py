"""ZeRO stage 3, fully sharded data parallel: parameters, gradients and state, all sharded.

Stage 3 of ZeRO (Rajbhandari et al. 2020, section 5.3, "P_os+g+p") also shards the
parameters: each rank keeps 1/N of every parameter. A layer's full parameters exist only
while that layer computes: they are all-gathered just before its forward, freed just after,
all-gathered again when backward reaches the layer, and its gradients are reduce-scattered
so each rank keeps the average of its own shard. PyTorch calls this FSDP (Zhao et al. 2023,
"PyTorch FSDP", VLDB, section 3); its FSDP2 ``fully_shard`` shards each parameter as here.

Memory per rank drops to (4 + 4 + K)Ψ/N bytes, plus the full parameters of the one layer
being computed. The price is one more all-gather per step: in the alpha-beta model, with
U units (layers) and n bytes of parameters,

    forward all-gathers  U·(N-1)·alpha + (N-1)/N·n·beta
    backward all-gathers U·(N-1)·alpha + (N-1)/N·n·beta
    reduce-scatters      U·(N-1)·alpha + (N-1)/N·n·beta     (3Ψ in all: 1.5x data parallel)

How the freeing works here: the gathered parameters are plain tensors that autograd would
keep alive for backward (``Linear`` saves its weight to compute the input's gradient). A
``saved_tensors_hooks`` context swaps every saved tensor that lives in a gathered
parameter for a small reference, and gathers the unit again when backward unpacks it, which
is what PyTorch's activation checkpointing does for activations. The unit counts the
references it handed out: at the last unpack it lets the gathered tensors go, so a frozen
layer (which has no gradient to reduce-scatter, and so no other signal that backward is done
with it) is freed as soon as its backward has run, not at the end of backward.

Activation checkpointing (:func:`distlab.memory.recompute.with_recompute`) works with the
default units: the recomputed forward gathers each layer again through its hook, and the
layer is released even when torch's checkpoint stops that forward by raising, as soon as
backward has what it needs (else a later activation, allocated where the freed parameter
was, would pass for it on one rank only: an all-gather the other ranks never issue).

Every rank must gather the same units in the same order, since gloo pairs collectives by
the order they are issued. A forward whose path depends on the rank's data (a branch,
routing to experts) breaks that when the branches are separate units; each all-gather
carries the unit's tag, so that case is refused with an error, and the cure is to make the
module holding every branch one unit (``unit_types``). The other cases (tied weights,
frozen layers, buffers, which stay whole on every rank and are not synchronized, float64,
bfloat16) are tested in ``tests/sharding/test_hard_cases.py``.

Optional mixed precision (Micikevicius et al. 2018), two ways:

* ``compute_dtype=torch.bfloat16`` gathers and computes in bf16 (half the all-gather bytes)
  while the shards, the gradients' reduction and the optimizer stay fp32: the shards are
  their own master weights, (4 + 4 + K)Ψ/N bytes per rank.
* ``param_dtype=torch.bfloat16`` (or ``torch.float16``) keeps 16-bit shards: the all-gathers
  *and* the gradients' reduce-scatter move 16-bit numbers (half the bytes of each of the
  three collectives above), and the fp32 master weights are sharded with the optimizer state
  (:class:`distlab.sharding.fsdp_mixed.MasterWeightOptimizer`): the paper's "2 + 2 + K",
  (2 + 2 + 12)Ψ/N bytes per rank with Adam (ZeRO section 3.1), as ZeRO's mixed path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distlab.sharding.fsdp_units import ParamRef, Unit, refuse_units_around_recomputation
from distlab.sharding.layout import ShardLayout, all_gather_rows

PARAM_DTYPES = (torch.bfloat16, torch.float16)
"""The dtypes of 16-bit shards (``param_dtype``)."""


class FullyShardedDataParallel(nn.Module):
    """Shard ``module``'s parameters across the group's ranks; gather them layer by layer.

    Wrap the model, then give ``wrapper.parameters()`` (this rank's shards, one per original
    parameter, in ``module.named_parameters()`` order) to any torch optimizer: its state is
    then sharded too. Gradients of the shards are averaged over ranks, as in DDP.

    Args:
        module: the model, built identically on every rank (same seed).
        group: the process group (default: the world).
        unit_types: module classes whose instances are gathered as one unit (say, your
            ``Block``). By default every module that directly owns parameters is a unit
            (each Linear, Embedding, LayerNorm, or custom layer). Parameters shared by
            several modules (tied weights), and the root module's own, form the root unit,
            gathered for the whole forward. A parameter must be used inside the forward
            of its unit: outside it, the attribute is None.
        compute_dtype: e.g. ``torch.bfloat16``: gather and compute in that dtype, keep fp32
            shards ("master weights"); floating inputs are cast to it, outputs back to fp32.
        param_dtype: ``torch.bfloat16`` or ``torch.float16``: the shards themselves are that
            dtype (the floating parameters are cast; buffers keep theirs), gathered, computed
            and reduce-scattered in it; inputs and outputs are cast as for ``compute_dtype``.
            Step the shards with :class:`~distlab.sharding.fsdp_mixed.MasterWeightOptimizer`
            (fp32 masters of this rank's shards; fp16 with a loss scaler).

    Refused at construction: a unit whose parameters have different dtypes (one all-gather
    carries one dtype), an unknown ``compute_dtype``, a ``param_dtype`` other than bf16 and
    fp16, both of them at once, a unit gathered outside the
    activation-checkpointed forward that uses it (:func:`distlab.memory.recompute.with_recompute`
    around a ``unit_types`` module or one of its parts: the recomputation would find it freed).
    """

    def __init__(self, module: nn.Module, group=None, *, unit_types=None, compute_dtype=None,
                 param_dtype=None):
        super().__init__()
        if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype)
                                              and compute_dtype.is_floating_point):
            raise ValueError(f"compute_dtype={compute_dtype!r} is not supported; allowed None "
                             "or a floating torch dtype (torch.bfloat16, torch.float16...)")
        if param_dtype is not None and param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype={param_dtype!r} is not supported; allowed None, "
                             "torch.bfloat16 or torch.float16 (16-bit shards, stepped through "
                             "fp32 master weights)")
        if param_dtype is not None and compute_dtype is not None:
            raise ValueError(f"compute_dtype={compute_dtype!r} with param_dtype={param_dtype!r}:"
                             " give one; 16-bit shards are gathered and computed in their own "
                             "dtype (compute_dtype is for fp32 shards)")
        # 16-bit shards compute in their dtype: inputs and outputs are cast as for compute_dtype.
        self.module, self.group, self.param_dtype = module, group, param_dtype
        self.compute_dtype = compute_dtype or param_dtype
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        named = list(module.named_parameters())             # tied weights once
        self.param_names = [n for n, _ in named]
        self._owners = {i: [] for i in range(len(named))}   # i -> [(module, attribute)]
        index = {id(p): i for i, (_, p) in enumerate(named)}
        parent = {}
        for mname, m in module.named_modules():
            for cname, c in m.named_children():
                parent[c] = m
            for pname, p in m.named_parameters(recurse=False):
                self._owners[index[id(p)]].append((m, pname))
        self._params_meta = [(n, p.shape, p.requires_grad, self._shard_dtype(p))
                             for n, p in named]
        units: dict[nn.Module, list[int]] = {module: []}
        for i in range(len(named)):
            owners = self._owners[i]
            unit = module if len({id(m) for m, _ in owners}) > 1 else self._unit_module(
                owners[0][0], parent, unit_types) or module
            units.setdefault(unit, []).append(i)
        layout = ShardLayout([p.shape for _, p in named], self.world_size)
        self.shards = nn.ParameterList(
            [nn.Parameter(layout.shard(i, p.detach(), self.rank).to(self._shard_dtype(p),
                                                                      copy=True),
                          requires_grad=p.requires_grad) for i, (_, p) in enumerate(named)])
        self._layout = layout
        for i in range(len(named)):                           # free the full parameters
            for m, pname in self._owners[i]:
                del m._parameters[pname]
                setattr(m, pname, None)
        self._gathered: dict[int, tuple] = {}
        self._callback_queued = False
        names = {m: n or "(root)" for n, m in module.named_modules()}
        self.units = {m: Unit(self, idx, k, names[m]) for k, (m, idx) in enumerate(units.items())}
        self._root_unit = self.units[module]
        refuse_units_around_recomputation(self, parent)
        for m, unit in self.units.items():
            if m is not module:
                m.register_forward_pre_hook(lambda mod, args, u=unit: u.gather())
                # always_call: also when the forward raises, as activation checkpointing's
                # recomputation does to stop once backward has all it needs (else a stale
                # address would make a later activation pass for this unit's parameter).
                m.register_forward_hook(lambda mod, args, out, u=unit: u.release(),
                                        always_call=True)

    def _shard_dtype(self, p: torch.Tensor) -> torch.dtype:
        return self.param_dtype if self.param_dtype and p.is_floating_point() else p.dtype

    @staticmethod
    def _unit_module(m, parent, unit_types):
        if unit_types is None:
            return m
        while m is not None and not isinstance(m, tuple(unit_types)):
            m = parent.get(m)
        return m

    # -- forward and the saved-tensor hooks -----------------------------------------------

    def forward(self, *args, **kwargs):
        if self.compute_dtype is not None:
            args, kwargs = _cast((args, kwargs), self.compute_dtype)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            self._root_unit.gather()
            try:
                out = self.module(*args, **kwargs)
            finally:
                self._root_unit.release()
        return out if self.compute_dtype is None else _cast(out, torch.float32)

    def _pack(self, t: torch.Tensor):
        hit = self._gathered.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided \
            else None
        if hit is None:
            return t
        hit[0].saved(hit[1])
        return ParamRef(*hit, t)

    def _unpack(self, saved):
        if not isinstance(saved, ParamRef):
            return saved
        full = saved.unit.full_for_backward(saved.kind)[saved.j]
        return full.as_strided(saved.size, saved.stride, saved.offset)

    def _clear_at_end_of_backward(self) -> None:
        # Frozen parameters have no gradient to tell us when backward is done with them.
        if self._callback_queued:
            return
        self._callback_queued = True

        def clear():
            for unit in self.units.values():
                unit.drop_backward_cache()
            self._callback_queued = False
        torch.autograd.Variable._execution_engine.queue_callback(clear)

    # -- full parameters, for evaluation and checkpoints ----------------------------------

    def shards_by_name(self) -> dict[str, nn.Parameter]:
        """``{original parameter name: this rank's shard}``, to build parameter groups."""
        return dict(zip(self.param_names, self.shards))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded ``state_dict`` of the wrapped module (the shards' dtype), on every rank.

        One all-gather per dtype (every rank must call it). Tied weights appear under every
        name, as in ``module.state_dict()``.
        """
        fulls = self._all_gather_full(list(self.shards))
        out = {}
        for i, full in enumerate(fulls):
            for m, pname in self._owners[i]:
                prefix = next(n for n, mm in self.module.named_modules() if mm is m)
                out[f"{prefix}.{pname}" if prefix else pname] = full
        for name, b in self.module.named_buffers():
            out[name] = b.detach().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Take this rank's shards from an unsharded ``state_dict`` (any world size)."""
        for i, name in enumerate(self.param_names):
            self.shards[i].copy_(self._layout.shard(i, state_dict[name], self.rank))
        for name, b in self.module.named_buffers():
            b.copy_(state_dict[name])

    def _all_gather_full(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        # shards[i]: this rank's shard of (a state of) parameter i; one all-gather per dtype.
        fulls: list = [None] * len(shards)
        kinds: dict[torch.dtype, list[int]] = {}
        for i, s in enumerate(shards):
            kinds.setdefault(s.dtype, []).append(i)
        for idx in kinds.values():
            layout = ShardLayout([self._layout.shapes[i] for i in idx], self.world_size)
            row = layout.pack_row([shards[i].detach() for i in idx])
            fulls_of_kind = layout.unpack_rows(all_gather_rows(row, self.group))
            for i, full in zip(idx, fulls_of_kind):
                fulls[i] = full
        return fulls

    def _positions(self, optimizer) -> list[int]:
        # The optimizer's k-th parameter is the shard of original parameter positions[k].
        index = {id(s): i for i, s in enumerate(self.shards)}
        return [index[id(p)] for g in optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def full_optim_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` with every per-element state (``exp_avg``...) unsharded.

        The result has the format of the same optimizer built over the full parameters, in
        the same order, so it loads on any world size. One all-gather per kind of state.
        """
        sd = optimizer.state_dict()
        where = self._positions(optimizer)
        state = {k: dict(st) for k, st in sd["state"].items()}   # leave the live state alone
        keys = sorted({key for st in state.values() for key, v in st.items()
                       if torch.is_tensor(v) and v.dim() == 1})
        for key in keys:
            mine = [s.detach().new_zeros(s.numel()) for s in self.shards]
            for k, st in state.items():
                if key in st:
                    mine[where[k]] = st[key]
            fulls = self._all_gather_full(mine)
            for k, st in state.items():
                if key in st:
                    st[key] = fulls[where[k]]
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_full_optim_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict):
        """Load a :meth:`full_optim_state_dict` (from any world size): keep our shards."""
        where = self._positions(optimizer)
        state = {}
        for k, st in state_dict["state"].items():
            i = where[int(k)]
            state[k] = {key: (self._layout.shard(i, v, self.rank).clone()
                              if torch.is_tensor(v) and v.dim() >= 1
                              and v.numel() == self._layout.numels[i] else v)
                        for key, v in st.items()}
        optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def _cast(obj, dtype):
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj
