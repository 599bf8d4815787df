"""ZeRO stages 1 and 2 in mixed precision: 16-bit parameters and gradients, sharded fp32
master weights and Adam state ("2 + 2 + K", K = 12), against the single-process run.

One launch of 2 ranks runs every scenario; each test looks up its own.
"""
import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import distlab
from distlab.precision.loss_scaling import DynamicLossScaler
from distlab.precision.mixed import fp16_step, master_weights
from distlab.sharding import memory, zero
from distlab.sharding.fsdp import FullyShardedDataParallel

pytestmark = pytest.mark.timeout(180)

STEPS, OVERFLOW, N = 5, 2, 2
MODES = {1: "reduce_scatter", 2: "sharded"}
TOLERANCE = {torch.float16: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=8e-3, rtol=1e-2)}
"""The 16-bit weights of 2 ranks against one process: one or two units in the last place
(the ranks sum half-batch gradients in 16 bits; the masters round to a neighbouring value)."""


def net(dtype):
    torch.manual_seed(0)          # every tensor's size is even: each rank's shard is Ψ/2
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8, 8, generator=g), torch.randint(0, 4, (STEPS, 8), generator=g)


@functools.cache
def reference(dtype):
    """One process: 16-bit model, fp32 masters, Adam, the scaler (fp16), the overflow."""
    model, (X, Y) = net(dtype), data()
    params = list(model.parameters())
    masters = master_weights(params)
    opt = torch.optim.Adam(masters, lr=0.01)
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=2)
    skipped = []
    for s in range(STEPS):
        model.zero_grad()
        loss = F.cross_entropy(model(X[s].to(dtype)).float(), Y[s])
        if dtype == torch.bfloat16:           # bf16: fp32's range, no scaling needed
            loss.backward()
            skipped.append(fp16_step(opt, DynamicLossScaler(init_scale=1.0), params, masters))
            continue
        scaler.scale(loss).backward()
        if s == OVERFLOW:
            params[0].grad[0, 0] = float("inf")
        skipped.append(fp16_step(opt, scaler, params, masters))
    return [p.detach().clone() for p in params], skipped


def train_16_bit(model, opt, dtype, forward) -> list[bool]:
    """STEPS steps of a sharded 16-bit ``opt`` (``reduce_gradients`` gives its masters) on
    this rank's slice of the data; bf16 steps plainly, fp16 through the loss scaler, the
    last rank's master gradient overflowing at step OVERFLOW. The ledger holds the last
    step's traffic. Returns which steps were skipped."""
    rank, N, (X, Y) = dist.get_rank(), dist.get_world_size(), data()
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=2)
    skipped = []
    for s in range(STEPS):
        opt.zero_grad()
        distlab.comm.ledger().reset()
        loss = F.cross_entropy(forward(X[s].chunk(N)[rank]), Y[s].chunk(N)[rank])
        if dtype == torch.bfloat16:
            loss.backward()
            opt.step()
            skipped.append(False)
            continue
        scaler.scale(loss).backward()
        masters = opt.reduce_gradients()
        if s == OVERFLOW and rank == N - 1:    # only this rank's shard overflows
            masters[0].grad[0] = float("inf")
        skipped.append(scaler.step(opt, masters))
        scaler.update(skipped[-1])
    return skipped


def sharded(stage, dtype):
    model = net(dtype)
    opt = zero.ShardedOptimizer(model.parameters(), torch.optim.Adam, gradients=MODES[stage],
                                master_weights=True, lr=0.01)
    skipped = train_16_bit(model, opt, dtype, lambda x: model(x.to(dtype)).float())
    return {"params": [p.detach().clone() for p in model.parameters()], "skipped": skipped,
            "bytes_sent": distlab.comm.ledger().totals()["bytes_sent"],
            "memory": memory.measure(model, opt), "dtypes": {p.dtype for p in model.parameters()}
            | {m.dtype for m in opt.master_params}}


def fully_sharded():
    """Stage 3 with bf16 compute: the fp32 shards are the master weights."""
    rank, (X, Y) = dist.get_rank(), data()
    model = FullyShardedDataParallel(net(torch.float32), compute_dtype=torch.bfloat16)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for s in range(2):
        opt.zero_grad()
        distlab.comm.ledger().reset()
        F.cross_entropy(model(X[s].chunk(N)[rank]), Y[s].chunk(N)[rank]).backward()
        opt.step()
    return {"bytes_sent": distlab.comm.ledger().totals()["bytes_sent"],
            "memory": memory.measure(model, opt)}


def scenarios():
    out = {(stage, dtype): sharded(stage, dtype) for stage in MODES
           for dtype in (torch.float16, torch.bfloat16)}
    out[3] = fully_sharded()
    return out


@pytest.fixture(scope="module")
def results():
    return distlab.launch(scenarios, N, timeout=150)


NUM_PARAMS = sum(p.numel() for p in net(torch.float32).parameters())


@pytest.mark.parametrize("stage", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_zero_equals_single_process_mixed_precision(results, stage, dtype):
    want, want_skipped = reference(dtype)
    for r in results:
        got = r[(stage, dtype)]
        assert got["skipped"] == want_skipped
        assert got["dtypes"] == {dtype, torch.float32}
        for a, b in zip(got["params"], want):
            torch.testing.assert_close(a, b, **TOLERANCE[dtype])


@pytest.mark.parametrize("stage", MODES)
def test_every_rank_skips_the_step_where_one_shard_overflowed(results, stage):
    for r in results:
        assert r[(stage, torch.float16)]["skipped"][OVERFLOW]
    assert reference(torch.float16)[1][OVERFLOW]


@pytest.mark.parametrize("stage", MODES)
def test_measured_bytes_are_the_papers_2_plus_2_plus_12(results, stage):
    want = memory.predicted_bytes(NUM_PARAMS, stage, N, "adam", param_bytes=2, master_bytes=4)
    assert want["optimizer_state"] == 12 * NUM_PARAMS / N
    assert sum(want.values()) == memory.paper_bytes(NUM_PARAMS, stage, N, k=12)
    for r in results:
        got = r[(stage, torch.float16)]["memory"]
        assert got["params"] == want["params"] and got["grads"] == want["grads"]
        # Adam also keeps a 4-byte step count per tensor: 4 tensors.
        assert got["optimizer_state"] == want["optimizer_state"] + 4 * 4


@pytest.mark.parametrize("stage", MODES)
def test_gradients_and_parameters_travel_in_16_bits(results, stage):
    # A step: reduce-scatter and all-gather of 2Ψ bytes, (N-1)/N each; the flag's MAX.
    want = 2 * (N - 1) / N * 2 * NUM_PARAMS + 2 * (N - 1) / N * 4
    for r in results:
        assert r[(stage, torch.float16)]["bytes_sent"] == want


def test_stage_3_bf16_compute_holds_the_papers_16_bytes_per_parameter_over_n(results):
    # FSDP keeps fp32 shards (they are the masters) and reduces in fp32, gathers in bf16:
    # 4 + 4 + 8 per parameter over N, the same total as the paper's (2 + 2 + 12)/N.
    want = memory.predicted_bytes(NUM_PARAMS, 3, N, "adam")
    assert sum(want.values()) == memory.paper_bytes(NUM_PARAMS, 3, N, k=12)
    for r in results:
        got = r[3]["memory"]
        assert got == {**want, "optimizer_state": want["optimizer_state"] + 4 * 4}
        # Forward all-gathers 2Ψ bf16 bytes, backward again those weights it saved, and one
        # reduce-scatter moves 4Ψ fp32 bytes: below what a forward in fp32 alone would send.
        sent, share = r[3]["bytes_sent"], (N - 1) / N * NUM_PARAMS
        assert (2 + 4) * share <= sent < (4 + 4) * share, sent


def test_stage_0_fp16_with_masters_holds_2_plus_2_plus_12():
    model = net(torch.float16)
    params = list(model.parameters())
    masters = master_weights(params)
    opt = torch.optim.Adam(masters, lr=0.01)
    model(torch.randn(2, 8).half()).float().sum().backward()
    fp16_step(opt, DynamicLossScaler(init_scale=1.0), params, masters)
    got = memory.measure(model, opt)
    want = memory.predicted_bytes(NUM_PARAMS, 0, N, "adam", param_bytes=2, master_bytes=4)
    assert got == {**want, "optimizer_state": want["optimizer_state"] + 4 * 4}


def test_master_weights_must_be_a_bool():
    with pytest.raises(ValueError, match=r"master_weights=1 is out of range"):
        zero.ShardedOptimizer.__init__(object.__new__(zero.ShardedOptimizer),
                                       [nn.Parameter(torch.ones(2))], torch.optim.Adam,
                                       master_weights=1)
