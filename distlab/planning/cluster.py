"""What the planner plans for: the devices and their links, and the model to train.

A :class:`Cluster` is a list of :class:`Device` s (memory and FLOP/s each) grouped into
nodes of ``devices_per_node``, with two levels of links in the α-β model (Thakur et al.
2005, section 2): ``intra`` inside a node (NVLink, or shared memory) and ``inter`` across
nodes (the network), each a pair ``(alpha, beta)``: seconds per message and per byte. A
collective whose group stays inside one node runs on ``intra``; one that spans nodes runs at
the pace of its slowest hop, ``inter``.

:meth:`Cluster.this_machine` describes the machine the labs run on: its ranks as devices,
the α and β of :mod:`distlab.communication.cost_model`'s fit, and, when ranks outnumber the
cores, the oversubscribed latency ``alpha + gamma·max(0, p/c - 1)`` and time per byte
``beta + delta·max(0, p/c - 1)``
(:func:`distlab.communication.alpha_beta.oversubscribed_alpha` and
:func:`~distlab.communication.alpha_beta.oversubscribed_beta`) and compute, FLOPs and fixed
overheads alike, shared ``c/p``.

A :class:`ModelSpec` is a GPT-like transformer: ``num_params`` by the usual rule
``12·L·h² + V·h`` (per block 4h² in attention's four projections and 8h² in the MLP's two
h x 4h matrices; the token embedding V·h, tied with the output; biases, layer norms and
position embeddings left out: under 1% at scale).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication import alpha_beta

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class Device:
    """One accelerator (or one rank of this machine)."""
    memory_bytes: float
    """Memory the rank may fill, in bytes."""
    flops: float
    """Sustained FLOP/s on the model's matrix products (not the datasheet's peak)."""
    overhead: float = 0.0
    """Seconds of one forward and backward of the whole model that do not grow with the
    batch (Python, autograd, kernel launches: per operation, not per FLOP); 0 for a large
    model, where they vanish beside the FLOPs, most of a tiny one's time."""

    def __post_init__(self):
        require(self, "memory_bytes", _positive(self.memory_bytes), "a number of bytes > 0")
        require(self, "flops", _positive(self.flops), "FLOP/s > 0")
        require(self, "overhead", is_number(self.overhead) and self.overhead >= 0,
                "seconds >= 0")


@dataclass(frozen=True)
class Cluster:
    """Devices in nodes, with α-β links inside (``intra``) and across (``inter``) nodes."""
    devices: tuple
    """The devices in rank order, or ``(num_devices, device)`` for that many copies of one."""
    devices_per_node: int = 8
    """Devices that share a node's fast links; rank r is on node ``r // devices_per_node``."""
    intra: tuple = (5e-6, 1 / 150e9)
    """``(alpha, beta)`` inside a node: seconds per message, seconds per byte."""
    inter: tuple = (20e-6, 1 / 25e9)
    """``(alpha, beta)`` across nodes."""
    gamma: float = 0.0
    """Seconds added to each message per rank waiting for a core (this machine only)."""
    delta: float = 0.0
    """Seconds added to each byte per rank waiting for a core (this machine only)."""
    cores: int | None = None
    """Cores the ranks share; None: every device computes on its own (a real cluster)."""

    def __post_init__(self):
        devices = self.devices
        if (isinstance(devices, tuple) and len(devices) == 2 and is_int(devices[0])
                and isinstance(devices[1], Device)):
            require(self, "devices", devices[0] >= 1, "(num_devices >= 1, Device)")
            devices = (devices[1],) * devices[0]
        devices = tuple(devices) if isinstance(devices, (list, tuple)) else ()
        require(self, "devices", len(devices) >= 1 and all(isinstance(d, Device)
                                                           for d in devices),
                "a non-empty sequence of Device, or (num_devices, Device)")
        object.__setattr__(self, "devices", devices)
        require(self, "devices_per_node", is_int(self.devices_per_node)
                and self.devices_per_node >= 1, "an int >= 1")
        for name in ("intra", "inter"):
            link = getattr(self, name)
            require(self, name, isinstance(link, tuple) and len(link) == 2
                    and all(is_number(v) and v >= 0 for v in link),
                    "(alpha, beta): seconds per message and per byte, both >= 0")
        for name in ("gamma", "delta"):
            require(self, name, is_number(getattr(self, name)) and getattr(self, name) >= 0,
                    "seconds >= 0")
        require(self, "cores", self.cores is None or (is_int(self.cores) and self.cores >= 1),
                "None or an int >= 1")

    @classmethod
    def this_machine(cls, num_ranks: int, *, flops: float, fit=None, alpha: float | None = None,
                     beta: float | None = None, gamma: float | None = None,
                     delta: float | None = None, cores: int | None = None,
                     memory_bytes: float | None = None, overhead: float = 0.0) -> "Cluster":
        """``num_ranks`` ranks of this machine, one node: α, β, γ and δ from ``fit`` (a
        :class:`distlab.communication.cost_model.Fit`) or given (γ or δ given beside a fit
        replace its own), the cores of
        :func:`~distlab.communication.alpha_beta.machine_cores` unless ``cores``, and the
        machine's memory split over the ranks unless ``memory_bytes``.

        ``flops`` is one rank's sustained FLOP/s and ``overhead`` its fixed seconds per
        pass of the model (:func:`distlab.planning.validate.measure_compute` measures both;
        a busy machine's γ: :func:`distlab.planning.validate.crowded_gamma`).
        Example: ``Cluster.this_machine(2, flops=2e9, alpha=50e-6, beta=1e-9)``.
        """
        require_arg("num_ranks", num_ranks, is_int(num_ranks) and num_ranks >= 1, "an int >= 1")
        require_arg("fit", fit, fit is None or (alpha is None and beta is None),
                    "None when alpha and beta are given")
        if fit is not None:
            alpha, beta = fit.alpha, fit.beta
            gamma = fit.gamma if gamma is None else gamma
            delta = getattr(fit, "delta", 0.0) if delta is None else delta
        gamma, delta = gamma or 0.0, delta or 0.0
        require_arg("alpha", alpha, is_number(alpha) and alpha >= 0, "seconds >= 0 (or a fit)")
        require_arg("beta", beta, is_number(beta) and beta >= 0, "seconds >= 0 (or a fit)")
        cores = alpha_beta.machine_cores() if cores is None else cores
        if memory_bytes is None:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / num_ranks
        return cls((num_ranks, Device(memory_bytes, flops, overhead)),
                   devices_per_node=num_ranks, intra=(alpha, beta), inter=(alpha, beta),
                   gamma=gamma, delta=delta, cores=cores)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def rank_flops(self, rank: int) -> float:
        """The FLOP/s ``rank`` gets: its device's, times ``c/p`` when p ranks share c < p
        cores (each core runs its ranks in turn)."""
        require_arg("rank", rank, is_int(rank) and 0 <= rank < self.num_devices,
                    f"an int in 0..{self.num_devices - 1}")
        return self.devices[rank].flops * self._core_share()

    def rank_overhead(self, rank: int) -> float:
        """``rank``'s fixed seconds per pass of the whole model: its device's, over the
        ``c/p`` share of a core it gets (each core runs its ranks in turn)."""
        require_arg("rank", rank, is_int(rank) and 0 <= rank < self.num_devices,
                    f"an int in 0..{self.num_devices - 1}")
        return self.devices[rank].overhead / self._core_share()

    def _core_share(self) -> float:
        return 1.0 if self.cores is None else min(1.0, self.cores / self.num_devices)

    def link(self, size: int, stride: int) -> tuple[float, float]:
        """``(alpha, beta)`` for a group of ``size`` ranks ``stride`` apart: ``intra`` when
        it fits in one node (``size·stride <= devices_per_node``), else ``inter``; α crowded
        by γ and β by δ when the cluster's ranks outnumber its cores."""
        alpha, beta = self.intra if size * stride <= self.devices_per_node else self.inter
        if self.cores is not None:
            p, c = self.num_devices, self.cores
            alpha = alpha_beta.oversubscribed_alpha(alpha, self.gamma, p, c)
            beta = alpha_beta.oversubscribed_beta(beta, self.delta, p, c)
        return alpha, beta


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-like transformer and the batch it trains on."""
    num_layers: int
    """Transformer blocks L."""
    hidden: int
    """Model width h (d_model)."""
    num_heads: int
    """Attention heads a (h must be a multiple)."""
    seq_len: int
    """Tokens per sequence s."""
    vocab: int
    """Vocabulary size V."""
    global_batch: int
    """Sequences per optimizer step, over all ranks."""
    optimizer: str = "adam"
    """``"sgd"`` (momentum), ``"adam"`` or ``"adamw"``: the optimizer state per parameter."""
    mixed_precision: bool = False
    """True: fp16 parameters, gradients and activations with K = 12 (the ZeRO paper's
    setting); False: fp32 throughout, as distlab trains."""

    def __post_init__(self):
        for name in ("num_layers", "hidden", "num_heads", "seq_len", "vocab", "global_batch"):
            v = getattr(self, name)
            require(self, name, is_int(v) and v >= 1, "an int >= 1")
        require(self, "num_heads", self.hidden % self.num_heads == 0,
                f"a divisor of hidden={self.hidden}")
        require(self, "optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
        require(self, "mixed_precision", isinstance(self.mixed_precision, bool), "a bool")

    @property
    def num_params(self) -> int:
        """Ψ = 12·L·h² + V·h (see the module's docstring for the rule)."""
        return 12 * self.num_layers * self.hidden ** 2 + self.vocab * self.hidden

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one parameter, gradient or activation value: 2 (fp16) or 4 (fp32)."""
        return 2 if self.mixed_precision else 4

    @classmethod
    def from_workload(cls, workload) -> "ModelSpec":
        """The spec of a :class:`distlab.problems.workloads.Workload` of model
        ``"transformer"`` (fp32, its optimizer)."""
        require_arg("workload.model", getattr(workload, "model", None),
                    getattr(workload, "model", None) == "transformer", "'transformer'")
        from distlab.problems.transformer import CharTokenizer, load_text
        return cls(workload.depth, workload.hidden, workload.num_heads, workload.block_size,
                   CharTokenizer(load_text()).vocab_size, workload.batch_size,
                   optimizer=workload.optimizer_name)


def _positive(v) -> bool:
    return is_number(v) and v > 0
