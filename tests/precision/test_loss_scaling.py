"""The dynamic loss scaler against torch.amp.GradScaler("cpu"), with injected overflows.

The same problem, the same injected infs: the same scale at every step, the same skipped
steps and the same parameters, on one process and on 2 ranks (where only one rank sees
the inf and the all-reduce MAX makes both skip).
"""
import pytest
import torch
import torch.distributed as dist

import distlab
from distlab.data_parallel.ddp import average_gradients
from distlab.precision.loss_scaling import DynamicLossScaler

pytestmark = pytest.mark.timeout(120)

STEPS, OVERFLOWS, INTERVAL = 12, (2, 6, 7), 3   # growth after 3 clean steps: it grows too


def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    X, y = torch.randn(STEPS, 8, 4), torch.randn(STEPS, 8, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), X, y


def inject(model, step):
    if step in OVERFLOWS:
        model[0].weight.grad[0, 0] = float("inf")


def run_grad_scaler():
    """torch's own: the scale at each step and which steps it skipped."""
    model, opt, X, y = problem()
    scaler = torch.amp.GradScaler("cpu", growth_interval=INTERVAL)
    scales, skipped = [], []
    for s in range(STEPS):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(X[s]), y[s])).backward()
        inject(model, s)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        scales.append(before)
        skipped.append(scaler.get_scale() < before)
    return scales, skipped, [p.detach().clone() for p in model.parameters()]


def run_ours(rank=None, world_size=1):
    model, opt, X, y = problem()
    scaler = DynamicLossScaler(growth_interval=INTERVAL)
    scales, skipped = [], []
    for s in range(STEPS):
        x, t = X[s], y[s]
        if rank is not None:
            x, t = x.chunk(world_size)[rank], t.chunk(world_size)[rank]
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), t)).backward()
        if rank is not None:
            average_gradients(list(model.parameters()))
        if rank in (None, world_size - 1):    # on 2 ranks only the last one sees the inf
            inject(model, s)
        scales.append(scaler.scale_value)
        found_inf = scaler.step(opt, model.parameters())
        scaler.update(found_inf)
        skipped.append(found_inf)
    return scales, skipped, [p.detach().clone() for p in model.parameters()]


def on_ranks():
    return run_ours(dist.get_rank(), dist.get_world_size())


def check_same(ours, theirs):
    assert ours[0] == theirs[0], "scales"
    assert ours[1] == theirs[1], "skipped steps"
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b)


def test_scales_skips_and_parameters_equal_grad_scaler():
    theirs = run_grad_scaler()
    scales = theirs[0]
    assert sum(theirs[1]) == len(OVERFLOWS)                              # backoffs
    assert any(b > a for a, b in zip(scales, scales[1:]))                # and a growth
    check_same(run_ours(), theirs)


def test_every_rank_skips_the_step_only_one_rank_overflowed():
    theirs = run_grad_scaler()
    for ours in distlab.launch(on_ranks, 2, timeout=60):
        check_same(ours, theirs)


def test_growth_after_interval_and_backoff_on_overflow():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    for found_inf, want in [(False, 8), (False, 16), (True, 8), (False, 8), (False, 16)]:
        scaler.update(found_inf)
        assert scaler.scale_value == want


def test_state_dict_loads_into_grad_scaler_and_back():
    ours = DynamicLossScaler(init_scale=1024.0, growth_interval=5)
    ours.update(False)
    theirs = torch.amp.GradScaler("cpu")
    theirs.load_state_dict(ours.state_dict())
    assert theirs.get_scale() == 1024.0 and theirs.state_dict() == ours.state_dict()
    again = DynamicLossScaler()
    again.load_state_dict(theirs.state_dict())
    assert again.state_dict() == ours.state_dict()


@pytest.mark.parametrize("kwargs, match", [
    (dict(init_scale=0), r"init_scale=0 is out of range"),
    (dict(growth_factor=1), r"growth_factor=1 is out of range"),
    (dict(backoff_factor=1.5), r"backoff_factor=1.5 is out of range"),
    (dict(growth_interval=True), r"growth_interval=True is out of range"),
])
def test_scaler_refuses_bad_numbers_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLossScaler(**kwargs)
