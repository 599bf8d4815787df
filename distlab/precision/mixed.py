"""Mixed-precision data-parallel training: fp32, bf16 autocast, fp16 with master weights.

Three ways to train the same :class:`~distlab.problems.workloads.Workload`, each on N real
ranks that average their gradients with :func:`distlab.data_parallel.ddp.average_gradients`:

* ``"fp32"``: everything in float32, the baseline.
* ``"bf16"``: ``torch.autocast(dtype=torch.bfloat16)``. The weights, their gradients and
  the optimizer stay fp32; autocast runs matmuls (and the ops that tolerate it) in bf16.
  bf16 has fp32's 8 exponent bits, so gradients neither underflow nor overflow more than in
  fp32: no loss scaling (Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning").
* ``"fp16"``: Micikevicius et al. 2018 ("Mixed Precision Training", arXiv 1710.03740,
  section 3): the model's weights *are* fp16, forward and backward run in fp16, the
  gradients are all-reduced in fp16; an fp32 copy of every weight (the *master weights*,
  section 3.1) is what the optimizer steps, since an update smaller than 2^-11 of a weight
  vanishes when added in fp16; the fp16 weights are then refreshed from the masters. The
  loss is scaled (section 3.2, :class:`~distlab.precision.loss_scaling.DynamicLossScaler`)
  and a step whose gradients overflowed is skipped on every rank.

Memory per parameter, model states only (ZeRO's accounting, Rajbhandari et al. 2020, 3.1):
fp32 and bf16 autocast keep 4 + 4 + K bytes (K = 8 for Adam); fp16 keeps 2 + 2 + 12 (fp16
weights and gradients; fp32 masters, m and v), which is ZeRO's "2 + 2 + K" with K = 12.

Communication per step, in the alpha-beta model: one all-reduce of the gradients,
2(N-1)·alpha + 2(N-1)/N·n·beta, with n = 4Ψ bytes in fp32 and bf16 autocast and n = 2Ψ in
fp16, plus, in fp16, one all-reduce MAX of one float for the overflow flag.

On a CPU every op used here exists in fp16 and bf16; fp16 matmuls are *slower* than fp32
there (no fp16 units: measured about 6x on a 64 x 64 matmul on this machine's cores), so
this is about numerics and bytes, not speed.

The verbs of every algorithm in distlab: :func:`train` runs on each rank, :func:`reference`
is the single-process run it must equal, :func:`start` returns a :class:`~distlab.Run`,
:func:`run` waits for it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from distlab import launcher
from distlab.checks import is_int, is_number, require
from distlab.data_parallel.ddp import average_gradients
from distlab.launcher import MAX_WORLD_SIZE, Run
from distlab.metrics import report
from distlab.precision.loss_scaling import DynamicLossScaler
from distlab.problems.workloads import Workload

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Data-parallel training in one of three precisions."""

    workload: Workload = field(default_factory=lambda: Workload(
        model="mlp", hidden=16, batch_size=32, lr=0.01, optimizer_name="adam", num_steps=20))
    """What is trained; ``batch_size`` is the global batch, split equally over the ranks."""
    world_size: int = 2
    """Number of ranks; it divides ``workload.batch_size``."""
    precision: str = "bf16"
    """One of ``PRECISIONS``: ``"fp32"``, ``"bf16"`` (autocast), ``"fp16"`` (fp16
    weights, fp32 master weights, dynamic loss scaling)."""
    init_scale: float = 2.0 ** 16
    """fp16 only: the loss scaler's first scale."""
    growth_interval: int = 2000
    """fp16 only: clean steps before the scale doubles."""

    def __post_init__(self):
        require(self, "workload", isinstance(self.workload, Workload),
                "a distlab.problems.workloads.Workload")
        require(self, "world_size",
                is_int(self.world_size) and 1 <= self.world_size <= MAX_WORLD_SIZE
                and self.workload.batch_size % self.world_size == 0,
                f"an int in 1..{MAX_WORLD_SIZE} dividing workload.batch_size="
                f"{self.workload.batch_size}")
        require(self, "precision", self.precision in PRECISIONS, f"one of {PRECISIONS}")
        require(self, "init_scale", is_number(self.init_scale) and self.init_scale > 0,
                "a number > 0")
        require(self, "growth_interval",
                is_int(self.growth_interval) and self.growth_interval >= 1, "an int >= 1")


def train(config: MixedPrecisionConfig, group=None) -> dict:
    """Train on this rank's share of every global batch; call it on every rank of ``group``.

    Reports, each step, ``loss`` (this rank's share) and, in fp16, ``loss_scale``.

    Returns:
        ``{"losses"}`` this rank's loss per step, ``"params"`` the final fp32 weights (the
        masters in fp16) as one vector, ``"scales"`` the loss scale used at each step and
        ``"skipped"`` whether each step was skipped (fp16; empty otherwise).
    """
    if dist.get_world_size(group) != config.world_size:
        raise ValueError(f"config.world_size={config.world_size} but the group has "
                         f"{dist.get_world_size(group)} ranks")
    return _train(config, dist.get_rank(group), config.world_size, group)


def reference(config: MixedPrecisionConfig) -> dict:
    """The same training on one process and the whole global batch: what :func:`train`
    must equal (to the rounding of the chosen precision)."""
    return _train(config, 0, 1, None)


def start(config: MixedPrecisionConfig, **launch) -> Run:
    """Start :func:`train` on ``config.world_size`` ranks; ``launch`` goes to the launcher."""
    if not isinstance(config, MixedPrecisionConfig):
        raise TypeError(f"config must be a MixedPrecisionConfig, got {type(config).__name__}")
    config = replace(config, workload=config.workload.loaded())
    return launcher.start(train, config.world_size, config, **launch)


def run(config: MixedPrecisionConfig, **launch) -> list[dict]:
    """:func:`start` and wait: the per-rank results of :func:`train`, in rank order."""
    return start(config, **launch).result()


# -- the loop --------------------------------------------------------------------------

def _train(config: MixedPrecisionConfig, rank: int, world_size: int, group) -> dict:
    workload = config.workload.loaded()
    model = workload.build_model()
    fp16 = config.precision == "fp16"
    if fp16:
        model = model.half()
        trainable = [p for p in model.parameters() if p.requires_grad]
        masters = master_weights(trainable)
        scaler = DynamicLossScaler(config.init_scale, growth_interval=config.growth_interval)
    else:
        trainable = masters = [p for p in model.parameters() if p.requires_grad]
    optimizer = workload.optimizer(masters)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())
    losses, scales, skipped = [], [], []
    for step, (X, y) in enumerate(workload.batches()):
        X, y = X.chunk(world_size)[rank], y.chunk(world_size)[rank]   # this rank's share
        if fp16 and X.is_floating_point():
            X = X.half()
        optimizer.zero_grad()
        for p in trainable:
            p.grad = None
        with autocast:
            out = model(X)
        loss = workload.loss(out.float(), y)        # the loss itself in fp32
        values = {"loss": loss.item()}
        if not fp16:
            loss.backward()
            if world_size > 1:
                average_gradients(trainable, group)
            optimizer.step()
        else:
            scales.append(values.setdefault("loss_scale", scaler.scale_value))
            scaler.scale(loss).backward()
            if world_size > 1:
                average_gradients(trainable, group)             # in fp16: half the bytes
            skipped.append(fp16_step(optimizer, scaler, trainable, masters,
                                     group if world_size > 1 else None))
        losses.append(values["loss"])
        report(step=step, **values)
    weights = masters if fp16 else list(model.parameters())
    return {"losses": losses, "params": torch.cat([p.detach().reshape(-1) for p in weights]),
            "scales": scales, "skipped": skipped}


def master_weights(params) -> list[torch.Tensor]:
    """fp32 copies of ``params`` for the optimizer to step (section 3.1), one leaf each."""
    return [p.detach().float().requires_grad_(True) for p in params]


def gradients_to_masters(params, masters) -> None:
    """Each master's fp32 ``.grad`` from its 16-bit parameter's (None stays None)."""
    for p, m in zip(params, masters):
        m.grad = None if p.grad is None else p.grad.float()


@torch.no_grad()
def masters_to_params(params, masters) -> None:
    """Round the stepped masters into the 16-bit parameters and free the masters'
    gradients: they exist only during the step."""
    for p, m in zip(params, masters):
        p.copy_(m)
        m.grad = None


def fp16_step(optimizer, scaler: DynamicLossScaler, params, masters, group=None) -> bool:
    """One step of fp16 training with master weights; returns True if it was skipped.

    The fp16 gradients are copied into the masters' fp32 gradients, unscaled and checked
    there (every rank of ``group`` agreeing on an overflow); unless one overflowed the
    optimizer steps the masters and the fp16 weights are refreshed from them. The masters'
    gradients are freed afterwards: they exist only during the step.
    """
    gradients_to_masters(params, masters)
    found_inf = scaler.step(optimizer, masters, group)
    scaler.update(found_inf)
    if not found_inf:
        masters_to_params(params, masters)
    for m in masters:
        m.grad = None
    return found_inf
