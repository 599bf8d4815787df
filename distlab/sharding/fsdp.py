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
is what PyTorch's activation checkpointing does for activations.

Optional mixed precision (Micikevicius et al. 2018): ``compute_dtype=torch.bfloat16``
gathers and computes in bf16 (half the all-gather bytes) while the shards, the gradients'
reduction and the optimizer stay fp32 ("master weights").
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn

from distlab.sharding.zero import ShardLayout, all_gather_rows, reduce_scatter


class _Unit:
    """The parameters gathered and freed together: those of one module (one layer)."""

    def __init__(self, owner: "FullyShardedDataParallel", indices: list[int]):
        self.owner = owner
        self.trainable = [i for i in indices if owner._params_meta[i][2]]
        self.frozen = [i for i in indices if not owner._params_meta[i][2]]
        meta = owner._params_meta
        self.layouts = {kind: ShardLayout([meta[i][1] for i in idx], owner.world_size)
                        for kind, idx in (("trainable", self.trainable), ("frozen", self.frozen))}
        self._backward_cache: dict[str, list] = {}
        self.last_gathered: list = []    # weak references, to check that freeing works

    def indices(self, kind):
        return self.trainable if kind == "trainable" else self.frozen

    def all_gather(self, kind: str) -> list[torch.Tensor]:
        """The full parameters of this unit (no autograd): one all-gather."""
        fsdp = self.owner
        shards = [fsdp.shards[i] for i in self.indices(kind)]
        if not shards:
            return []
        row = self.layouts[kind].pack_row([s.detach() for s in shards],
                                          dtype=fsdp.compute_dtype or shards[0].dtype)
        return self.layouts[kind].unpack_rows(all_gather_rows(row, fsdp.group))

    def gather(self) -> None:
        """Before the unit's forward: gather its parameters and put them in its modules."""
        fsdp = self.owner
        fulls = {}
        if self.trainable:
            out = _AllGather.apply(self, *[fsdp.shards[i] for i in self.trainable])
            fulls.update(zip(self.trainable, out))
        with torch.no_grad():
            fulls.update(zip(self.frozen, self.all_gather("frozen")))
        for kind in ("trainable", "frozen"):
            for j, i in enumerate(self.indices(kind)):
                # Remember the storage, so the pack hook knows this tensor is a parameter.
                fsdp._gathered[fulls[i].untyped_storage().data_ptr()] = (self, kind, j)
                for module, name in fsdp._owners[i]:
                    setattr(module, name, fulls[i])
        self.last_gathered = [weakref.ref(t) for t in fulls.values()]

    def release(self) -> None:
        """After the unit's forward: drop every reference to the full parameters."""
        fsdp = self.owner
        for kind in ("trainable", "frozen"):
            for i in self.indices(kind):
                for module, name in fsdp._owners[i]:
                    full = getattr(module, name)
                    if full is not None:
                        fsdp._gathered.pop(full.untyped_storage().data_ptr(), None)
                    setattr(module, name, None)

    def full_for_backward(self, kind: str) -> list[torch.Tensor]:
        """Backward needs the parameters again: gather once per backward pass."""
        if kind not in self._backward_cache:
            self._backward_cache[kind] = self.all_gather(kind)
            self.owner._clear_at_end_of_backward()
        return self._backward_cache[kind]

    def drop_backward_cache(self, kind: str | None = None) -> None:
        if kind is None:
            self._backward_cache.clear()
        else:
            self._backward_cache.pop(kind, None)


class _AllGather(torch.autograd.Function):
    """Forward: all-gather the unit's shards. Backward: reduce-scatter the gradients."""

    @staticmethod
    def forward(ctx, unit: _Unit, *shards):
        ctx.unit = unit
        return tuple(unit.all_gather("trainable"))

    @staticmethod
    def backward(ctx, *grads):
        unit = ctx.unit
        fsdp, layout = unit.owner, unit.layouts["trainable"]
        unit.drop_backward_cache("trainable")     # every user of them has run by now
        fulls = [torch.zeros(s, dtype=torch.float32) if g is None else g
                 for g, s in zip(grads, layout.shapes)]
        # Reduce in fp32 whatever the compute dtype: the sum of N bf16 numbers loses bits.
        rows = layout.pack_rows(fulls, dtype=torch.float32)
        mine = reduce_scatter(rows, fsdp.group) / fsdp.world_size
        out = []
        for j, i in enumerate(unit.trainable):
            o = layout.offsets[j]
            out.append(mine[o:o + fsdp.shards[i].numel()])
        return (None, *out)


class _ParamRef:
    """What autograd keeps instead of a gathered parameter (or a view of one)."""
    __slots__ = ("unit", "kind", "j", "size", "stride", "offset")

    def __init__(self, unit, kind, j, t):
        self.unit, self.kind, self.j = unit, kind, j
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


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
    """

    def __init__(self, module: nn.Module, group=None, *, unit_types=None, compute_dtype=None):
        super().__init__()
        self.module, self.group, self.compute_dtype = module, group, compute_dtype
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
        self._params_meta = [(n, p.shape, p.requires_grad) for n, p in named]
        units: dict[nn.Module, list[int]] = {module: []}
        for i in range(len(named)):
            owners = self._owners[i]
            unit = module if len({id(m) for m, _ in owners}) > 1 else self._unit_module(
                owners[0][0], parent, unit_types) or module
            units.setdefault(unit, []).append(i)
        layout = ShardLayout([p.shape for _, p in named], self.world_size)
        self.shards = nn.ParameterList(
            [nn.Parameter(layout.shard(i, p.detach(), self.rank).clone(),
                          requires_grad=p.requires_grad) for i, (_, p) in enumerate(named)])
        self._layout = layout
        for i in range(len(named)):                           # free the full parameters
            for m, pname in self._owners[i]:
                del m._parameters[pname]
                setattr(m, pname, None)
        self._gathered: dict[int, tuple] = {}
        self._callback_queued = False
        self.units = {m: _Unit(self, idx) for m, idx in units.items()}
        self._root_unit = self.units[module]
        for m, unit in self.units.items():
            if m is not module:
                m.register_forward_pre_hook(lambda mod, args, u=unit: u.gather())
                m.register_forward_hook(lambda mod, args, out, u=unit: u.release())

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
        return t if hit is None else _ParamRef(*hit, t)

    def _unpack(self, saved):
        if not isinstance(saved, _ParamRef):
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
        """The unsharded fp32 ``state_dict`` of the wrapped module, on every rank.

        One all-gather (every rank must call it). Tied weights appear under every name,
        as in ``module.state_dict()``.
        """
        row = self._layout.pack_row([s.detach() for s in self.shards], dtype=torch.float32)
        fulls = self._layout.unpack_rows(all_gather_rows(row, self.group))
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
            row = self._layout.pack_row(mine, dtype=torch.float32)
            fulls = self._layout.unpack_rows(all_gather_rows(row, self.group))
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
