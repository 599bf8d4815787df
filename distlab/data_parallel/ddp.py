"""Data parallelism: every rank holds the whole model and averages its gradients.

Synchronous data-parallel SGD (Dean et al. 2012; Goyal et al. 2017, section 2) gives each of
the ``p`` ranks a disjoint shard of the mini-batch. Each computes the gradient of its shard's
*mean* loss, the ranks **average** (not sum) those gradients, and every rank takes the same
step, so the replicas stay identical and the update equals single-process SGD on the whole
global batch::

    g = (1/p) * sum_r g_r,   g_r = grad of (1/B) * sum_{i in shard r} loss_i

The wrappers below follow PyTorch's ``DistributedDataParallel`` (Li et al. 2020, "PyTorch
Distributed", VLDB, section 3) and build it up naive to optimized:

* :class:`NaiveDDP` - one blocking all-reduce per parameter after backward (not used in
  practice). Cost for K tensors of n bytes in all: 2(p-1)·K·alpha + 2(p-1)/p·n·beta, all of
  it exposed after backward.
* :class:`FlatDDP` - all gradients copied into one buffer, one all-reduce (section 3.2.2):
  2(p-1)·alpha + 2(p-1)/p·n·beta plus two copies of n bytes, still exposed.
* :class:`OverlapDDP` - an asynchronous all-reduce per parameter, launched from a backward
  hook as soon as that gradient is final (section 3.2.3): the naive cost, but hidden behind
  the rest of backward.
* :class:`BucketedDDP` - hooks fill buckets of ``bucket_size_mb``; each full bucket is
  all-reduced asynchronously (what DDP does): 2(p-1)·B·alpha + 2(p-1)/p·n·beta for B
  buckets, hidden behind backward except for the last bucket.

(The ring all-reduce costs 2(p-1) latency terms alpha and moves 2(p-1)/p of the bytes per rank.)

The conventions every wrapper shares, as in DDP: the wrapped model is ``.module``; building
the wrapper broadcasts rank 0's parameters and buffers; parameters with
``requires_grad=False`` are left alone; a parameter shared by several layers (tied weights)
is averaged once; :meth:`no_sync` accumulates gradients locally; call
:meth:`finish_gradient_synchronization` after ``backward()`` and before ``optimizer.step()``.
Any ``torch.optim`` optimizer then works unchanged. All communication goes through
:mod:`distlab.comm`, so bytes and time are counted.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm


def broadcast_module(module: nn.Module, group=None) -> None:
    """Copy the parameters and buffers of the group's rank 0 into ``module`` on every rank.

    Cost: one broadcast per tensor, (alpha + n·beta) each with a tree or pipeline.
    """
    src = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            comm.broadcast(t.data, src=src, group=group)


def average_gradients(params, group=None) -> None:
    """Average every parameter's gradient over the group, in place: the one averaging that
    every data-parallel, sharded and elastic algorithm in distlab uses.

    A parameter whose gradient is None on this rank (a branch this rank's data did not take,
    an expert no token was routed to) counts as zeros, and gets a zero gradient first, so
    every rank packs the same parameters at the same offsets and issues the same
    collectives in the same order whatever its forward did. Tied weights (the same tensor
    twice) are averaged once; parameters with ``requires_grad=False`` are left alone.
    Gradients of different dtypes or devices go in one flat buffer each (float64 stays
    float64, bfloat16 stays bfloat16), in parameter order.

    Cost: one all-reduce per dtype, 2(N-1)·alpha + 2(N-1)/N·n·beta for n bytes of gradients.
    """
    N = dist.get_world_size(group)
    unique = {id(p): p for p in params if p.requires_grad}.values()
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in unique:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])    # (n,): every gradient, end to end
        comm.all_reduce(flat, group=group)
        flat /= N
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


class _DDP(nn.Module):
    """What every variant shares: the conventions above; subclasses say how to average."""

    def __init__(self, module: nn.Module, group=None):
        super().__init__()
        self.module = module
        self.group = group
        self.world_size = dist.get_world_size(group)
        broadcast_module(module, group)
        # parameters() already yields a tied tensor once; dedupe by identity to be explicit.
        self.params = list({id(p): p for p in module.parameters() if p.requires_grad}.values())
        self._sync_enabled = True    # False inside no_sync()
        self._grad_sync = True       # whether the latest forward's backward must be averaged
        self.events: list[dict] | None = None   # set to [] to record communication intervals

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():   # like DDP, the forward decides whether backward syncs
            self._grad_sync = self._sync_enabled
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Run forward and backward inside to accumulate gradients locally (no communication).

        The first backward outside averages the accumulated gradients: k micro-batches then
        cost one synchronization instead of k (Li et al. 2020, section 3.2.4).
        """
        old, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = old

    def finish_gradient_synchronization(self) -> None:
        """Block until every gradient is averaged over the group; call before the step."""
        raise NotImplementedError

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        # Every rank must join every collective: an unused parameter contributes zeros.
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return p.grad

    def _all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        """Average ``tensor`` in place (pre-divided, as DDP does); record when it ran."""
        tensor.div_(self.world_size)
        start = time.time()
        work = comm.all_reduce(tensor, group=self.group, async_op=async_op)
        if self.events is not None:
            events, nbytes = self.events, comm.nbytes(tensor)
            if async_op:   # the future completes on gloo's thread: the true end of the transfer
                work.get_future().then(lambda _: events.append(
                    {"kind": "all_reduce", "start": start, "end": time.time(), "bytes": nbytes}))
            else:
                events.append({"kind": "all_reduce", "start": start, "end": time.time(),
                               "bytes": nbytes})
        return work


class NaiveDDP(_DDP):
    """One blocking all-reduce per parameter after backward. Not used in practice: K small
    messages pay K latencies, and nothing overlaps with computation."""

    def finish_gradient_synchronization(self) -> None:
        if not self._grad_sync:
            return
        for p in self.params:
            self._all_reduce(self._grad(p))


class FlatDDP(_DDP):
    """Flatten every gradient into one buffer, all-reduce it once, copy back.

    One latency instead of K; still exposed, since it starts only after backward ends.
    """

    def finish_gradient_synchronization(self) -> None:
        if not self._grad_sync:
            return
        start = time.time()
        average_gradients(self.params, self.group)
        if self.events is not None:
            self.events.append({"kind": "all_reduce", "start": start, "end": time.time(),
                                "bytes": sum(comm.nbytes(p.grad) for p in self.params)})


class OverlapDDP(_DDP):
    """Launch each parameter's all-reduce asynchronously as soon as its gradient is final.

    ``register_post_accumulate_grad_hook`` fires once per parameter when backward has
    accumulated its whole gradient (once for a tied parameter, after both uses), so the
    last layers' gradients travel while the first layers' are still being computed.
    """

    def __init__(self, module: nn.Module, group=None):
        super().__init__(module, group)
        self._works: list = []
        self._launched: set[int] = set()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._grad_sync:
            self._works.append(self._all_reduce(p.grad, async_op=True))
            self._launched.add(id(p))

    def finish_gradient_synchronization(self) -> None:
        if not self._grad_sync:
            return
        for p in self.params:   # parameters no hook saw (unused in this forward)
            if id(p) not in self._launched:
                self._works.append(self._all_reduce(self._grad(p), async_op=True))
        for work in self._works:
            work.wait()
        self._works, self._launched = [], set()


class BucketedDDP(_DDP):
    """Overlap with buckets: what ``torch.nn.parallel.DistributedDataParallel`` does.

    Parameters are grouped, in reverse registration order (roughly the order backward
    produces their gradients), into buckets of about ``bucket_size_mb``. A gradient is
    copied into its bucket's flat buffer when ready; a full bucket is all-reduced
    asynchronously. Buckets are launched strictly in bucket order so that every rank issues
    the same collectives in the same order. As in DDP, a bucket closes once it holds
    ``bucket_size_mb`` (so it can exceed it by one tensor), and the first closes at 1 MiB.
    Small buckets start communicating earlier; large ones pay fewer latencies (Li et al.
    2020, section 3.2.3 and figure 7).

    Args:
        module: the model, the same architecture on every rank.
        group: the process group (None: the world).
        bucket_size_mb: the largest bucket, in MiB (DDP's ``bucket_cap_mb``, default 25).
    """

    def __init__(self, module: nn.Module, group=None, bucket_size_mb: float = 25.0):
        if not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb={bucket_size_mb!r} must be > 0")
        super().__init__(module, group)
        self.bucket_size_mb = bucket_size_mb
        # As DDP: a bucket closes once it holds bucket_size_mb; the first one (the last
        # layers, whose gradients are ready first) closes at 1 MiB, so traffic starts early.
        caps = [min(1.0, bucket_size_mb) * 2 ** 20, bucket_size_mb * 2 ** 20]
        self.buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for p in reversed(self.params):
            if self.buckets[-1] and p.dtype != self.buckets[-1][0].dtype:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
            if size >= caps[min(len(self.buckets) - 1, 1)]:
                self.buckets.append([])
                size = 0
        self.buckets = [ps for ps in self.buckets if ps]
        self._where = {id(p): (b, i) for b, ps in enumerate(self.buckets)
                       for i, p in enumerate(ps)}
        self._buffers = [torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype)
                         for ps in self.buckets]
        self._offsets = [[0] + torch.tensor([p.numel() for p in ps]).cumsum(0).tolist()
                         for ps in self.buckets]
        self._reset()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _reset(self):
        self._pending = [len(ps) for ps in self.buckets]   # gradients each bucket awaits
        self._ready: set[int] = set()                      # parameters copied in
        self._next = 0                                     # next bucket to launch
        self._works: list = []

    def _copy_in(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        b, i = self._where[id(p)]
        lo, hi = self._offsets[b][i], self._offsets[b][i + 1]
        self._buffers[b][lo:hi].copy_(grad.reshape(-1))
        self._pending[b] -= 1
        self._ready.add(id(p))

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._works.append(self._all_reduce(self._buffers[self._next], async_op=True))
            self._next += 1

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._grad_sync:
            self._copy_in(p, p.grad)
            self._launch_ready()

    def finish_gradient_synchronization(self) -> None:
        if not self._grad_sync:
            return
        for p in self.params:   # parameters no hook saw (unused in this forward)
            if id(p) not in self._ready:
                self._copy_in(p, self._grad(p))
        self._launch_ready()
        for b, work in enumerate(self._works):
            work.wait()
            for i, p in enumerate(self.buckets[b]):
                lo, hi = self._offsets[b][i], self._offsets[b][i + 1]
                p.grad.copy_(self._buffers[b][lo:hi].view_as(p))
        self._reset()


VARIANTS = {"naive": NaiveDDP, "flat": FlatDDP, "overlap": OverlapDDP, "bucketed": BucketedDDP}
"""The gradient-synchronization variants by name, naive to optimized."""


def wrap(module: nn.Module, variant: str = "bucketed", group=None,
         bucket_size_mb: float = 25.0) -> _DDP:
    """Wrap ``module`` in the data-parallel ``variant`` (a key of :data:`VARIANTS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not known; use one of {sorted(VARIANTS)}")
    if variant == "bucketed":
        return BucketedDDP(module, group, bucket_size_mb=bucket_size_mb)
    return VARIANTS[variant](module, group)
