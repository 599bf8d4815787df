"""Peak memory per rank, measured: per phase of a step, by what the bytes are for.

:func:`distlab.sharding.memory.measure` adds up the storages a rank holds *between* steps.
The peak is higher, and comes inside the step: the activations autograd keeps from forward
until backward (Korthikanti et al. 2022, section 4), the gradients of activations that
backward makes and drops, the buffers a collective fills, and under FSDP the gathered
parameters of the unit being computed (Zhao et al. 2023, "PyTorch FSDP", section 3.2).

On CPU there is no allocator statistic, so :class:`PeakTracker` traces allocations: a
``TorchDispatchMode`` sees every operator's outputs, records each new storage once (by
its ``untyped_storage()``, whose Python object lives exactly as long as the memory) and
forgets it in a weakref finalizer when it is freed. The largest sum of live bytes in a phase
is its peak; at that moment each live storage is put in one category (``PARTS``):

* ``params``, ``grads``, ``optimizer_state``: the model states, exactly as
  :func:`~distlab.sharding.memory.measure` finds them (this rank's shards under ZeRO);
* ``gathered_params``: the full parameters an FSDP unit has gathered for its forward or
  backward (the weak references each of its units keeps, ``last_gathered``);
* ``communication``: a storage some collective (any ``c10d`` operator, which is what every
  call of :mod:`distlab.comm` becomes) sent or received, such as a flattened bucket;
* ``activations``: made during forward; ``temporaries``: made during backward or the step
  (gradients of activations, the optimizer's scratch).

Storages that existed before the step and are not model states (the batch) are not counted.
``torch.distributed._tools.mem_tracker.MemTracker`` runs on CPU too with torch 2.13, but it
keeps one peak for the whole region (a second forward raises ``NotImplementedError`` until
its module statistics are reset), has no category for collective buffers, and installs
hooks on every parameter; this tracker is the few lines we need. On CUDA
:func:`measure_step` also reports the allocator's own ``torch.cuda.max_memory_allocated``
per phase (``allocator_peak``), which adds the caching allocator's 512-byte rounding.
No communication of its own: what is measured is the step's.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distlab.sharding.fsdp import FullyShardedDataParallel
from distlab.sharding.memory import CATEGORIES, model_state_tensors

PARTS = (*CATEGORIES, "gathered_params", "communication", "activations", "temporaries")
PHASES = ("forward", "backward", "step")


def measure_step(model: torch.nn.Module, optimizer, batch, loss_fn) -> dict:
    """One training step (zero_grad, forward, backward, step), its memory measured.

    Call it inside a rank's ``train`` in place of the step (every rank must, since the step
    communicates). The model and optimizer are as for
    :func:`~distlab.sharding.memory.measure`: a DDP wrapper of
    :mod:`distlab.data_parallel.ddp` (its ``finish_gradient_synchronization`` is called at
    the end of backward) or an FSDP one, a torch optimizer or a ZeRO one.

    Args:
        model: the model (or its distributed wrapper).
        optimizer: its optimizer.
        batch: ``(X, y)`` for this rank.
        loss_fn: ``loss_fn(model(X), y)`` -> the scalar loss.

    Returns:
        ``{"forward": parts, "backward": parts, "step": parts, "end": parts, "peak": int,
        "model_state_peak": int, "saved_activations": int, "loss": float}`` in bytes, where
        ``parts`` is ``{"peak": bytes at the phase's peak, part: bytes of it}`` for each of
        ``PARTS``, with the phase's own ``model_state_peak``, ``with_gathered_peak`` and
        ``communication_peak`` (the most collective buffers alive at once);
        ``end`` the live bytes after the step, ``saved_activations`` the bytes
        made in forward still alive when it ends (what backward will read),
        ``model_state_peak`` the largest params + grads + optimizer state at any moment of
        the step, and ``with_gathered_peak`` the largest of that plus FSDP's gathered
        parameters (ZeRO's formula plus the unit being computed).

    Example: ``measure_step(model, opt, (X, y), lm_loss)["backward"]["peak"]``.
    """
    X, y = batch
    optimizer.zero_grad(set_to_none=True)
    tracker = PeakTracker(model, optimizer, ignore=(X, y))
    on_cuda = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
    out, loss = {}, None
    for phase in PHASES:
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with tracker.phase("temporaries" if phase != "forward" else "activations"):
            if phase == "forward":
                loss = loss_fn(model(X), y)
            elif phase == "backward":
                loss.backward()
                finish = getattr(model, "finish_gradient_synchronization", None)
                if finish is not None:    # a DDP wrapper's last all-reduces land here
                    finish()
            else:
                optimizer.step()
        out[phase] = {**tracker.peak_parts, "model_state_peak": tracker.state_peaks[0],
                      "with_gathered_peak": tracker.state_peaks[1],
                      "communication_peak": tracker.communication_peak}
        if phase == "forward":
            out["saved_activations"] = tracker.current_parts()["activations"]
        if on_cuda:
            torch.cuda.synchronize()
            out[phase]["allocator_peak"] = torch.cuda.max_memory_allocated()
    out["end"] = tracker.current_parts()
    out["peak"] = max(out[p]["peak"] for p in PHASES)
    for key in ("model_state_peak", "with_gathered_peak"):
        out[key] = max(out[p][key] for p in PHASES)
    out["loss"] = float(loss.detach())
    return out


def largest_unit_bytes(model: torch.nn.Module) -> int:
    """Bytes of the largest unit an FSDP model gathers at once (0 for any other model).

    What stage 3 holds beyond ZeRO's (4 + 4 + K)Ψ/N while a unit computes: each gathered
    parameter is N padded chunks, so N·c elements for a parameter of n <= N·c.
    Example: ``sum(predicted_bytes(psi, 3, N).values()) + largest_unit_bytes(fsdp_model)``.
    """
    if not isinstance(model, FullyShardedDataParallel):
        return 0
    itemsize = (model.compute_dtype or model.shards[0].dtype).itemsize if len(model.shards) \
        else 0
    return max(model.world_size * itemsize * sum(layout.row_len
                                                 for layout in u.layouts.values())
               for u in model.units.values())


class PeakTracker(TorchDispatchMode):
    """Live storages and the peak of their sum, per phase, by category (see the module).

    Args:
        model: whose parameters, gradients (and FSDP gathered units) are recognized.
        optimizer: whose state is recognized.
    """

    def __init__(self, model: torch.nn.Module, optimizer, ignore=()):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.live: dict[int, list] = {}    # id(storage) -> [weakref, nbytes, label]
        self.lock = threading.RLock()
        self.total = 0
        self.label = "activations"
        self.peak, self.peak_parts = 0, {}
        self.state_peaks = (0, 0)          # (model states, model states + gathered)
        self.communication_peak = 0
        # Storages that were there before and are not counted (the batch), and those that
        # are: the model states, whatever label they get (current_parts looks them up).
        self.ignored = {id(t.untyped_storage()): weakref.ref(t.untyped_storage())
                        for t in tree_leaves(ignore) if isinstance(t, torch.Tensor)}
        for tensors in self._model_state().values():
            for t in tensors:
                self._add(t, "params")
        self._update_peaks()

    def phase(self, label: str):
        """Enter a phase: new storages get ``label``; its peak starts from what is live."""
        self.label = label
        self.peak, self.state_peaks, self.communication_peak = 0, (0, 0), 0
        self._update_peaks()
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.namespace == "c10d":
            # A collective's buffers: whatever it reads or writes (model states aside).
            for t in tree_leaves((args, kwargs, result)):
                if isinstance(t, torch.Tensor):
                    self._add(t, "communication", relabel=True)
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor):
                self._add(t, self.label)
        self._update_peaks()
        return result

    def _update_peaks(self) -> None:
        parts = self.current_parts()
        if parts["peak"] > self.peak:
            self.peak, self.peak_parts = parts["peak"], parts
        state = sum(parts[c] for c in CATEGORIES)
        self.state_peaks = (max(self.state_peaks[0], state),
                            max(self.state_peaks[1], state + parts["gathered_params"]))
        self.communication_peak = max(self.communication_peak, parts["communication"])

    def current_parts(self) -> dict[str, int]:
        """``{"peak": live bytes, part: bytes}``, each live storage in one part of PARTS."""
        known = {}
        for category, tensors in self._model_state().items():
            for t in tensors:
                known.setdefault(id(t.untyped_storage()), category)
        parts = dict.fromkeys(PARTS, 0)
        with self.lock:
            live = list(self.live.items())
        for key, (_, nbytes, label) in live:
            parts[known.get(key, label)] += nbytes
        return {"peak": sum(parts.values()), **parts}

    def _model_state(self) -> dict[str, list[torch.Tensor]]:
        # The tensors distlab.sharding.memory.measure counts, in its order (the first
        # category that reaches a storage keeps it), then FSDP's gathered parameters.
        return {**model_state_tensors(self.model, self.optimizer),
                "gathered_params": _gathered(self.model)}

    def _add(self, t: torch.Tensor, label: str, relabel: bool = False) -> None:
        if t.device.type == "meta" or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.ignored and self.ignored[key]() is storage:
            return
        entry = self.live.get(key)
        if entry is not None and entry[0]() is storage:
            if relabel:
                entry[2] = label
            return
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        with self.lock:
            self.live[key] = [weakref.ref(storage), nbytes, label]
            self.total += nbytes
        weakref.finalize(storage, self._free, key).atexit = False

    def _free(self, key: int) -> None:
        # Called where the storage dies: maybe on gloo's or autograd's thread.
        with self.lock:
            entry = self.live.pop(key, None)
            if entry is not None:
                self.total -= entry[1]


def _gathered(model) -> list[torch.Tensor]:
    # Each FSDP unit keeps weak references to the full parameters it gathered last, for
    # forward and for backward: those still alive are gathered now.
    if not isinstance(model, FullyShardedDataParallel):
        return []
    refs = [r for u in model.units.values()
            for r in u.last_gathered + u.last_gathered_for_backward]
    return [t for t in (r() for r in refs) if t is not None]
