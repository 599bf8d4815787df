"""FSDP in 16 bits: 16-bit parameter shards, fp32 master weights sharded with the optimizer.

ZeRO's mixed-precision accounting (Rajbhandari et al. 2020, section 3.1) keeps, per
parameter, 2 bytes of fp16/bf16 weight, 2 of gradient and K = 12 of optimizer state: the
fp32 master weight (4) and Adam's m and v (8). Stage 3 divides all of it by N:
(2 + 2 + 12)Ψ/N bytes per rank, plus the 16-bit parameters of the one unit being computed.

``FullyShardedDataParallel(model, param_dtype=torch.bfloat16)`` keeps 16-bit shards, so
every all-gather and every gradient reduce-scatter moves 16-bit numbers: in the alpha-beta
model a step costs 3·(U·(N-1)·alpha + (N-1)/N·2Ψ·beta), half the bytes of fp32 FSDP.
:class:`MasterWeightOptimizer` is the optimizer of those shards. It keeps an fp32 copy of
each of this rank's shards (the master weights of Micikevicius et al. 2018, "Mixed Precision
Training", section 3.1) and steps that copy with an ordinary torch optimizer, so an update
too small for 16 bits (below half a unit in the last place of the weight) still accumulates;
then it rounds the masters down into the 16-bit shards, which the next forward gathers.
The optimizer itself communicates nothing: each rank steps its own shards.

With fp16, scale the loss and step through the dynamic loss scaler (section 3.2), exactly
as with ZeRO's mixed path::

    scaler.scale(loss).backward()
    skipped = scaler.step(opt, opt.reduce_gradients(), group)   # unscale, check, step/skip
    scaler.update(skipped)

Each rank checks only its own shards' gradients, so the scaler agrees on the overflow flag
with one all-reduce MAX of one float (alpha + 4·beta) and every rank skips the same steps.
bf16 has fp32's exponent range: call ``opt.step()`` and no scaler is needed.
"""
from __future__ import annotations

import torch

from distlab.precision.mixed import gradients_to_masters, master_weights, masters_to_params
from distlab.sharding.fsdp import PARAM_DTYPES
from distlab.sharding.zero import copy_hyperparameters, local_optimizer


class MasterWeightOptimizer(torch.optim.Optimizer):
    """Step fp32 master copies of 16-bit parameters, then round them into the parameters.

    Build it over the 16-bit shards of
    ``FullyShardedDataParallel(model, param_dtype=...)`` (``wrapper.parameters()``, or
    groups of them from ``wrapper.shards_by_name()``), with the optimizer class and its
    hyperparameters, as ZeRO's ``ShardedOptimizer(..., master_weights=True)``; after
    ``backward`` the shards' ``.grad`` hold the 16-bit average over ranks (FSDP
    reduce-scattered them). ``step()`` casts them to the masters' fp32 ``.grad``, runs
    ``optimizer_class`` on the masters and copies the masters into the shards; the masters'
    gradients are freed again, so they live during the step only.

    Args:
        params: bf16 or fp16 parameters (or parameter groups), not empty; parameters with
            ``requires_grad=False`` are left alone. Their masters are copied from them here:
            load the model's weights before building the optimizer.
        optimizer_class: an elementwise torch optimizer (SGD, Adam, AdamW, ...).
        **defaults: its hyperparameters (``lr=...``).

    Refused: a parameter of any other dtype (it needs no master, or is not a 16-bit shard).
    """

    def __init__(self, params, optimizer_class, **defaults):
        params = list(params)
        if not params:
            raise ValueError("MasterWeightOptimizer got an empty parameter list: pass the "
                             "FSDP wrapper's shards (wrapper.parameters())")
        super().__init__(params, defaults)
        self._params = list({id(p): p for g in self.param_groups for p in g["params"]
                             if p.requires_grad}.values())
        for p in self._params:
            if p.dtype not in PARAM_DTYPES:
                raise ValueError(
                    f"MasterWeightOptimizer got a parameter of dtype {p.dtype} (shape "
                    f"{tuple(p.shape)}); allowed torch.bfloat16 or torch.float16: build the "
                    "model with FullyShardedDataParallel(..., param_dtype=torch.bfloat16), or "
                    "step fp32 parameters with optimizer_class itself")
        self.master_params = master_weights(self._params)
        """The fp32 masters, one per trainable parameter, in order: what the optimizer steps."""
        self.optim = local_optimizer(self, self._params, self.master_params, optimizer_class,
                                     defaults)
        self.defaults = self.optim.defaults
        self._cast = False

    @torch.no_grad()
    def reduce_gradients(self) -> list[torch.Tensor]:
        """The masters, their fp32 ``.grad`` set from the 16-bit shards' (once per step).

        FSDP's backward has already reduce-scattered the gradients, so this only casts
        them; the name is ZeRO's (``ShardedOptimizer.reduce_gradients``), so that one loop,
        ``scaler.step(opt, opt.reduce_gradients(), group)``, trains either.
        """
        if not self._cast:
            gradients_to_masters(self._params, self.master_params)
            self._cast = True
        return self.master_params

    @torch.no_grad()
    def step(self, closure=None):
        """Step the masters with the local optimizer, then round them into the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        copy_hyperparameters(self.optim.param_groups, self.param_groups)   # LR schedulers
        self.reduce_gradients()
        self.optim.step()
        masters_to_params(self._params, self.master_params)   # the 16-bit shards, rounded
        self._cast = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._cast = False
        for m in self.master_params:
            m.grad = None

    def state_dict(self) -> dict:
        """The local optimizer's state over the masters, in the parameters' order: the
        format :meth:`~distlab.sharding.fsdp.FullyShardedDataParallel.full_optim_state_dict`
        unshards. The masters are not in it: the model's checkpoint holds their 16-bit
        rounding."""
        return self.optim.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load :meth:`state_dict`'s format; the masters restart from the parameters (load
        the model first)."""
        self.optim.load_state_dict(state_dict)
        copy_hyperparameters(self.param_groups, self.optim.param_groups)
        for p, m in zip(self._params, self.master_params):
            m.copy_(p)
