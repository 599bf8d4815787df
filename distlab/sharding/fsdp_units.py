"""The units of :class:`~distlab.sharding.fsdp.FullyShardedDataParallel`: gathered, freed,
gathered again for backward, their gradients reduce-scattered.

A unit is the parameters of one module (one layer, or one ``unit_types`` block), split in
two kinds: trainable ones, gathered through :class:`AllGather` so that backward
reduce-scatters their gradients, and frozen ones, gathered without autograd. Autograd keeps
a :class:`ParamRef` instead of a gathered parameter; backward's first unpack gathers the
unit again, and the last unpack lets it go (:meth:`Unit.full_for_backward`).

Every all-gather carries one more element, the unit's tag, so ranks whose forwards called
different layers are refused (:func:`refuse_rank_dependent_forward`) instead of being paired
silently by gloo.
"""
from __future__ import annotations

import weakref

import torch

from distlab.sharding.layout import ShardLayout, all_gather_rows, reduce_scatter


class Unit:
    """The parameters gathered and freed together: those of one module (one layer)."""

    def __init__(self, owner, indices: list[int], tag: int, name: str):
        # owner: the FullyShardedDataParallel; tag: this unit's number; name: its module's.
        self.owner, self.tag, self.name = owner, tag, name
        self.trainable = [i for i in indices if owner._params_meta[i][2]]
        self.frozen = [i for i in indices if not owner._params_meta[i][2]]
        meta = owner._params_meta
        dtypes = sorted({str(meta[i][3]) for i in indices})
        if len(dtypes) > 1:
            raise ValueError(f"FullyShardedDataParallel: unit {name!r} mixes parameters of "
                             f"dtypes {dtypes}, which one all-gather cannot carry; convert "
                             "the model to one dtype (model.to(dtype)), or pick unit_types "
                             "that keep each dtype in its own units")
        self.layouts = {kind: ShardLayout([meta[i][1] for i in idx], owner.world_size)
                        for kind, idx in (("trainable", self.trainable), ("frozen", self.frozen))}
        self._backward_cache: dict[str, list] = {}
        self._saved = {"trainable": 0, "frozen": 0}   # references autograd holds, by kind
        self.last_gathered: list = []    # weak references, to check that freeing works
        self.last_gathered_for_backward: list = []

    def indices(self, kind):
        return self.trainable if kind == "trainable" else self.frozen

    def all_gather(self, kind: str) -> list[torch.Tensor]:
        """The full parameters of this unit (no autograd): one all-gather."""
        fsdp = self.owner
        shards = [fsdp.shards[i] for i in self.indices(kind)]
        if not shards:
            return []
        layout = self.layouts[kind]
        row = layout.pack_row([s.detach() for s in shards],
                              dtype=fsdp.compute_dtype or shards[0].dtype)
        # One more element names the unit: ranks whose forwards called different layers
        # would otherwise be paired by gloo, silently, whenever the shapes agree.
        tag = _tag(self, kind)
        rows = all_gather_rows(torch.cat([row, row.new_full((1,), tag)]), fsdp.group)
        if (rows[:, -1] != tag).any():
            refuse_rank_dependent_forward(fsdp, rows[:, -1])
        return layout.unpack_rows(rows[:, :-1])

    def gather(self) -> None:
        """Before the unit's forward: gather its parameters and put them in its modules."""
        fsdp = self.owner
        fulls = {}
        if self.trainable:
            out = AllGather.apply(self, *[fsdp.shards[i] for i in self.trainable])
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

    def saved(self, kind: str) -> None:
        """Forward: autograd saved a reference to one of the ``kind`` parameters."""
        self._saved[kind] += 1

    def full_for_backward(self, kind: str) -> list[torch.Tensor]:
        """Backward unpacks a saved reference: gather once, free after the last unpack.

        Frozen parameters have no gradient to say when backward is done with them, so the
        count of saved references does: once the last one is unpacked, only the backward
        node using it holds the full tensor, and it lets go as soon as it has run.
        """
        if kind not in self._backward_cache:
            self._backward_cache[kind] = self.all_gather(kind)
            self.last_gathered_for_backward = [weakref.ref(t) for t in
                                               self._backward_cache[kind]]
            self.owner._clear_at_end_of_backward()
        fulls = self._backward_cache[kind]
        self._saved[kind] -= 1
        if self._saved[kind] <= 0:
            self.drop_backward_cache(kind)
        return fulls

    def drop_backward_cache(self, kind: str | None = None) -> None:
        for k in (("trainable", "frozen") if kind is None else (kind,)):
            self._backward_cache.pop(k, None)
            self._saved[k] = 0


class AllGather(torch.autograd.Function):
    """Forward: all-gather the unit's shards. Backward: reduce-scatter the gradients."""

    @staticmethod
    def forward(ctx, unit: Unit, *shards):
        ctx.unit = unit
        return tuple(unit.all_gather("trainable"))

    @staticmethod
    def backward(ctx, *grads):
        unit = ctx.unit
        fsdp, layout = unit.owner, unit.layouts["trainable"]
        unit.drop_backward_cache("trainable")     # every user of them has run by now
        master = fsdp.shards[unit.trainable[0]]
        fulls = [torch.zeros(s, dtype=master.dtype, device=master.device) if g is None else g
                 for g, s in zip(grads, layout.shapes)]
        # Reduce in the shards' dtype: fp32 under compute_dtype (N bf16 numbers lose bits),
        # 16 bits under param_dtype (half the bytes; the fp32 masters take the result).
        rows = layout.pack_rows(fulls, dtype=master.dtype)
        mine = reduce_scatter(rows, fsdp.group) / fsdp.world_size
        out = []
        for j, i in enumerate(unit.trainable):
            o = layout.offsets[j]
            out.append(mine[o:o + fsdp.shards[i].numel()])
        return (None, *out)


class ParamRef:
    """What autograd keeps instead of a gathered parameter (or a view of one)."""
    __slots__ = ("unit", "kind", "j", "size", "stride", "offset")

    def __init__(self, unit, kind, j, t):
        self.unit, self.kind, self.j = unit, kind, j
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


def refuse_rank_dependent_forward(fsdp, tags: torch.Tensor) -> None:
    """Raise: the ranks' all-gathers carried the ``tags`` of different units."""
    by_tag = {_tag(u, kind): f"{u.name!r}" + (" (frozen)" if kind == "frozen" else "")
              for u in fsdp.units.values() for kind in ("trainable", "frozen")}
    got = ", ".join(f"rank {r}: {by_tag.get(int(t), '?')}" for r, t in enumerate(tags))
    raise RuntimeError(
        f"FullyShardedDataParallel: the ranks gathered different units at once ({got}): "
        "their forwards called different layers (a rank-dependent branch or routing). "
        "Every rank must gather the same units in the same order: make the module that "
        "holds every branch one unit (unit_types=(ThatModule,)), so it is gathered "
        "whichever branch runs")


def refuse_units_around_recomputation(fsdp, parent: dict) -> None:
    """Raise if a unit is gathered outside a recomputed (checkpointed) forward that uses it.

    A unit is gathered by its module's forward pre-hook, which runs outside that module's
    checkpointed forward; backward's recomputation calls the forward alone and would find
    the unit's parameters freed (None). A unit inside the recomputed module is gathered
    again by its own hook, so the default units (one per layer) work.
    """
    for unit_module, unit in fsdp.units.items():
        for i in unit.trainable + unit.frozen:
            for m, _ in fsdp._owners[i]:
                while True:                      # from the owner up to the unit's module
                    if _recomputes(m):
                        raise ValueError(
                            f"FullyShardedDataParallel: unit {unit.name!r} is gathered "
                            "outside the activation-checkpointed forward of module "
                            f"{_name(fsdp, m)!r}, whose recomputation in backward would find "
                            "its parameters freed; keep the default units (unit_types=None), "
                            "or make the checkpointed module hold whole units")
                    if m is unit_module:
                        break
                    m = parent[m]


def _recomputes(module) -> bool:
    # distlab.memory.recompute.with_recompute marks the modules whose forward it checkpoints.
    return vars(module).get("recomputes_forward") is True


def _name(fsdp, module) -> str:
    return next((n or "(root)" for n, m in fsdp.module.named_modules() if m is module), "?")


def _tag(unit: Unit, kind: str) -> int:
    # 1..256: exact in every dtype a row may have, bfloat16 included.
    return 2 * (unit.tag % 128) + (kind == "frozen") + 1
