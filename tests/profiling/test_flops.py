"""FLOPs of a training step: 6·N·D, the count from the layer shapes, and torch's own counter."""
import pytest
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distlab.problems import models
from distlab.problems.workloads import Workload
from distlab.profiling import flops


def transformer(hidden=32, depth=2, block_size=16):
    return Workload(model="transformer", hidden=hidden, depth=depth, block_size=block_size,
                    batch_size=4)


def test_layer_count_of_the_linears_equals_torchs_flop_counter_on_a_training_step():
    """torch's FlopCounterMode counts every matmul of forward and backward (addmm, mm); on
    CPU it does not see the fused attention kernel, which is what the attention term adds."""
    wl = transformer()
    model = wl.build_model()
    X, y = next(wl.batches())
    with FlopCounterMode(display=False) as counter:
        wl.loss(model(X), y).backward()
    count = flops.layer_flops(model, X.numel(), wl.block_size)
    assert count["linear"] == counter.get_total_flops()
    assert count["attention"] == 12 * 2 * 32 * 16 * X.numel()
    assert count["total"] == count["linear"] + count["attention"]


def test_six_n_d_is_within_a_few_per_cent_of_the_layer_count_for_the_tiny_transformer():
    """6·N·D counts the embeddings (no matmul) and leaves attention out: the two roughly
    cancel at this size."""
    wl = transformer(hidden=64, block_size=32)
    model = wl.build_model()
    tokens = wl.batch_size * wl.block_size
    six = flops.six_n_d(models.num_parameters(model), tokens)
    total = flops.layer_flops(model, tokens, wl.block_size)["total"]
    assert six == 6 * sum(p.numel() for p in model.parameters()) * tokens
    assert abs(six - total) / total < 0.1, (six, total)


def test_layer_count_of_a_plain_mlp_has_no_attention_term():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    assert flops.layer_flops(mlp, 10, 1) == {"linear": 6 * 10 * (8 * 16 + 16 * 2),
                                             "attention": 0, "total": 6 * 10 * 160}


def test_peak_and_mfu():
    peak = flops.peak_matmul_flops(size=128, repeats=3)
    assert 0 < peak < float("inf")      # a loaded shared machine: no floor is safe
    assert flops.mfu(2e9, 2.0, 1e10) == pytest.approx(0.1)


@pytest.mark.parametrize("call, match", [
    (lambda: flops.six_n_d(0, 5), r"num_params=0 is out of range"),
    (lambda: flops.six_n_d(10, True), r"tokens=True is out of range"),
    (lambda: flops.layer_flops(nn.Linear(2, 2), 0, 1), r"tokens=0 is out of range"),
    (lambda: flops.attention_flops(2, 8, 0, 4), r"seq_len=0 is out of range"),
    (lambda: flops.peak_matmul_flops(size=4), r"size=4 is out of range"),
    (lambda: flops.mfu(1.0, 0.0, 1.0), r"seconds=0.0 is out of range"),
    (lambda: flops.mfu(1.0, 1.0, float("nan")), r"peak=nan is out of range"),
])
def test_bad_numbers_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()
