"""Mixed-precision data parallelism: bf16 autocast and fp16 with master weights, against fp32
and against their own single-process runs, on real gloo ranks."""
from dataclasses import replace

import pytest
import torch

import distlab
from distlab.precision import mixed
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(180)

BASE = mixed.MixedPrecisionConfig(
    workload=Workload(model="mlp", hidden=16, batch_size=16, lr=0.01, optimizer_name="adam",
                      num_steps=6), world_size=2, precision="fp32")
OVERFLOWING = replace(BASE, precision="fp16", init_scale=2.0 ** 19, growth_interval=4)
"""2**19 times the loss overflows fp16's gradients: back off, 4 clean steps, grow, overflow."""
TOLERANCE = {"fp32": dict(atol=1e-6, rtol=1e-5), "bf16": dict(atol=2e-3, rtol=1e-2),
             "fp16": dict(atol=5e-4, rtol=1e-3)}
"""Final weights of 2 ranks against one process: the rounding of the precision (the ranks
sum half-batch gradients where the reference sums one batch)."""
CURVE_MARGIN = 0.01
"""bf16 and fp16 loss curves stay within 1% of fp32's at every step (measured on this
6-step MLP: bf16 0.05%, fp16 0.004%)."""


def on_ranks(configs):
    return [mixed.train(c) for c in configs]


@pytest.fixture(scope="module")
def runs():
    configs = [replace(BASE, precision=p) for p in mixed.PRECISIONS] + [OVERFLOWING]
    per_rank = distlab.launch(on_ranks, 2, configs, timeout=150)
    return {name: ([r[k] for r in per_rank], mixed.reference(c))
            for k, (name, c) in enumerate(zip([*mixed.PRECISIONS, "overflow"], configs))}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_loss_curve_follows_fp32_within_margin(runs, precision):
    fp32 = runs["fp32"][1]["losses"]
    for a, b in zip(runs[precision][1]["losses"], fp32):
        assert abs(a - b) <= CURVE_MARGIN * b, (a, b)


@pytest.mark.parametrize("precision", mixed.PRECISIONS)
def test_two_ranks_equal_single_process_in_each_precision(runs, precision):
    ranks, ref = runs[precision]
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], atol=0, rtol=0)
    torch.testing.assert_close(ranks[0]["params"], ref["params"], **TOLERANCE[precision])


def test_fp16_overflow_backs_off_grows_and_overflows_again(runs):
    ref = runs["overflow"][1]
    assert ref["skipped"] == [True, False, False, False, False, True], ref["skipped"]
    s = ref["scales"]
    assert s[1] == s[0] / 2 and s[5] == 2 * s[4], s


def test_fp16_ranks_skip_the_same_steps_and_stay_identical(runs):
    # Each rank's half batch has gradients twice as large as the whole batch's (a mean over
    # half the examples), so where it overflows may differ from one process: the ranks
    # must agree with each other.
    ranks, _ = runs["overflow"]
    assert ranks[0]["skipped"][0] and ranks[0]["scales"][1] == ranks[0]["scales"][0] / 2
    assert ranks[0]["skipped"] == ranks[1]["skipped"] and ranks[0]["scales"] == ranks[1]["scales"]
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], atol=0, rtol=0)


def test_fp16_keeps_fp16_weights_and_fp32_masters_that_step():
    model = torch.nn.Linear(4, 2).half()
    params = list(model.parameters())
    masters = mixed.master_weights(params)
    opt = torch.optim.SGD(masters, lr=1e-4)
    scaler = mixed.DynamicLossScaler(init_scale=1024.0)
    before = model.weight.detach().clone()
    for _ in range(3):
        scaler.scale(model(torch.ones(1, 4).half()).float().sum()).backward()
        assert not mixed.fp16_step(opt, scaler, params, masters)
        model.zero_grad()
    assert masters[0].dtype == torch.float32 and model.weight.dtype == torch.float16
    assert (masters[0] != before.float()).all()
    # The fp16 weights are the masters rounded: updates below fp16's resolution add up.
    torch.testing.assert_close(model.weight, masters[0].half(), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(precision="fp8"), r"precision='fp8' is out of range"),
    (dict(world_size=3), r"world_size=3 is out of range"),
    (dict(init_scale=-1.0), r"init_scale=-1.0 is out of range"),
])
def test_config_refuses_bad_values_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        replace(BASE, **kwargs)
