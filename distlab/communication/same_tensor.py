"""Every rank passes the same tensor: the input check of the from-scratch collectives.

A collective built from point-to-point messages trusts every rank to pass a tensor of the
same shape and dtype: otherwise the ranks' messages differ in size, and gloo aborts the
process or quietly delivers part of a message. :func:`check_same_tensor` compares the
ranks' tensors with one tiny all-gather first and raises on every rank with what each
passed. On a loaded machine one small collective costs milliseconds, so the comparison is
made only when a function meets another tensor than the last one its group agreed on: a
loop over same-shaped tensors pays it once.
"""
from __future__ import annotations

import sys
import threading

import torch
import torch.distributed as dist

from distlab import comm

_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.complex64, torch.complex128)


_agreed: dict[tuple[int, str], tuple] = {}
"""``(id(process group), function) -> (process group, (shape, dtype))``: the last tensor
every rank of the group agreed on for that function. It is the same on every rank (it
changes only after an all-gather that every rank saw), so every rank skips the comparison
or none does. The group is kept so that its id cannot be reused."""

_HINT_AFTER = 10.0   # seconds a comparison may wait before it explains why it may hang


def check_same_tensor(tensor, group, name: str) -> None:
    """Raise on every rank if the ranks' tensors differ in shape or dtype (one all-gather,
    skipped when the tensor is the one the group last agreed on for ``name``)."""
    pg = group if group is not None else dist.group.WORLD
    key, mine = (id(pg), name), (tuple(tensor.shape), tensor.dtype)
    agreed = _agreed.get(key)
    if agreed is not None and agreed[1] == mine:
        return
    dims = list(tensor.shape)[:_MAX_DIMS]
    code = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
    sig = torch.tensor([code, tensor.dim(), tensor.numel(), hash(tuple(tensor.shape))]
                       + dims + [-1] * (_MAX_DIMS - len(dims)), dtype=torch.int64,
                       device=tensor.device)
    p = dist.get_world_size(group)
    rows = [torch.empty_like(sig) for _ in range(p)]
    hint = threading.Timer(_HINT_AFTER, _explain_wait, (name, mine, agreed))
    hint.daemon = True
    hint.start()
    try:
        comm.all_gather(rows, sig, group=group)
    finally:
        hint.cancel()
    rows = torch.stack(rows)                                  # (p, 4 + _MAX_DIMS)
    if code < 0:
        raise TypeError(f"{name}: dtype {tensor.dtype} is not supported; use one of {_DTYPES}")
    if bool((rows == rows[0]).all()):
        _agreed[key] = (pg, mine)
        return

    def describe(row):
        ndim = int(row[1])
        shape = tuple(int(d) for d in row[4: 4 + min(ndim, _MAX_DIMS)])
        dtype = _DTYPES[int(row[0])] if 0 <= row[0] < len(_DTYPES) else "unsupported dtype"
        return f"{shape}{'...' if ndim > _MAX_DIMS else ''} {dtype}"

    seen = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows.tolist()))
    raise ValueError(f"{name}: every rank must pass a tensor of the same shape and dtype, "
                     f"but got {seen}")


def _explain_wait(name, mine, agreed) -> None:
    last = "none yet" if agreed is None else f"{agreed[1][0]} {agreed[1][1]}"
    print(f"{name}: rank {dist.get_rank()} has waited {_HINT_AFTER:g} s for the other ranks "
          f"to compare their tensors with its {mine[0]} {mine[1]}. Ranks that pass the shape "
          f"and dtype the group last agreed on ({last}) skip the comparison and wait in the "
          "algorithm instead: every rank must pass the same shape and dtype.",
          file=sys.stderr, flush=True)
