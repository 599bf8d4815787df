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
the wrapper broadcasts rank 0's parameters and buffers, and (``broadcast_buffers=True``, the
default) every forward that will be synchronized broadcasts rank 0's buffers again (alpha +
n·beta per buffer tensor), so BatchNorm's running statistics are rank 0's everywhere;
parameters with ``requires_grad=False`` are left alone; a parameter shared by several layers
(tied weights) is averaged once; a parameter this rank's forward did not use (a branch its
data did not take) contributes zeros, so every rank issues the same collectives in the same
order; ``no_sync()`` accumulates gradients locally; call
``finish_gradient_synchronization()`` after ``backward()`` and before ``optimizer.step()``.
Any ``torch.optim`` optimizer then works unchanged. Every buffer is allocated on its
parameters' device. All communication goes through :mod:`distlab.comm`, so bytes and time
are counted. Sparse gradients (``nn.Embedding(sparse=True)``) are refused at construction.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm
from distlab.checks import is_number, require


def broadcast_module(module: nn.Module, group=None) -> None:
    """Copy the parameters and buffers of the group's rank 0 into ``module`` on every rank.

    Cost: one broadcast per tensor, (alpha + n·beta) each with a tree or pipeline.
    """
    _broadcast(list(module.parameters()) + list(module.buffers()), group)


def grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, set to zeros first when this rank's backward did not reach ``p``.

    Every rank must join every collective in the same order, so a parameter this rank did
    not use contributes zeros rather than being skipped.
    """
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


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
        g = grad_or_zeros(p)
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])    # (n,): every gradient, end to end
        comm.all_reduce(flat, group=group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            torch.div(part.view_as(g), N, out=g)   # divide and copy back in one pass


class _DDP(nn.Module):
    """What every variant shares: the conventions above; subclasses say how to average."""

    def __init__(self, module: nn.Module, group=None, broadcast_buffers: bool = True):
        super().__init__()   # no communication yet: every argument is checked first
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.broadcast_buffers = broadcast_buffers
        require(self, "broadcast_buffers", isinstance(broadcast_buffers, bool), "True or False")
        _refuse_sparse_gradients(module)
        self.module = module
        self.group = group
        self.world_size = dist.get_world_size(group)
        broadcast_module(module, group)
        # parameters() already yields a tied tensor once; dedupe by identity to be explicit.
        self.params = list({id(p): p for p in module.parameters() if p.requires_grad}.values())
        self._sync_enabled = True    # False inside no_sync()
        self._grad_sync = True       # whether the latest forward's backward must be averaged
        self.events: list[dict] | None = None   # set to [] to record communication intervals
        self._recording: list = []   # the callbacks that append async events, still to run

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():   # like DDP, the forward decides whether backward syncs
            self._grad_sync = self._sync_enabled
            if self._grad_sync and self.broadcast_buffers:   # rank 0's running statistics
                _broadcast(self.module.buffers(), self.group)   # one broadcast per buffer
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

    def _all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        """Sum ``tensor`` in place; record when it ran. The caller divides where the sum
        lands: one pass over the bytes fewer than dividing first, as DDP does."""
        start = time.time()
        work = comm.all_reduce(tensor, group=self.group, async_op=async_op)
        if self.events is not None:
            events, nbytes = self.events, comm.nbytes(tensor)
            if async_op:   # the future completes on gloo's thread: the true end of the transfer
                self._recording.append(work.get_future().then(lambda _: events.append(
                    {"kind": "all_reduce", "start": start, "end": time.time(), "bytes": nbytes})))
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
            self._all_reduce(grad_or_zeros(p))
            p.grad.div_(self.world_size)


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


class _Overlapped(_DDP):
    """All-reduces launched from backward hooks, in one fixed order of buckets.

    ``register_post_accumulate_grad_hook`` fires once per parameter when backward has
    accumulated its whole gradient (once for a tied parameter, after both uses). gloo and
    NCCL pair collectives by the order they are issued, but ranks whose forwards took
    different branches finish different gradients in different orders. So a bucket is
    launched only once it *and every bucket before it* are complete: the order is fixed, the
    same on every rank. Gradients this rank's backward never reached are zero-filled in
    :meth:`finish_gradient_synchronization` and the rest launched there, in the same order.
    When every rank uses every parameter, the fixed order (reverse registration) is roughly
    backward's own, and communication still overlaps backward.
    """

    def __init__(self, module: nn.Module, group, broadcast_buffers: bool, bucket_of):
        super().__init__(module, group, broadcast_buffers)
        self.buckets: list[list[torch.Tensor]] = bucket_of(self.params[::-1])
        self._bucket = {id(p): b for b, ps in enumerate(self.buckets) for p in ps}
        self._reset()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _reset(self) -> None:
        self._pending = [len(ps) for ps in self.buckets]   # gradients each bucket awaits
        self._ready: set[int] = set()                      # parameters whose gradient is final
        self._next = 0                                     # next bucket to launch
        self._works: list = []

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._grad_sync:
            self._mark_ready(p)

    def _mark_ready(self, p: torch.Tensor) -> None:
        if id(p) in self._ready:
            raise RuntimeError("a gradient became ready twice before "
                               "finish_gradient_synchronization(): two backward passes were "
                               "synchronized at once; accumulate micro-batches inside no_sync()")
        self._ready.add(id(p))
        self._pending[self._bucket[id(p)]] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._works.append(self._launch(self._next))
            self._next += 1

    def finish_gradient_synchronization(self) -> None:
        if not self._grad_sync:
            return
        for p in self.params:   # not reached by this rank's backward: zeros, same order
            if id(p) not in self._ready:
                grad_or_zeros(p)
                self._mark_ready(p)
        for b, work in enumerate(self._works):
            work.wait()
            self._unpack(b)
        # A work's callback may run on gloo's thread after wait() returns: wait for the events.
        torch.futures.wait_all(self._recording)
        self._recording.clear()
        self._reset()

    def _launch(self, b: int):
        """Start the all-reduce of bucket ``b``; return its work handle."""
        raise NotImplementedError

    def _unpack(self, b: int) -> None:
        """Average bucket ``b``'s summed gradients into ``.grad`` (once it has arrived)."""


class OverlapDDP(_Overlapped):
    """Launch each parameter's all-reduce asynchronously as soon as its gradient is final.

    The last layers' gradients travel while the first layers' are still being computed.
    Each parameter is its own bucket, launched in reverse registration order (see
    :class:`_Overlapped` for why the order is fixed).
    """

    def __init__(self, module: nn.Module, group=None, broadcast_buffers: bool = True):
        super().__init__(module, group, broadcast_buffers,
                         bucket_of=lambda params: [[p] for p in params])

    def _launch(self, b: int):
        return self._all_reduce(self.buckets[b][0].grad, async_op=True)

    def _unpack(self, b: int) -> None:
        self.buckets[b][0].grad.div_(self.world_size)


class BucketedDDP(_Overlapped):
    """Overlap with buckets: what ``torch.nn.parallel.DistributedDataParallel`` does.

    Parameters are grouped, in reverse registration order (roughly the order backward
    produces their gradients), into buckets of about ``bucket_size_mb`` of one dtype and
    device. Once a bucket's gradients are all final, they are copied into its flat buffer
    and it is all-reduced asynchronously, strictly in bucket order so that every rank issues
    the same collectives in the same order. As in DDP, a bucket closes once it holds
    ``bucket_size_mb`` (so it can exceed it by one tensor), and the first closes at 1 MiB.
    Small buckets start communicating earlier; large ones pay fewer latencies (Li et al.
    2020, section 3.2.3 and figure 7).

    Args:
        module: the model, the same architecture on every rank.
        group: the process group (None: the world).
        bucket_size_mb: the largest bucket, in MiB (DDP's ``bucket_cap_mb``, default 25).
        broadcast_buffers: broadcast rank 0's buffers at every synchronized forward.
    """

    def __init__(self, module: nn.Module, group=None, bucket_size_mb: float = 25.0,
                 broadcast_buffers: bool = True):
        self.bucket_size_mb = bucket_size_mb   # checked before the base class communicates
        require(self, "bucket_size_mb", is_number(bucket_size_mb) and bucket_size_mb > 0,
                "a number > 0 (MiB)")
        super().__init__(module, group, broadcast_buffers, bucket_of=self._fill_buckets)
        # Flat buffers on the parameters' device (NCCL takes only GPU tensors).
        self._flat = [torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype,
                                  device=ps[0].device) for ps in self.buckets]

    def _fill_buckets(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        # As DDP: a bucket closes once it holds bucket_size_mb; the first one (the last
        # layers, whose gradients are ready first) closes at 1 MiB, so traffic starts early.
        caps = [min(1.0, self.bucket_size_mb) * 2 ** 20, self.bucket_size_mb * 2 ** 20]
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for p in params:
            if buckets[-1] and (p.dtype, p.device) != (buckets[-1][0].dtype, buckets[-1][0].device):
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel() * p.element_size()
            if size >= caps[min(len(buckets) - 1, 1)]:
                buckets.append([])
                size = 0
        return [ps for ps in buckets if ps]

    def _launch(self, b: int):
        torch.cat([p.grad.reshape(-1) for p in self.buckets[b]], out=self._flat[b])   # (n_b,)
        return self._all_reduce(self._flat[b], async_op=True)

    def _unpack(self, b: int) -> None:
        parts = self._flat[b].split([p.numel() for p in self.buckets[b]])
        for p, part in zip(self.buckets[b], parts):
            torch.div(part.view_as(p), self.world_size, out=p.grad)   # average, copy back


VARIANTS = {"naive": NaiveDDP, "flat": FlatDDP, "overlap": OverlapDDP, "bucketed": BucketedDDP}
"""The gradient-synchronization variants by name, naive to optimized."""


def wrap(module: nn.Module, variant: str = "bucketed", group=None,
         bucket_size_mb: float = 25.0, broadcast_buffers: bool = True) -> _DDP:
    """Wrap ``module`` in the data-parallel ``variant`` (a key of :data:`VARIANTS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not known; use one of {sorted(VARIANTS)}")
    if variant == "bucketed":
        return BucketedDDP(module, group, bucket_size_mb=bucket_size_mb,
                           broadcast_buffers=broadcast_buffers)
    return VARIANTS[variant](module, group, broadcast_buffers=broadcast_buffers)


def _broadcast(tensors, group) -> None:
    """Overwrite every tensor with the group's rank 0's, in place, one broadcast each."""
    src = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in tensors:
            comm.broadcast(t.data, src=src, group=group)


def _refuse_sparse_gradients(module: nn.Module) -> None:
    for name, m in module.named_modules():
        if getattr(m, "sparse", False) is True:
            raise ValueError(f"{name or type(m).__name__} ({type(m).__name__}(sparse=True)) "
                             "produces sparse gradients, which these wrappers do not average; "
                             "use sparse=False (dense gradients), or torch's "
                             "DistributedDataParallel")
