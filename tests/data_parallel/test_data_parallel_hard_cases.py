"""distlab.data_parallel.ddp on the cases real models bring, against one process.

Every variant (``average_gradients`` itself, naive, flat, overlap, bucketed) trains the same
model for three SGD steps (momentum 0.9) on real gloo groups of 1 to 4 ranks; each rank's
loss is the mean over its own shard, and the single-process reference takes the mean of
the ranks' losses (the gradient DDP averages), so every rank must end with the reference's
parameters. One launch runs every variant, to spare the machine's two cores.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distlab
from distlab.data_parallel import ddp as dp

pytestmark = pytest.mark.timeout(180)

VARIANTS = ["average_gradients", *dp.VARIANTS]
TINY_BUCKET = 1e-4   # MiB: about 100 bytes, so a model spans several buckets
STEPS, BATCH, LR = 3, 4, 0.1


class Branches(nn.Module):
    """A rank-dependent forward (MoE-style routing): even ranks use ``a``, odd ranks ``b``."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(8, 1)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, rank):
        branch = self.a if rank % 2 == 0 else self.b
        return self.head(torch.tanh(branch(torch.tanh(self.inp(x)))))


class Frozen(nn.Module):
    """A frozen layer between two trained ones (a frozen backbone, fine-tuned head)."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(8, 1)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)

    def forward(self, x, rank):
        return self.head(torch.tanh(self.frozen(torch.tanh(self.inp(x)))))


class Tied(nn.Module):
    """One weight used by two layers (as an embedding tied to the output layer)."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(8, 1)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x, rank):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.inp(x)))))))


class Normalized(nn.Module):
    """BatchNorm: running statistics are buffers, updated by every training forward."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)

    def forward(self, x, rank):
        return self.head(torch.tanh(self.norm(self.inp(x))))


class Odd(nn.Module):
    """Parameters of 15, 3, 3 and 1 elements: none divides by 2 or 4 ranks."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(5, 3), nn.Linear(3, 1)

    def forward(self, x, rank):
        return self.head(torch.tanh(self.inp(x[:, :5])))


class Mixed(nn.Module):
    """A float32 layer and a float64 one: one bucket (one flat buffer) per dtype."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(8, 1).double()

    def forward(self, x, rank):
        return self.head(torch.tanh(self.inp(x)).double()).float()


class Empty(nn.Module):
    """No trainable parameter at all: a frozen layer and a parameter-free one."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 1).requires_grad_(False)

    def forward(self, x, rank):
        return torch.tanh(self.frozen(x))


MODELS = {cls.__name__: cls for cls in (Branches, Frozen, Tied, Normalized, Odd, Mixed, Empty)}


def _build(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)   # every rank and the reference start from the same weights
    model = MODELS[name]()
    return model if name == "Mixed" else model.to(dtype)


def _batch(rank: int, world_size: int, step: int, dtype: torch.dtype):
    """Rank ``rank``'s shard at ``step``: BATCH disjoint rows of a fixed data set."""
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(256, 6, generator=g), torch.randn(256, 1, generator=g)
    rows = torch.arange(BATCH) * world_size + rank + step * BATCH * world_size
    return X[rows].to(dtype), y[rows].to(dtype)


def _optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=LR, momentum=0.9) if params else None


def _buffers(model) -> dict:
    return {k: v.clone() for k, v in model.named_buffers()}


def _train_rank(name, dtype, variant, broadcast_buffers=True):
    """Three steps of ``variant`` on this rank; what each forward saw and what it ended with."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = _build(name, dtype)
    if variant == "average_gradients":
        net = model
        params = list(model.parameters())
        finish = lambda: dp.average_gradients(params)   # noqa: E731
    else:
        net = dp.wrap(model, variant, bucket_size_mb=TINY_BUCKET,
                      broadcast_buffers=broadcast_buffers)
        finish = net.finish_gradient_synchronization
    seen = []   # the buffers each forward started from (after DDP's broadcast)
    model.register_forward_pre_hook(lambda m, args: seen.append(_buffers(m)))
    opt = _optimizer(model)
    for step in range(STEPS):
        X, y = _batch(rank, world_size, step, dtype)
        model.zero_grad(set_to_none=True)
        loss = F.mse_loss(net(X, rank), y)
        if loss.requires_grad:
            loss.backward()
        finish()
        if opt is not None:
            opt.step()
    return {"final": {k: v.clone() for k, v in model.state_dict().items()}, "seen": seen,
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def _every_variant(name, dtype):
    return {v: _train_rank(name, dtype, v) for v in VARIANTS}


def _reference(name, world_size, dtype):
    """One process: the mean of the ranks' losses; buffers updated by rank 0's shard only.

    Returns the final state and the buffers each step's forward started from.
    """
    model = _build(name, dtype)
    opt = _optimizer(model)
    seen = []
    for step in range(STEPS):
        start = _buffers(model)
        seen.append(start)
        losses, rank0 = [], None
        for r in range(world_size):
            for k, b in model.named_buffers():   # every rank's forward starts from rank 0's
                b.data.copy_(start[k])   # .data: autograd saved these; the values are not used
            X, y = _batch(r, world_size, step, dtype)
            losses.append(F.mse_loss(model(X, r), y))
            if r == 0:
                rank0 = _buffers(model)
        for k, b in model.named_buffers():
            b.data.copy_(rank0[k])
        loss = sum(losses) / world_size
        model.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        if opt is not None:
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, seen


def _check_params(name, world_size, results, dtype=torch.float32, **tolerance):
    """Every rank's parameters (not buffers: their own test) equal the reference's."""
    expected, _ = _reference(name, world_size, dtype)
    names = [n for n, _ in _build(name, dtype).named_parameters(remove_duplicate=False)]
    for rank, out in enumerate(results):
        for variant in VARIANTS:
            got = out[variant]["final"]
            for k in names:
                torch.testing.assert_close(got[k], expected[k], **tolerance,
                                           msg=lambda m: f"{variant} rank {rank} {k}: {m}")
    return expected


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_whose_forward_uses_different_parameters_average_like_one_process(world_size):
    results = distlab.launch(_every_variant, world_size, "Branches", torch.float32, timeout=150)
    _check_params("Branches", world_size, results)
    for rank, out in enumerate(results):   # a branch no rank of this step used stays put
        for variant in VARIANTS:
            grads = out[variant]["grads"]
            assert all(grads[n] is not None for n in grads), (variant, "gradient left None")


@pytest.mark.parametrize("world_size", [2])
def test_frozen_parameters_are_left_alone(world_size):
    results = distlab.launch(_every_variant, world_size, "Frozen", torch.float32, timeout=150)
    _check_params("Frozen", world_size, results)
    start = _build("Frozen", torch.float32).frozen.weight
    for out in results:
        for variant in VARIANTS:
            assert out[variant]["grads"]["frozen.weight"] is None, variant
            torch.testing.assert_close(out[variant]["final"]["frozen.weight"], start)


@pytest.mark.parametrize("world_size", [3])
def test_tied_weights_are_averaged_once(world_size):
    results = distlab.launch(_every_variant, world_size, "Tied", torch.float32, timeout=150)
    expected = _check_params("Tied", world_size, results)
    untrained = _build("Tied", torch.float32).state_dict()
    with pytest.raises(AssertionError):   # the check above would catch a step not taken
        torch.testing.assert_close(untrained["a.weight"], expected["a.weight"])


def _buffer_runs():
    runs = {v: _train_rank("Normalized", torch.float32, v) for v in dp.VARIANTS}
    runs["no broadcast"] = _train_rank("Normalized", torch.float32, "flat",
                                       broadcast_buffers=False)
    return runs


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_forward_starts_from_rank_0s_buffers(world_size):
    results = distlab.launch(_buffer_runs, world_size, timeout=150)
    _, expected_seen = _reference("Normalized", world_size, torch.float32)
    for rank, out in enumerate(results):
        for variant in dp.VARIANTS:
            for step, (got, want) in enumerate(zip(out[variant]["seen"], expected_seen)):
                for k in want:
                    torch.testing.assert_close(got[k], want[k],
                                               msg=f"{variant} rank {rank} step {step} {k}")
    # broadcast_buffers=False: each rank keeps its own running statistics, as in torch DDP
    last = [out["no broadcast"]["seen"][-1]["norm.running_mean"] for out in results]
    assert not torch.allclose(last[0], last[1])


def _expected_and_untrained(name, world_size, dtype, **tolerance):
    expected, _ = _reference(name, world_size, dtype)
    untrained = _build(name, dtype).state_dict()
    for k in expected:   # the tolerance is tight enough to tell a trained model apart
        with pytest.raises(AssertionError):
            torch.testing.assert_close(untrained[k], expected[k], **tolerance)


@pytest.mark.parametrize("world_size", [2])
def test_float64_gradients_stay_float64(world_size):
    results = distlab.launch(_every_variant, world_size, "Tied", torch.float64, timeout=150)
    _check_params("Tied", world_size, results, torch.float64)   # float64's own tolerance
    _expected_and_untrained("Tied", world_size, torch.float64)
    for out in results:
        for variant in VARIANTS:
            assert all(v.dtype == torch.float64 for v in out[variant]["final"].values())


BF16 = {"rtol": 1.6e-2, "atol": 1e-3}
"""bfloat16 keeps 8 bits of mantissa: about 2 units in the last place, relative."""


@pytest.mark.parametrize("world_size", [4])
def test_bfloat16_gradients_stay_bfloat16(world_size):
    results = distlab.launch(_every_variant, world_size, "Branches", torch.bfloat16,
                             timeout=150)
    _check_params("Branches", world_size, results, torch.bfloat16, **BF16)
    _expected_and_untrained("Branches", world_size, torch.bfloat16, **BF16)
    for out in results:
        for variant in VARIANTS:
            assert all(v.dtype == torch.bfloat16 for v in out[variant]["final"].values())


@pytest.mark.parametrize("world_size", [2])
def test_parameters_of_two_dtypes_in_one_model_keep_their_dtypes(world_size):
    results = distlab.launch(_every_variant, world_size, "Mixed", torch.float32, timeout=150)
    _check_params("Mixed", world_size, results)
    for out in results:
        for variant in VARIANTS:
            final = out[variant]["final"]
            assert final["inp.weight"].dtype == torch.float32, variant
            assert final["head.weight"].dtype == torch.float64, variant


@pytest.mark.parametrize("world_size", [3, 4])
def test_parameter_sizes_that_do_not_divide_by_the_world_size(world_size):
    results = distlab.launch(_every_variant, world_size, "Odd", torch.float32, timeout=150)
    _check_params("Odd", world_size, results)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_model_without_trainable_parameters_is_a_no_op(world_size):
    results = distlab.launch(_every_variant, world_size, "Empty", torch.float32, timeout=150)
    start = _build("Empty", torch.float32).state_dict()
    for out in results:
        for variant in VARIANTS:
            for k in start:
                torch.testing.assert_close(out[variant]["final"][k], start[k])


def test_sparse_gradients_are_refused_at_construction_naming_the_alternative():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    for cls in dp.VARIANTS.values():
        with pytest.raises(ValueError, match=r"sparse=True.*use sparse=False"):
            cls(model)   # refused before any process group is needed
