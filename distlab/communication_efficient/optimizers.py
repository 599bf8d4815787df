"""Optimizers for communication-efficient and large-batch training: LAMB and 1-bit Adam.

* :class:`LAMB` (You et al. 2019, "Large batch optimization for deep learning: training
  BERT in 76 minutes", algorithm 2): Adam's step, rescaled per layer by a *trust ratio*
  ``||w|| / ||update||``, so that every layer moves by a similar fraction of its own norm.
  As the number of nodes grows so does the global batch, and with it the learning rate one
  wants; LAMB keeps layers whose update would be large relative to their weights in check.
  It communicates nothing itself: use it after an ordinary gradient all-reduce.

* :class:`OneBitAdam` (Tang et al. 2021, "1-bit Adam: communication efficient large-scale
  training with Adam's convergence speed", algorithm 1): Adam's variance ``v`` settles
  early in training. So: run plain data-parallel Adam for ``warmup_steps`` (gradients
  all-reduced in float32), then **freeze** ``v`` and communicate only the momentum, each
  rank's ``m`` compressed to one bit per coordinate with error feedback
  (:mod:`distlab.communication_efficient.compression`). It answers "what does Adam's communication cost?": after
  the warm-up, 32 times fewer bits per coordinate, about 64/p times fewer bytes per rank.

Communication per step, alpha-beta model, p ranks, n parameters:

* Adam, LAMB, 1-bit Adam's warm-up: one ring all-reduce of 4n bytes,
  ``2(p-1) alpha + 2(p-1)/p·4n beta``;
* 1-bit Adam after warm-up: one all-gather of ``ceil(n/8) + 4`` bytes per rank,
  ``(p-1) alpha + (p-1)(n/8 + 4) beta``. (Tang et al. use a compressed all-to-all plus
  all-gather instead, with error feedback on both sides; on p <= 8 ranks the all-gather
  of 1-bit payloads is smaller than even a float32 reduce-scatter.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distlab import comm
from distlab.communication_efficient.compression import Compressor, Sign, all_reduce_compressed
from distlab.checks import is_int


def _check(name: str, value, lo: float, hi: float, cls: str, open_lo: bool = False):
    ok = isinstance(value, (int, float)) and (lo < value if open_lo else lo <= value) and value < hi
    if not ok:
        raise ValueError(f"{cls}.{name}={value!r} is out of range; allowed "
                         f"{'(' if open_lo else '['}{lo:g}, {hi:g})")


class LAMB(torch.optim.Optimizer):
    """Layer-wise adaptive moments for large batches (You et al. 2019, algorithm 2).

    For each parameter tensor (a "layer") w with gradient g, at step t::

        m = b1 m + (1 - b1) g,        v = b2 v + (1 - b2) g^2
        r = m_hat / (sqrt(v_hat) + eps) + weight_decay · w     (m_hat = m / (1 - b1^t), ...)
        w = w - lr · (||w|| / ||r||) · r

    with the trust ratio taken as 1 when ``||w||`` or ``||r||`` is zero (biases at zero,
    as in the authors' implementation).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: learning rate, > 0.
        betas: ``(b1, b2)``, each in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: decoupled weight decay added to the update, >= 0.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        _check("lr", lr, 0, float("inf"), "LAMB", open_lo=True)
        _check("betas[0]", betas[0], 0, 1, "LAMB")
        _check("betas[1]", betas[1], 0, 1, "LAMB")
        _check("eps", eps, 0, float("inf"), "LAMB")
        _check("weight_decay", weight_decay, 0, float("inf"), "LAMB")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.state[w]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(w)
                    state["v"] = torch.zeros_like(w)
                state["step"] += 1
                t, m, v = state["step"], state["m"], state["v"]
                m.mul_(b1).add_(w.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(w.grad, w.grad, value=1 - b2)
                r = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"])
                r.add_(w, alpha=group["weight_decay"])
                w_norm, r_norm = w.norm(), r.norm()
                trust = (w_norm / r_norm) if w_norm > 0 and r_norm > 0 else 1.0
                w.sub_(group["lr"] * trust * r)
        return loss


class OneBitAdam(torch.optim.Optimizer):
    """Data-parallel Adam whose momentum travels in 1 bit per coordinate (Tang et al. 2021).

    This optimizer *does the gradient communication itself*: give it each rank's local
    gradients (do not all-reduce them first). For ``t <= warmup_steps`` it averages the
    gradients in float32 and takes Adam's step. At ``t = warmup_steps`` it freezes the
    bias-corrected variance ``v_hat``. Afterwards every rank updates its momentum with its
    local gradient, ``m_r = b1 m + (1 - b1) g_r``, and the ranks average it compressed with
    error feedback, so they all agree on ``m`` and take ``w = w - lr m / (sqrt(v_hat) + eps)``.

    One departure from Tang et al.: what is compressed is ``m_r / (sqrt(v_hat) + eps)``, the
    momentum in the coordinates of the frozen preconditioner (every rank has the same
    ``v_hat``, so uncompressed this changes nothing). Compressing ``m_r`` itself with one
    sign and one scale gives every coordinate a step of about ``scale / (sqrt(v_i) + eps)``,
    enormous where the variance is tiny (on the digits, whose corner pixels are almost
    always 0, that diverged at once).

    And ``eps`` defaults to 1e-3, not Adam's 1e-8: with ``v`` frozen, a coordinate that
    was almost never active during the warm-up and becomes active later is divided by
    ``sqrt(v_i) + eps`` ~ eps, and the sign compressor's single scale then spreads that
    huge value over every coordinate (with eps = 1e-8, 1-bit Adam diverged on the digits
    within 20 steps of the warm-up's end; uncompressed frozen-``v`` Adam did not).

    Args:
        params: the parameters (one group).
        lr: learning rate, > 0.
        betas: ``(b1, b2)``, each in [0, 1).
        eps: added to the denominator, >= 0 (see above for the default).
        warmup_steps: steps of full-precision Adam before ``v`` is frozen, >= 1.
        compressor: how the momentum is compressed (default: :class:`~distlab.communication_efficient.compression.Sign`).
        group: the process group (None: the world).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-3,
                 warmup_steps: int = 20, compressor: Compressor | None = None, group=None):
        _check("lr", lr, 0, float("inf"), "OneBitAdam", open_lo=True)
        _check("betas[0]", betas[0], 0, 1, "OneBitAdam")
        _check("betas[1]", betas[1], 0, 1, "OneBitAdam")
        _check("eps", eps, 0, float("inf"), "OneBitAdam")
        if not (is_int(warmup_steps) and warmup_steps >= 1):
            raise ValueError(f"OneBitAdam.warmup_steps={warmup_steps!r} is out of range; "
                             "allowed integers >= 1")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        if len(self.param_groups) != 1:
            raise ValueError("OneBitAdam takes one parameter group")
        self.compressor = compressor or Sign()
        self.warmup_steps, self.group = warmup_steps, group
        self.params = self.param_groups[0]["params"]
        n = sum(w.numel() for w in self.params)
        # Flat state: the whole model's m and v travel as one vector.
        self.t, self.m, self.v, self.residual = 0, torch.zeros(n), torch.zeros(n), torch.zeros(n)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hp = self.param_groups[0]
        b1, b2, eps, lr = *hp["betas"], hp["eps"], hp["lr"]
        g = torch.cat([(w.grad if w.grad is not None else torch.zeros_like(w)).reshape(-1)
                       for w in self.params])                                 # (n,)
        self.t += 1
        if self.t <= self.warmup_steps:
            comm.all_reduce(g, group=self.group)                              # float32 average
            g /= dist.get_world_size(self.group)
            self.m.mul_(b1).add_(g, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.t == self.warmup_steps:                                   # freeze v_hat
                self.v.div_(1 - b2 ** self.t)
            v_hat = self.v if self.t == self.warmup_steps else self.v / (1 - b2 ** self.t)
            update = (self.m / (1 - b1 ** self.t)) / (v_hat.sqrt() + eps)
        else:
            local_m = self.m * b1 + g * (1 - b1)                              # m_r
            denom = self.v.sqrt() + eps                                       # frozen, shared
            # Average m_r / denom rather than m_r: the same thing uncompressed (denom is
            # the same on every rank), but one sign and one scale then give every
            # coordinate a step of similar size, where compressing m_r itself would blow
            # up the coordinates whose variance is tiny (pixels that are almost always 0).
            u = all_reduce_compressed(local_m / denom, self.compressor, self.residual,
                                      self.group)
            self.m = u * denom
            update = u / (1 - b1 ** self.t)
        offset = 0
        for w in self.params:
            w.sub_(lr * update[offset: offset + w.numel()].view_as(w))
            offset += w.numel()
        return loss
