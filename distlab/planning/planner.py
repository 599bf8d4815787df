"""The planner: every data x tensor x pipeline x ZeRO plan, its memory and step time, ranked.

Given a :class:`~distlab.planning.cluster.ModelSpec` and a
:class:`~distlab.planning.cluster.Cluster`, :func:`enumerate_plans` lists every
factorisation ``dp·tp·pp = devices`` with ZeRO stages 0..3 and microbatch counts dividing
each replica's batch; :func:`predict` gives a plan's memory per rank and step time from
distlab's own models; :func:`rank_plans` keeps the plans that fit, fastest first.

**Memory per rank.** Model states (Rajbhandari et al. 2020, Figure 1) of the rank's
``Ψ/(tp·pp)`` parameters, ZeRO-sharded over ``dp``
(:func:`distlab.sharding.memory.predicted_bytes` in fp32,
:func:`~distlab.sharding.memory.paper_bytes` with K = 12 in mixed precision), plus the
activations of one microbatch of ``L/pp`` layers (Korthikanti et al. 2022, eq. 2 and 3;
:func:`distlab.memory.activations.activation_bytes`) times the microbatches a 1F1B stage
keeps in flight, ``min(m, pp)``.

**Step time** (no overlap of communication with compute, so an upper bound):

* compute ``6·Ψ·tokens / flops`` (forward 2Ψ, backward 4Ψ FLOPs per token; Kaplan et al.
  2020, section 2.1) for the replica's tokens, split ``tp·pp`` ways, on the slowest rank;
* a fixed cost per pass: each microbatch's forward and backward through the stage's layers
  pays the device's ``overhead`` (the whole model's per-operation cost, Python, autograd
  and kernel launches, that does not grow with the batch;
  :class:`~distlab.planning.cluster.Device`) times the stage's share ``1/pp`` of the
  layers, on every tp rank alike;
* the pipeline bubble: each microbatch's work on a stage (its compute and its
  tensor-parallel all-reduces) stretched by ``(m+p-1)/m``, i.e. idle a fraction
  ``(p-1)/(m+p-1)`` (Narayanan et al. 2021, eq. 1);
* tensor parallel: 4 ring all-reduces per layer and microbatch (2 forward, 2 backward;
  Shoeybi et al. 2019, section 3) of ``b·s·h`` values over ``tp`` ranks
  (:func:`tensor_parallel_all_reduces`);
* pipeline: per microbatch each stage sends one activation forward and one gradient back,
  each as :mod:`distlab.model_parallel.pipeline` sends it: a header of ``HEADER`` int64s
  (dtype and shape), then the ``b·s·h`` values (``4m`` messages per stage,
  :func:`pipeline_messages` along a pp line);
* data parallel, once per step over ``dp`` ranks on the gradients of ``Ψ/(tp·pp)`` values:
  a ring all-reduce (ZeRO 0, 1), a reduce-scatter plus an all-gather of the parameters
  (ZeRO 2: the same volume), or a reduce-scatter plus an all-gather before each
  microbatch's forward and backward (ZeRO 3: 1.5x the volume at m = 1; ZeRO paper 7.2).

Every message's time is :mod:`distlab.communication.alpha_beta`'s ``a·alpha + b·beta``
on the link its group uses (:meth:`Cluster.link`, crowded when ranks outnumber cores):
ranks are laid out tp fastest, then dp, then pp (Megatron's order), so a tp group fits in
a node when ``tp <= devices_per_node``.

**Heterogeneous devices.** With ``heterogeneous=True`` each data-parallel replica gets a
share of the batch in proportion to its speed (its slowest rank's FLOP/s;
:func:`distlab.heterogeneous.speeds.proportional_batches`); without it the shares are
equal. Either way the step takes as long as the slowest replica.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from distlab.checks import is_int, require, require_arg
from distlab.communication import alpha_beta
from distlab.heterogeneous.speeds import equal_batches, proportional_batches
from distlab.memory.activations import activation_bytes
from distlab.model_parallel.pipeline import HEADER, bubble_fraction
from distlab.planning.cluster import Cluster, ModelSpec
from distlab.sharding import memory

MEMORY_PARTS = ("params", "grads", "optimizer_state", "activations")
TIME_PARTS = ("compute", "bubble", "tensor_parallel", "pipeline", "data_parallel")
HEADER_BYTES = HEADER * 8
"""Bytes of the header :mod:`distlab.model_parallel.pipeline` sends before each tensor."""


@dataclass(frozen=True)
class Plan:
    """How to split the training: replicas, tensor shards, pipeline stages, ZeRO stage."""
    dp: int = 1
    """Data-parallel replicas."""
    tp: int = 1
    """Ranks sharing each weight matrix (Megatron tensor parallelism)."""
    pp: int = 1
    """Pipeline stages."""
    zero_stage: int = 0
    """0 (replicated) to 3 (parameters, gradients and optimizer state sharded over dp)."""
    microbatches: int = 1
    """Microbatches m each replica's batch is cut into (pipelining, or accumulation)."""

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "microbatches"):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= 1, "an int >= 1")
        require(self, "zero_stage", is_int(self.zero_stage) and 0 <= self.zero_stage <= 3,
                "0, 1, 2 or 3")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def __str__(self):
        return (f"dp={self.dp} tp={self.tp} pp={self.pp} zero={self.zero_stage} "
                f"m={self.microbatches}")


@dataclass(frozen=True)
class Prediction:
    """A plan's predicted memory per rank and step time, in parts."""
    plan: Plan
    memory_per_rank: dict = field(default_factory=dict)
    """Bytes on the fullest rank, by ``MEMORY_PARTS``."""
    step_time: dict = field(default_factory=dict)
    """Seconds of one step on the slowest rank, by ``TIME_PARTS``."""
    memory_limit: float = math.inf
    """The smallest device memory, in bytes."""
    batch_shares: tuple = ()
    """Sequences per step each data-parallel replica gets."""

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory_per_rank.values())

    @property
    def seconds(self) -> float:
        return sum(self.step_time.values())

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.memory_limit

    @property
    def why(self) -> str:
        """Why the plan is dropped ("" when it fits)."""
        if self.fits:
            return ""
        return (f"needs {self.memory_bytes / 1e9:.3g} GB per rank, the device has "
                f"{self.memory_limit / 1e9:.3g} GB")


class Ranking(NamedTuple):
    """:func:`rank_plans`' answer."""
    fit: list
    """Predictions of the plans that fit, fastest first."""
    dropped: list
    """Predictions of those that do not (``prediction.why`` says by how much)."""


def enumerate_plans(model: ModelSpec, cluster: Cluster) -> list[Plan]:
    """Every plan for ``model`` on all of ``cluster``'s devices: ``dp·tp·pp = devices``,
    ``tp`` dividing the heads, ``pp`` at most the layers, ``dp`` dividing the batch, ZeRO
    stages 0..3 (only 0 at dp = 1, where all four are the same) and every ``m`` dividing
    the replica's batch."""
    _require(model, cluster)
    n, plans = cluster.num_devices, []
    for tp in _divisors(n):
        for pp in _divisors(n // tp):
            dp = n // (tp * pp)
            if model.num_heads % tp or pp > model.num_layers or model.global_batch % dp:
                continue
            for zero_stage in range(4 if dp > 1 else 1):
                for m in _divisors(model.global_batch // dp):
                    plans.append(Plan(dp, tp, pp, zero_stage, m))
    return plans


def rank_plans(model: ModelSpec, cluster: Cluster, heterogeneous: bool = False) -> Ranking:
    """The plans that fit, fastest first, and the ones dropped with why.

    Example: ``rank_plans(ModelSpec(24, 2048, 16, 2048, 50257, 512),
    Cluster((16, Device(80e9, 300e12)))).fit[0].plan``.
    """
    # By speed, a slow replica's share can be smaller than a plan's microbatch count: skip.
    predictions = [predict(p, model, cluster, heterogeneous)
                   for p in enumerate_plans(model, cluster)
                   if not heterogeneous
                   or p.microbatches <= min(_batch_shares(p, model, cluster, True))]
    fit = sorted((p for p in predictions if p.fits), key=lambda p: (p.seconds, p.memory_bytes))
    dropped = sorted((p for p in predictions if not p.fits), key=lambda p: p.memory_bytes)
    return Ranking(fit, dropped)


def predict(plan: Plan, model: ModelSpec, cluster: Cluster,
            heterogeneous: bool = False) -> Prediction:
    """``plan``'s memory per rank and step time (see the module's docstring).

    Example: ``predict(Plan(dp=2, tp=2), model, cluster).seconds``.
    """
    _require(model, cluster)
    require_arg("plan", plan, isinstance(plan, Plan) and plan.world_size == cluster.num_devices,
                f"a Plan with dp*tp*pp = {cluster.num_devices} (the cluster's devices)")
    require_arg("plan.tp", plan.tp, model.num_heads % plan.tp == 0,
                f"a divisor of num_heads={model.num_heads}")
    require_arg("plan.pp", plan.pp, plan.pp <= model.num_layers,
                f"at most num_layers={model.num_layers}")
    require_arg("heterogeneous", heterogeneous, isinstance(heterogeneous, bool), "a bool")
    shares = _batch_shares(plan, model, cluster, heterogeneous)
    require_arg("plan.microbatches", plan.microbatches, plan.microbatches <= min(shares),
                f"at most {min(shares)}: every microbatch needs a sequence")
    replicas = [_replica_seconds(plan, model, cluster, d, b) for d, b in enumerate(shares)]
    slowest = max(range(plan.dp), key=lambda d: sum(replicas[d].values()))
    return Prediction(plan, _memory(plan, model, max(shares)), replicas[slowest],
                      min(d.memory_bytes for d in cluster.devices), tuple(shares))


def pipeline_messages(plan: Plan) -> int:
    """Point-to-point messages one step sends along one pp line: per microbatch and stage
    boundary a header and the activation forward, a header and its gradient back,
    ``4·(pp-1)·m`` (received as many)."""
    require_arg("plan", plan, isinstance(plan, Plan), "a Plan")
    return 4 * (plan.pp - 1) * plan.microbatches


def tensor_parallel_all_reduces(plan: Plan, model: ModelSpec) -> int:
    """All-reduces one step issues on a rank of the fullest stage's tp row: 4 per block and
    microbatch (the attention's and the MLP's row-parallel output forward, their
    column-parallel input's gradient backward), ``4·ceil(L/pp)·m``; 0 at tp = 1."""
    require_arg("plan", plan, isinstance(plan, Plan), "a Plan")
    require_arg("model", model, isinstance(model, ModelSpec), "a ModelSpec")
    if plan.tp == 1:
        return 0
    return 4 * math.ceil(model.num_layers / plan.pp) * plan.microbatches


# -- memory -------------------------------------------------------------------------------

def model_states(num_params: float, plan: Plan, optimizer: str = "adam",
                 mixed_precision: bool = False) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state on one rank of ``plan``: its
    ``Ψ/(tp·pp)`` parameters ZeRO-sharded over ``dp`` (Rajbhandari et al. 2020, Figure 1).

    fp32: :func:`distlab.sharding.memory.predicted_bytes`; mixed precision: fp16 parameters
    and gradients, and the optimizer state that the paper's K = 12 total
    (:func:`~distlab.sharding.memory.paper_bytes`) leaves: fp32 master weights, momentum,
    variance. Example: ``model_states(7.5e9, Plan(dp=64, zero_stage=1),
    mixed_precision=True)`` sums to 31.4 GB.
    """
    require_arg("plan", plan, isinstance(plan, Plan), "a Plan")
    psi = num_params / (plan.tp * plan.pp)
    if not mixed_precision:
        return memory.predicted_bytes(psi, plan.zero_stage, plan.dp, optimizer)
    states = memory.predicted_bytes(psi, plan.zero_stage, plan.dp, "adam", param_bytes=2)
    states["optimizer_state"] = (memory.paper_bytes(psi, plan.zero_stage, plan.dp)
                                 - states["params"] - states["grads"])
    return states


def _memory(plan: Plan, model: ModelSpec, batch: int) -> dict[str, float]:
    """Bytes on the fullest rank: its model states and activations in flight."""
    states = model_states(model.num_params, plan, model.optimizer, model.mixed_precision)
    microbatch = math.ceil(batch / plan.microbatches)
    per_microbatch = activation_bytes(
        seq_len=model.seq_len, batch_size=microbatch, hidden=model.hidden,
        num_heads=model.num_heads, num_layers=math.ceil(model.num_layers / plan.pp),
        bytes_per_value=model.bytes_per_value, tensor_parallel=plan.tp)
    return {**states, "activations": per_microbatch * min(plan.microbatches, plan.pp)}


# -- time ---------------------------------------------------------------------------------

def _replica_seconds(plan: Plan, model: ModelSpec, cluster: Cluster, dp_rank: int,
                     batch: int) -> dict[str, float]:
    """One step of replica ``dp_rank`` with ``batch`` sequences, by ``TIME_PARTS``."""
    m, tp, pp, dp = plan.microbatches, plan.tp, plan.pp, plan.dp
    ranks = _replica_ranks(plan, dp_rank)
    flops = min(cluster.rank_flops(r) for r in ranks)
    compute = (6 * model.num_params * batch * model.seq_len / (tp * pp * flops)
               + m / pp * max(cluster.rank_overhead(r) for r in ranks))
    activation = batch / m * model.seq_len * model.hidden * model.bytes_per_value
    tensor = tensor_parallel_all_reduces(plan, model) * _time(
        alpha_beta.ring_all_reduce(activation, tp), cluster.link(tp, 1))
    # A middle stage sends m activations forward and m gradients back, each a header and
    # the tensor (a receive is its sender's message: counted once, on the sender).
    link = cluster.link(pp, tp * dp)
    pipeline = 2 * m * (_time(alpha_beta.send(HEADER_BYTES), link)
                        + _time(alpha_beta.send(activation), link)) if pp > 1 else 0.0
    grads = model.num_params / (tp * pp) * model.bytes_per_value
    link = cluster.link(dp, tp)
    if dp == 1:
        data = 0.0
    elif plan.zero_stage <= 1:
        data = _time(alpha_beta.ring_all_reduce(grads, dp), link)
    else:
        gathers = 1 if plan.zero_stage == 2 else 2 * m
        data = (_time(alpha_beta.ring_reduce_scatter(grads, dp), link)
                + gathers * _time(alpha_beta.ring_all_gather(grads, dp), link))
    # Of the step the pipeline idles a fraction `idle`: a stage waits for its neighbours'
    # microbatches, each as long as its own, tensor-parallel all-reduces included.
    idle = bubble_fraction(pp, m)
    return {"compute": compute, "bubble": (compute + tensor) * idle / (1 - idle),
            "tensor_parallel": tensor, "pipeline": pipeline, "data_parallel": data}


def _batch_shares(plan: Plan, model: ModelSpec, cluster: Cluster,
                  heterogeneous: bool) -> list[int]:
    """Sequences per replica: by speed (heterogeneous) or equal."""
    require_arg("model.global_batch", model.global_batch, model.global_batch >= plan.dp,
                f">= dp={plan.dp}: every replica needs a sequence")
    if not heterogeneous:
        return list(equal_batches(plan.dp, model.global_batch))
    speeds = [min(cluster.rank_flops(r) for r in _replica_ranks(plan, d))
              for d in range(plan.dp)]
    return list(proportional_batches(speeds, model.global_batch))


def _replica_ranks(plan: Plan, dp_rank: int) -> list[int]:
    # rank = (pp_rank·dp + dp_rank)·tp + tp_rank: tp fastest, then dp, then pp.
    return [(s * plan.dp + dp_rank) * plan.tp + t for s in range(plan.pp)
            for t in range(plan.tp)]


def _time(cost: alpha_beta.Cost, link: tuple[float, float]) -> float:
    return cost.time(*link)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _require(model, cluster) -> None:
    require_arg("model", model, isinstance(model, ModelSpec), "a ModelSpec")
    require_arg("cluster", cluster, isinstance(cluster, Cluster), "a Cluster")
