"""PowerSGD: send a rank-r sketch of every gradient matrix, and keep what it missed.

Vogels, Karimireddy and Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization" (arXiv 1905.13727), algorithm 1. A layer's gradient is a matrix M
of n x m. Instead of all-reducing its nm numbers, every rank r runs one step of power
iteration on its own error-corrected ``M_r`` against a Q shared by all ranks::

    M_r = grad_r + e_r                     error feedback: add what was not sent before
    P_r = M_r Q;        P = sum_r P_r      all-reduce n x r numbers
    P   = orthogonalize(P)                 Gram-Schmidt on its r columns
    Q_r = M_r^T P;      Q = (1/p) sum_r Q_r    all-reduce m x r numbers
    M^  = P Q^T = P P^T mean_r(M_r)        the same on every rank: the step's gradient
    e_r = M_r - M^                         what this rank's gradient still owes

P and Q are *sums* of the ranks' contributions (``M_r -> M_r Q`` is linear): unlike top-k
or sign, PowerSGD is all-reducible, no all-gather. **Warm start**: each step starts from
the last Q, one power-iteration step per SGD step. Vectors (biases) and matrices too small
for compression to pay (``(n + m) r · min_compression_rate >= nm``) go uncompressed.

It follows PyTorch's ``ddp_comm_hooks.powerSGD_hook`` so that the two run side by side
(:func:`train_torch_hook`) and agree to the bit: parameters in reverse order (DDP's one
bucket, under 1 MiB; more buckets would each draw a Q), matrices grouped by shape,
``tensor.view(n, -1)`` as the matrix, the first Q from ``torch.randn`` seeded by
``numpy.random.RandomState(seed).randint(10**9)``, Gram-Schmidt for r <= 2 and QR above,
products as ``bmm`` (its rounding differs from ``mm`` on some shapes), each matrix, P and Q
at the offset the hook's buffers give it (a BLAS rounds differently when a matrix is not
16-byte aligned: it does on AVX2 machines), and an error kept for the uncompressed tensors
too (their deviation from the average, zero on average over ranks).

Communication per step (alpha-beta model, p ranks, ring all-reduces): three, of the
uncompressed tensors (4 n_u bytes), the Ps and the Qs (4 r sum n_i, 4 r sum m_i bytes),
``6(p-1) alpha + 2(p-1)/p · 4(n_u + r sum (n_i + m_i)) beta``, against one of 4 sum n_i m_i
bytes for the plain all-reduce (:func:`bytes_per_step`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require
from distlab.communication import alpha_beta
from distlab.communication_efficient.local_training import (flat, one_thread, rank_and_size,
                                                            with_data)
from distlab.data_parallel.ddp import average_gradients, grad_or_zeros
from distlab.communication_efficient.powersgd_state import (PowerSGDState, bucket_offsets,
                                                             split_parameters)
from distlab.metrics import report
from distlab.problems.workloads import Workload

WORKLOAD = Workload(model="mlp", hidden=32, depth=2, batch_size=32, lr=0.3, num_steps=40)
"""An MLP of two hidden layers of 32 on the digits: three matrices to compress."""


@dataclass(frozen=True)
class PowerSGDConfig:
    """Data-parallel SGD whose gradients are averaged by PowerSGD after ``start_iter`` steps;
    each rank takes its slice of the workload's global batch (``batch_size`` must divide)."""
    workload: Workload = field(default_factory=lambda: WORKLOAD)
    """What is trained (any :class:`~distlab.problems.workloads.Workload`)."""
    world_size: int = 2
    """Processes (ranks), 1 to 64."""
    matrix_rank: int = 1
    """r, the rank of the approximation (the hook's ``matrix_approximation_rank``), 1 to 1024."""
    start_iter: int = 10
    """Steps of plain all-reduce before compressing (the hook's ``start_powerSGD_iter``)."""
    min_compression_rate: float = 2.0
    """Compress a matrix only if nm > (n + m) r times this (the hook's default 2), > 0."""
    error_feedback: bool = True
    """Carry what the sketch missed into the next step (the hook's ``use_error_feedback``)."""
    warm_start: bool = True
    """Start each step's power iteration from the last Q (else from a fresh random Q)."""
    epsilon: float = 0.0
    """Added to each column norm in Gram-Schmidt (the hook's ``orthogonalization_epsilon``)."""

    def __post_init__(self):
        require(self, "workload", isinstance(self.workload, Workload), "a Workload")
        require(self, "world_size", is_int(self.world_size)
                and 1 <= self.world_size <= launcher.MAX_WORLD_SIZE,
                f"integers 1..{launcher.MAX_WORLD_SIZE}")
        require(self, "matrix_rank", is_int(self.matrix_rank) and 1 <= self.matrix_rank <= 1024,
                "integers 1..1024")
        require(self, "start_iter", is_int(self.start_iter) and self.start_iter >= 0,
                "integers >= 0")
        require(self, "min_compression_rate", is_number(self.min_compression_rate)
                and self.min_compression_rate > 0, "a number > 0")
        for name in ("error_feedback", "warm_start"):
            require(self, name, isinstance(getattr(self, name), bool), "True or False")
        require(self, "epsilon", is_number(self.epsilon) and self.epsilon >= 0, "a number >= 0")
        require(self, "workload", self.workload.batch_size % self.world_size == 0,
                f"a workload whose batch_size ({self.workload.batch_size}) is a multiple of "
                f"world_size={self.world_size}")


def train(config: PowerSGDConfig, group=None, *, record=report) -> dict:
    """The worker: data-parallel SGD, gradients averaged by PowerSGD from ``start_iter`` on.

    Records ``step``, ``loss`` (this rank's slice's) and ``bytes_sent`` (cumulative). Returns
    ``{"loss", "bytes_sent", "step_time", "params"}``: this rank's loss, bytes sent and
    seconds at every step, and the final parameters flattened (the same on every rank)."""
    rank, p = rank_and_size(config, group)
    model = config.workload.build_model().to(launcher.device())
    params = [w for w in model.parameters() if w.requires_grad]
    matrices, vectors = split_parameters(params, config)
    state = PowerSGDState([w.shape for w in matrices], config, bucket_offsets(params, matrices))

    def average(step):
        if step < config.start_iter:
            average_gradients(params, group)
            return
        P = state.project([grad_or_zeros(w) for w in matrices],
                          [grad_or_zeros(w) for w in vectors])   # adds their errors
        average_gradients(vectors, group)               # the uncompressed tensors: one message
        comm.all_reduce(P, group=group)
        Q = state.power_step(P)
        comm.all_reduce(Q, group=group)
        for w, m_hat in zip(matrices, state.decompress(Q, p, [w.grad for w in vectors])):
            w.grad.copy_(m_hat.view_as(w))

    return _train_loop(config, model, rank, p, average, record)


def reference(config: PowerSGDConfig) -> dict:
    """One process plays the ``world_size`` ranks: each one's gradient on its slice, its
    own error and Q, the sums that the all-reduces would make. :func:`train` must equal it.
    Returns ``{"loss": [mean over ranks of each step's loss], "params": [...]}``."""
    workload, p = config.workload, config.world_size
    with one_thread():
        model = workload.build_model()
        params = [w for w in model.parameters() if w.requires_grad]
        optimizer = workload.optimizer(params)
        matrices, vectors = split_parameters(params, config)
        offsets = bucket_offsets(params, matrices)
        states = [PowerSGDState([w.shape for w in matrices], config, offsets) for _ in range(p)]
        losses = []
        for step, (X_all, y_all) in enumerate(workload.batches()):
            grads, step_loss = [], 0.0
            for r in range(p):                            # rank r's backward, on its slice
                X, y = X_all.chunk(p)[r], y_all.chunk(p)[r]
                optimizer.zero_grad()
                loss = workload.loss(model(X), y)
                loss.backward()
                step_loss += loss.item() / p
                grads.append({id(w): grad_or_zeros(w).clone() for w in params})
            compress = step >= config.start_iter
            if compress:                # (this adds every rank's errors to its vectors first)
                P = torch.stack([s.project([g[id(w)] for w in matrices],
                                           [g[id(w)] for w in vectors])
                                 for s, g in zip(states, grads)]).sum(0)
            mean = {id(w): torch.stack([g[id(w)] for g in grads]).sum(0) / p for w in params}
            if compress:
                Q = torch.stack([s.power_step(P.clone()) for s in states]).sum(0)
                m_hats = [s.decompress(Q.clone(), p, [mean[id(w)] for w in vectors])
                          for s in states][0]             # the same on every rank
                mean.update({id(w): m.view_as(w) for w, m in zip(matrices, m_hats)})
            for w in params:
                w.grad.copy_(mean[id(w)])
            optimizer.step()
            losses.append(step_loss)
        return {"loss": losses, "params": flat(params).tolist()}


def start(config: PowerSGDConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes; return the :class:`~distlab.Run`."""
    return launcher.start(train, config.world_size, with_data(config), **launch)


def run(config: PowerSGDConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def train_torch_hook(config: PowerSGDConfig, group=None, *, record=report) -> dict:
    """:func:`train` by PyTorch's ``DistributedDataParallel`` and its ``powerSGD_hook``, same
    model, seed, slices and settings; the hook's all-reduces booked at model bytes. It needs
    ``start_iter >= 2`` (DDP rebuilds its buckets after the first step)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook
    from torch.nn.parallel import DistributedDataParallel

    rank, p = rank_and_size(config, group)
    ddp = DistributedDataParallel(config.workload.build_model().to(launcher.device()),
                                  process_group=group)
    state = hook.PowerSGDState(
        process_group=group, matrix_approximation_rank=config.matrix_rank,
        start_powerSGD_iter=config.start_iter,
        min_compression_rate=config.min_compression_rate,
        use_error_feedback=config.error_feedback, warm_start=config.warm_start,
        orthogonalization_epsilon=config.epsilon, random_seed=config.workload.seed)
    ddp.register_comm_hook(state, hook.powerSGD_hook)
    with _counted_all_reduces():                 # the hook averages inside backward
        return _train_loop(config, ddp, rank, p, lambda step: None, record)


def start_torch_hook(config: PowerSGDConfig, **launch) -> launcher.Run:
    """Start :func:`train_torch_hook` on ``config.world_size`` processes."""
    return launcher.start(train_torch_hook, config.world_size, with_data(config), **launch)


def bytes_per_step(config: PowerSGDConfig) -> dict:
    """Model bytes one rank sends per step, ``{"all_reduce", "powersgd"}``: before and from
    ``start_iter`` (``2(p-1)/p`` of each message, rounded down as the ledger books it)."""
    params = [w for w in config.workload.build_model().parameters() if w.requires_grad]
    matrices, vectors = split_parameters(params, config)
    state = PowerSGDState([w.shape for w in matrices], config)
    messages = [sum(w.numel() for w in vectors),                          # uncompressed
                sum(n * r for (n, _), r in zip(state.shapes, state.ranks)),  # the Ps
                sum(m * r for (_, m), r in zip(state.shapes, state.ranks))]  # the Qs
    p = config.world_size
    return {"all_reduce": alpha_beta.ring_all_reduce_bytes(4 * sum(w.numel() for w in params), p),
            "powersgd": sum(alpha_beta.ring_all_reduce_bytes(4 * n, p) for n in messages)}


def _train_loop(config: PowerSGDConfig, model, rank: int, p: int, average, record) -> dict:
    """What :func:`train` and :func:`train_torch_hook` share: every step, this rank's slice,
    backward, ``average(step)`` (the gradients' averaging), the optimizer's step."""
    workload = config.workload
    optimizer = workload.optimizer([w for w in model.parameters() if w.requires_grad])
    losses, sent, seconds = [], [], []
    for step, (X, y) in enumerate(workload.batches()):
        X, y = X.chunk(p)[rank].to(launcher.device()), y.chunk(p)[rank].to(launcher.device())
        before, t0 = comm.ledger().totals()["bytes_sent"], time.perf_counter()
        optimizer.zero_grad()
        loss = workload.loss(model(X), y)
        loss.backward()
        average(step)
        optimizer.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
        sent.append(comm.ledger().totals()["bytes_sent"] - before)
        record(step=step, loss=losses[-1], bytes_sent=sum(sent))
    return {"loss": losses, "bytes_sent": sent, "step_time": seconds,
            "params": flat(model.parameters()).tolist()}


@contextlib.contextmanager
def _counted_all_reduces():
    """Book this process's ``torch.distributed.all_reduce`` calls (the hook's) in the ledger
    at model bytes, as :func:`distlab.comm.all_reduce` would."""
    original = dist.all_reduce

    def counted(tensor, *args, group=None, **kwargs):
        vol = alpha_beta.ring_all_reduce_bytes(comm.nbytes(tensor), dist.get_world_size(group))
        comm.ledger().add("all_reduce", vol, vol, 0.0)
        return original(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counted
    try:
        yield
    finally:
        dist.all_reduce = original
