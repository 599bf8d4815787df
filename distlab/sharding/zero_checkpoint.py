"""ZeRO's checkpoints in the unsharded torch format: gathered on one rank, loadable at any
world size (the state format of ``optimizer_class(...).state_dict()``).

:func:`consolidate` gathers a :class:`~distlab.sharding.zero.ShardedOptimizer`'s state,
one all-gather per kind of per-element state (``exp_avg``, ``exp_avg_sq``...):
(N-1)·alpha + (N-1)/N·n·beta each for n bytes of that state. :func:`load` keeps this rank's
shards of an unsharded state dict, with no communication.
"""
from __future__ import annotations

import torch

from distlab.sharding.layout import all_gather_rows


def consolidate(opt, to: int = 0) -> dict | None:
    """The whole optimizer state, on rank ``to`` (None elsewhere); every rank must call it."""
    local = [opt.optim.state.get(s, {}) for s in opt.master_params]
    keys = sorted({k for st in local for k, v in st.items() if torch.is_tensor(v)
                   and v.dim() == 1})
    full: dict[str, dict[int, torch.Tensor]] = {k: {} for k in keys}
    for k in keys:
        for idx, layout in opt._buckets:
            mine = [local[i].get(k) for i in idx]
            like = next((t for t in mine if t is not None), None)
            if like is None:
                continue
            row = layout.pack_row([like.new_zeros(opt.shards[i].numel()) if t is None else t
                                  for i, t in zip(idx, mine)])
            full[k].update(zip(idx, layout.unpack_rows(all_gather_rows(row, opt.group))))
    if opt.rank != to:
        return None
    index = {id(p): i for i, p in enumerate(opt._params)}
    state, groups, n = {}, [], 0
    for g, local_group in zip(opt.param_groups, opt.optim.param_groups):
        groups.append({**_hyper(local_group), "params": list(range(n, n + len(g["params"])))})
        for p in g["params"]:
            i = index.get(id(p))
            if i is not None and local[i]:
                state[n] = {k: (full[k][i].clone() if i in full.get(k, {}) else _copy(v))
                            for k, v in local[i].items()}
            n += 1
    return {"state": state, "param_groups": groups}


def load(opt, state_dict: dict) -> None:
    """Load an unsharded torch-format state dict (from any world size) into ``opt``'s shards."""
    groups = state_dict["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
        raise ValueError(f"state_dict has groups of "
                         f"{[len(g['params']) for g in groups]} parameters; this optimizer "
                         f"has {[len(g['params']) for g in opt.param_groups]}")
    index = {id(p): i for i, p in enumerate(opt._params)}
    local_index = {id(s): j for j, s in enumerate(s for g in opt.optim.param_groups
                                                   for s in g["params"])}
    local_state = {}
    for g, saved in zip(opt.param_groups, groups):
        g.update(_hyper(saved))
        for p, key in zip(g["params"], saved["params"]):
            i = index.get(id(p))
            st = state_dict["state"].get(key)
            if i is not None and st:
                local_state[local_index[id(opt.master_params[i])]] = {
                    k: (opt._shard(i, v).clone()
                        if torch.is_tensor(v) and v.dim() >= 1 and v.numel() == p.numel()
                        else _copy(v)) for k, v in st.items()}
    opt.optim.load_state_dict({"state": local_state, "param_groups": [
        {**_hyper(g), "params": [local_index[id(s)] for s in local["params"]]}
        for g, local in zip(opt.param_groups, opt.optim.param_groups)]})


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _copy(v):
    return v.clone() if torch.is_tensor(v) else v
