"""measure_step: traced peak memory per phase, against the formulas, on 1 and 2 real ranks."""
import math

import pytest
import torch
import torch.distributed as dist

import distlab
from distlab.data_parallel.ddp import wrap
from distlab.memory.activations import activation_bytes, tiny_transformer_activation_bytes
from distlab.memory.measure import measure_step
from distlab.problems.transformer import TinyTransformer, lm_loss
from distlab.sharding import memory

pytestmark = pytest.mark.timeout(240)

V, C, HEADS, LAYERS, T, B = 20, 16, 2, 2, 8, 4


def tiny():
    return TinyTransformer(V, C, HEADS, LAYERS, T)


def batch(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (b, T), generator=g), torch.randint(V, (b, T), generator=g)


def two_steps(model, opt, data):
    X, y = data                          # a first, unmeasured step creates Adam's state
    lm_loss(model(X), y).backward()
    getattr(model, "finish_gradient_synchronization", lambda: None)()
    opt.step()
    return measure_step(model, opt, data, lm_loss)


def test_model_states_equal_what_sharding_memory_measure_sums():
    model = tiny()
    opt = torch.optim.Adam(model.parameters())
    r = two_steps(model, opt, batch())
    want = memory.measure(model, opt)
    assert {k: r["end"][k] for k in memory.CATEGORIES} == want
    assert r["step"]["params"] == want["params"] and r["step"]["optimizer_state"] == \
        want["optimizer_state"]
    assert r["model_state_peak"] == sum(want.values())


def test_forward_phase_has_no_gradients_and_backward_peak_has_activations_and_temporaries():
    model = tiny()
    opt = torch.optim.Adam(model.parameters())
    r = two_steps(model, opt, batch())
    assert r["forward"]["grads"] == 0 and r["forward"]["activations"] > 0
    assert r["backward"]["temporaries"] > 0 and r["peak"] == max(
        r[p]["peak"] for p in ("forward", "backward", "step"))


def test_saved_activations_of_the_tiny_transformer_match_its_own_formula():
    # Margin 1% (today it is exact): the formula reads what autograd saves for each layer.
    model = tiny()
    r = two_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), batch())
    want = tiny_transformer_activation_bytes(seq_len=T, batch_size=B, hidden=C,
                                             num_heads=HEADS, num_layers=LAYERS, vocab_size=V)
    assert abs(r["saved_activations"] - want) <= 0.01 * want, (r["saved_activations"], want)


def test_megatron_formula_differs_by_dropout_masks_attention_matrices_and_norm_statistics():
    # At 4 bytes a value, per layer: Megatron's 68·sbh + 10·a·s²·b against our 64·sbh +
    # 4·(4 + a)·sb: no dropout masks (4·sbh), no stored s x s attention (fused kernel), and
    # the layer norms' statistics and the log-sum-exp that Megatron leaves out.
    megatron = activation_bytes(seq_len=T, batch_size=B, hidden=C, num_heads=HEADS,
                                num_layers=LAYERS, bytes_per_value=4)
    ours = tiny_transformer_activation_bytes(seq_len=T, batch_size=B, hidden=C,
                                             num_heads=HEADS, num_layers=LAYERS, vocab_size=V)
    outside_blocks = 8 * T + 4 * (2 * T * B * C + 2 * T * B + T * B * V) + 8
    sb, sbh = T * B, T * B * C
    assert megatron - (ours - outside_blocks) == LAYERS * (
        4 * sbh + 10 * HEADS * T * T * B - 4 * (4 + HEADS) * sb)


def test_saved_activations_grow_linearly_with_the_batch():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    small, large = (two_steps(model, opt, batch(b=b))["saved_activations"] for b in (2, 4))
    fixed = 8 * T + 8                       # the position ids and the loss's scalars
    assert large - fixed == 2 * (small - fixed)


# -- 2 real ranks, ZeRO stages 0-3 -------------------------------------------------------

def stage_worker():
    from distlab.course.lab04_sharding import make_stage
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = {}
    for stage in range(4):
        net = tiny()
        num_params = sum(p.numel() for p in net.parameters())
        largest_unit = max(4 * sum(math.ceil(p.numel() / world_size) * world_size
                                   for p in m.parameters(recurse=False)) for m in net.modules())
        model, opt = make_stage(stage, net, "adam")
        r = two_steps(model, opt, batch(seed=rank, b=2))
        out[stage] = dict(measured=r, measure=memory.measure(model, opt), num_params=num_params,
                          num_tensors=len(list(net.parameters())) if stage != 3 else
                          len(list(model.parameters())), largest_unit=largest_unit)
    model = wrap(tiny(), "bucketed")
    out["ddp"] = two_steps(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           batch(seed=rank, b=2))
    out["ddp_params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


@pytest.fixture(scope="module")
def stages():
    return distlab.launch(stage_worker, 2)


def margin(result, world_size=2):
    # Adam keeps a 4-byte step count per tensor; shards pad each tensor to N elements.
    return result["num_tensors"] * (4 + 3 * 4 * (world_size - 1))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_end_of_step_model_states_equal_measure_on_each_rank(stages, stage):
    for rank in range(2):
        r = stages[rank][stage]
        assert {k: r["measured"]["end"][k] for k in memory.CATEGORIES} == r["measure"]


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_model_state_peak_is_zeros_formula_within_the_step_counters_and_padding(stages, stage):
    for rank in range(2):
        r = stages[rank][stage]
        predicted = sum(memory.predicted_bytes(r["num_params"], stage, 2, "adam").values())
        extra = r["measured"]["model_state_peak"] - predicted
        assert 0 <= extra <= margin(r), (stage, rank, extra)


def test_stage_2_peak_holds_at_most_one_full_gradient_in_flight(stages):
    for rank in range(2):
        r = stages[rank][2]
        predicted = sum(memory.predicted_bytes(r["num_params"], 2, 2, "adam").values())
        extra = r["measured"]["model_state_peak"] - predicted
        largest_grad = 4 * 64 * 16                 # fc1's weight, the largest parameter
        assert 0 <= extra <= margin(r) + largest_grad, (rank, extra)


def test_fsdp_forward_peak_is_the_shards_plus_exactly_the_largest_gathered_unit(stages):
    for rank in range(2):
        r = stages[rank][3]
        forward = r["measured"]["forward"]
        # In forward the gradients are None: the peak is params and state shards + one unit.
        assert forward["with_gathered_peak"] - forward["model_state_peak"] == r["largest_unit"]
        predicted = sum(memory.predicted_bytes(r["num_params"], 3, 2, "adam").values())
        assert predicted <= r["measured"]["with_gathered_peak"] <= \
            predicted + r["largest_unit"] + margin(r)


def test_collective_buffers_are_counted_as_communication(stages):
    for rank in range(2):
        assert stages[rank][0]["measured"]["forward"]["communication_peak"] == 0
        assert stages[rank][2]["measured"]["backward"]["communication_peak"] > 0
        assert stages[rank][3]["measured"]["forward"]["communication_peak"] > 0


def test_ddp_step_measured_is_synchronized_and_its_bucket_counted(stages):
    # Different data on each rank: equal parameters after the step mean the gradients were
    # averaged before the step, and the flat buckets were counted as communication.
    torch.testing.assert_close(stages[0]["ddp_params"], stages[1]["ddp_params"])
    assert stages[0]["ddp"]["backward"]["communication_peak"] > 0
