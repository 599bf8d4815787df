"""Dynamic loss scaling: fp16 gradients that neither underflow nor poison the weights.

fp16 has 5 exponent bits: values below 2^-24 flush to zero, and many gradients of a deep
network live there. Micikevicius et al. 2018 ("Mixed Precision Training", arXiv 1710.03740,
section 3.2) multiply the loss by a scale S before backward, so every gradient is S times
larger and lands in fp16's range; the gradients are divided by S again (in fp32, on the
master weights) before the optimizer steps. Too large an S overflows instead: a gradient
becomes inf or NaN. The *dynamic* scaler finds S on the fly:

* an overflow (any non-finite gradient) skips the step and multiplies S by
  ``backoff_factor`` (0.5);
* after ``growth_interval`` clean steps in a row, S is multiplied by ``growth_factor`` (2).

The semantics are those of ``torch.amp.GradScaler`` (same defaults, same order of
operations, same state dict keys), written out so that each part can be read and tested.

On several ranks every rank must skip *the same* steps, or the replicas diverge. When each
rank holds different gradients (ZeRO's shards, a gradient clipped or checked before the
averaging), one rank may see an inf that another does not: ``unscale_and_check`` agrees
on the flag with one all-reduce MAX of a single float, alpha + 4·beta (latency only).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, is_number, require_arg


class DynamicLossScaler:
    """The loss scale S, its growth and backoff, and the skipped steps.

    Use it as ``torch.amp.GradScaler``, with the parameters whose gradients it checks
    named explicitly (the fp32 master weights in fp16 training)::

        scaler = DynamicLossScaler()
        scaler.scale(loss).backward()
        skipped = scaler.step(optimizer, masters, group)   # unscale, check, step or skip
        scaler.update(skipped)                          # backoff or (later) growth

    Args:
        init_scale: S at the start (2**16).
        growth_factor: S is multiplied by it after ``growth_interval`` clean steps (> 1).
        backoff_factor: S is multiplied by it after an overflow (in (0, 1)).
        growth_interval: clean steps in a row before S grows (an int >= 1).
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        require_arg("init_scale", init_scale, is_number(init_scale) and init_scale > 0,
                    "a number > 0")
        require_arg("growth_factor", growth_factor,
                    is_number(growth_factor) and growth_factor > 1, "a number > 1")
        require_arg("backoff_factor", backoff_factor,
                    is_number(backoff_factor) and 0 < backoff_factor < 1, "a number in (0, 1)")
        require_arg("growth_interval", growth_interval,
                    is_int(growth_interval) and growth_interval >= 1, "an int >= 1")
        # S as a float32 number, as GradScaler keeps it, so the two agree bit for bit.
        self._scale = torch.tensor(float(init_scale), dtype=torch.float32)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = growth_interval
        self.growth_tracker = 0
        """Clean steps in a row since the last overflow or growth."""

    @property
    def scale_value(self) -> float:
        """S now."""
        return self._scale.item()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S``, in fp32 (an fp16 loss times 2**16 would overflow by itself)."""
        return loss.float() * self._scale.to(loss.device)

    @torch.no_grad()
    def unscale_and_check(self, params, group=None) -> bool:
        """Divide every gradient by S in place; True if any is inf or NaN on any rank.

        The division multiplies by 1/S computed in float64 then rounded to float32, as
        GradScaler does. With a ``group`` of several ranks the flag is agreed by one
        all-reduce MAX, so every rank returns the same answer.

        Args:
            params: the tensors whose ``.grad`` the optimizer will step (None grads skipped).
            group: the ranks that must agree (None: the world when torch.distributed is
                initialized, else this process alone, with no communication).
        """
        inv = self._scale.double().reciprocal().float()
        found = torch.zeros(1)
        for p in params:
            if p.grad is None:
                continue
            found = torch.maximum(found, (~torch.isfinite(p.grad)).any().float().cpu())
            p.grad.mul_(inv.to(p.grad.device))
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            comm.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return bool(found.item())

    def step(self, optimizer, params, group=None) -> bool:
        """Unscale and check ``params``' gradients; step ``optimizer`` unless one overflowed.

        Returns True when the step was skipped (an overflow); pass that to :meth:`update`.
        """
        found_inf = self.unscale_and_check(params, group)
        if not found_inf:
            optimizer.step()
        return found_inf

    def update(self, found_inf: bool) -> None:
        """Backoff after an overflow; growth after ``growth_interval`` clean steps in a row."""
        if found_inf:
            self._scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self._scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        """GradScaler's format: either can load the other's."""
        return {"scale": self.scale_value, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state_dict: dict) -> None:
        self._scale.fill_(state_dict["scale"])
        self.growth_factor = float(state_dict["growth_factor"])
        self.backoff_factor = float(state_dict["backoff_factor"])
        self.growth_interval = int(state_dict["growth_interval"])
        self.growth_tracker = int(state_dict["_growth_tracker"])
