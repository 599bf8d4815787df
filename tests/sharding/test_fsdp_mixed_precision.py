"""FSDP in 16 bits: bf16/fp16 parameter shards, sharded fp32 master weights and Adam state
("2 + 2 + K", K = 12), against the single-process mixed-precision run ZeRO's test uses.

One launch of 2 ranks runs every 2-rank scenario; each test looks up its own; one launch of
4 ranks checks fp16 with a skipped step there.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import distlab
from distlab.memory.measure import largest_unit_bytes, measure_step
from distlab.sharding import memory
from distlab.sharding.fsdp import FullyShardedDataParallel
from distlab.sharding.fsdp_mixed import MasterWeightOptimizer
# ZeRO's mixed test: its model, data, tolerances and its single-process reference (16-bit
# model, fp32 masters, Adam, the loss scaler and the overflow), the one both must equal.
from test_zero_mixed_precision import (OVERFLOW, STEPS, TOLERANCE, data, net, reference,
                                       train_16_bit)

pytestmark = pytest.mark.timeout(180)

DTYPES = [torch.float16, torch.bfloat16]
NUM_PARAMS = sum(p.numel() for p in net(torch.float32).parameters())


def fully_sharded_16(dtype):
    """Stage 3 with 16-bit shards; in fp16 one rank's master gradient overflows once."""
    rank, N, (X, Y) = dist.get_rank(), dist.get_world_size(), data()
    model = FullyShardedDataParallel(net(torch.float32), param_dtype=dtype)
    opt = MasterWeightOptimizer(model.parameters(), torch.optim.Adam, lr=0.01)
    skipped = train_16_bit(model, opt, dtype, model)
    out = {"by_op": distlab.comm.ledger().by_op(),        # the last step's, before the gather
           "params": model.full_state_dict(), "skipped": skipped,
           "memory": memory.measure(model, opt),
           "dtypes": {p.dtype for p in model.parameters()} | {m.dtype for m in opt.master_params}}
    if dtype == torch.bfloat16:                # the unsharded checkpoint, loaded again
        out["checkpoint"] = reloaded(model, opt)
    if dtype == torch.bfloat16:                # one more step, its peak memory traced
        out["step"] = measure_step(model, opt, (X[0].chunk(N)[rank], Y[0].chunk(N)[rank]),
                                   F.cross_entropy)
        out["largest_unit"] = largest_unit_bytes(model)
    return out


def reloaded(model, opt):
    """Whether a fresh model and optimizer loaded from the unsharded checkpoints hold the
    same shards, Adam state and masters (the 16-bit shards, in fp32)."""
    state, optim_state = model.full_state_dict(), model.full_optim_state_dict(opt)
    model2 = FullyShardedDataParallel(net(torch.float32), param_dtype=model.param_dtype)
    model2.load_full_state_dict(state)
    opt2 = MasterWeightOptimizer(model2.parameters(), torch.optim.Adam, lr=0.5)
    model2.load_full_optim_state_dict(opt2, optim_state)
    pairs = list(zip(opt.master_params, opt2.master_params, model2.parameters()))
    return {"lr": opt2.param_groups[0]["lr"],
            "state": all(torch.equal(opt.optim.state[a][k], opt2.optim.state[b][k])
                         for a, b, _ in pairs for k in ("step", "exp_avg", "exp_avg_sq")),
            "masters": all(torch.equal(b, p.float()) for _, b, p in pairs)}


def fully_sharded_32():
    """The same stage 3 in fp32, one step: the bytes the 16-bit run must halve."""
    rank, N, (X, Y) = dist.get_rank(), dist.get_world_size(), data()
    model = FullyShardedDataParallel(net(torch.float32))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    distlab.comm.ledger().reset()
    F.cross_entropy(model(X[0].chunk(N)[rank]), Y[0].chunk(N)[rank]).backward()
    opt.step()
    return {"by_op": distlab.comm.ledger().by_op()}


def scenarios():
    return {**{dtype: fully_sharded_16(dtype) for dtype in DTYPES}, "fp32": fully_sharded_32()}


@pytest.fixture(scope="module")
def results():
    return distlab.launch(scenarios, 2, timeout=150)


def assert_equals_reference(got, dtype):
    want, want_skipped = reference(dtype)       # the parameters in module order
    assert got["skipped"] == want_skipped
    assert got["dtypes"] == {dtype, torch.float32}
    assert list(got["params"]) == [n for n, _ in net(torch.float32).named_parameters()]
    for (k, a), b in zip(got["params"].items(), want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **TOLERANCE[dtype], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_16_bit_fsdp_equals_single_process_mixed_precision(results, dtype):
    for r in results:
        assert_equals_reference(r[dtype], dtype)


def test_every_rank_skips_the_step_where_one_shard_overflowed(results):
    assert reference(torch.float16)[1][OVERFLOW]
    for r in results:
        assert r[torch.float16]["skipped"] == [s == OVERFLOW for s in range(STEPS)]


def test_16_bit_fsdp_at_4_ranks_equals_single_process_and_skips_the_overflow():
    for r in distlab.launch(fully_sharded_16, 4, torch.float16, timeout=150):
        assert_equals_reference(r, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_measured_bytes_are_the_papers_2_plus_2_plus_12_over_n(results, dtype):
    want = memory.predicted_bytes(NUM_PARAMS, 3, 2, "adam", param_bytes=2, master_bytes=4)
    assert sum(want.values()) == memory.paper_bytes(NUM_PARAMS, 3, 2, k=12) == 16 * NUM_PARAMS / 2
    for r in results:
        # Adam also keeps a 4-byte step count per tensor: 4 tensors.
        assert r[dtype]["memory"] == {**want, "optimizer_state": want["optimizer_state"] + 4 * 4}


def test_forward_peak_is_the_shards_plus_one_gathered_16_bit_unit(results):
    want = memory.predicted_bytes(NUM_PARAMS, 3, 2, "adam", param_bytes=2, master_bytes=4)
    for r in results:
        got = r[torch.bfloat16]
        # The largest unit is the first Linear, 8·16 + 16 parameters, whole, in 2 bytes each.
        assert got["largest_unit"] == 2 * (8 * 16 + 16)
        forward = got["step"]["forward"]
        # In forward the gradients are None: 16-bit shards, masters and Adam state, one unit.
        assert forward["model_state_peak"] == want["params"] + want["optimizer_state"] + 4 * 4
        assert forward["with_gathered_peak"] - forward["model_state_peak"] == got["largest_unit"]
        assert forward["gathered_params"] <= got["largest_unit"]


@pytest.mark.parametrize("op", ["all_gather", "send"])
def test_gathers_and_reduce_scatters_move_half_the_bytes_of_fp32(results, op):
    # all_gather: the forward and backward gathers; send: gloo's ring
    # reduce-scatter of the gradients. The fp16 step adds only the overflow flag's MAX.
    for r in results:
        fp32 = r["fp32"]["by_op"][op]
        for dtype in DTYPES:
            got = r[dtype]["by_op"][op]
            assert got["calls"] == fp32["calls"]
            assert 2 * got["bytes_sent"] == fp32["bytes_sent"], (dtype, got, fp32)
        flag = r[torch.float16]["by_op"]["all_reduce"]
        assert flag["calls"] == 1 and "all_reduce" not in r[torch.bfloat16]["by_op"]


def test_16_bit_fsdp_checkpoint_loads_the_adam_state_and_restarts_the_masters(results):
    for r in results:
        assert r[torch.bfloat16]["checkpoint"] == {"lr": 0.01, "state": True, "masters": True}


def test_master_weights_accumulate_updates_too_small_for_16_bits():
    # bf16 keeps 8 significant bits: next to 1.0 a step of 1e-3 (below half of 2^-7) rounds
    # away. Stepped in fp32 masters, ten of them add up to 1e-2 and move the weight.
    w = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeightOptimizer([w], torch.optim.SGD, lr=1e-3)
    for _ in range(10):
        w.grad = torch.ones_like(w)
        opt.step()
    torch.testing.assert_close(opt.master_params[0], torch.full((4,), 0.99))
    assert (w == torch.tensor(0.99).to(torch.bfloat16)).all(), w


def test_param_dtype_other_than_bf16_or_fp16_is_refused_by_name():
    with pytest.raises(ValueError, match=r"param_dtype=torch.float32 is not supported; "
                                         r"allowed None, torch.bfloat16 or torch.float16"):
        FullyShardedDataParallel(net(torch.float32), param_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"compute_dtype=torch.bfloat16 with "
                                         r"param_dtype=torch.float16: give one"):
        FullyShardedDataParallel(net(torch.float32), param_dtype=torch.float16,
                                 compute_dtype=torch.bfloat16)


def test_master_weight_optimizer_refuses_fp32_parameters():
    with pytest.raises(ValueError, match=r"dtype torch.float32 \(shape \(16, 8\)\); allowed "
                                         r"torch.bfloat16 or torch.float16"):
        MasterWeightOptimizer(net(torch.float32).parameters(), torch.optim.Adam, lr=0.01)


def test_master_weight_optimizer_state_loads_and_masters_restart_from_the_parameters():
    def trained():
        w = nn.Parameter(torch.linspace(-1, 1, 6).to(torch.bfloat16))
        opt = MasterWeightOptimizer([w], torch.optim.Adam, lr=0.1)
        w.grad = torch.ones_like(w)
        opt.step()
        return w, opt
    w, opt = trained()
    w2 = nn.Parameter(w.detach().clone())
    opt2 = MasterWeightOptimizer([w2], torch.optim.Adam, lr=0.5)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(opt2.optim.state[opt2.master_params[0]],
                               opt.optim.state[opt.master_params[0]])
    # The checkpoint holds no masters: they restart from the 16-bit weights.
    torch.testing.assert_close(opt2.master_params[0], w.detach().float(), rtol=0, atol=0)
