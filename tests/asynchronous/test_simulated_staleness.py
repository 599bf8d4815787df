"""Simulated staleness: exact, reproducible, and the divergence the lab shows."""
import pytest
import torch

from distlab.asynchronous import simulated_staleness as st
from distlab.asynchronous.parameter_server import build_problem, gradient
from torch.nn.utils import parameters_to_vector


def test_zero_delay_is_plain_sgd():
    cfg = st.SimulatedStalenessConfig(staleness=0, lr=0.1, num_steps=30, batch_size=None)
    model, ds, loss_fn = build_problem(cfg)
    x = parameters_to_vector(model.parameters()).detach().clone()
    for _ in range(30):
        _, g = gradient(model, loss_fn, ds.X, ds.y, x)
        x = x - 0.1 * g
    torch.testing.assert_close(st.simulate(cfg).params, x)


def test_fixed_delay_uses_parameters_from_tau_steps_back():
    cfg = st.SimulatedStalenessConfig(staleness=3, lr=0.1, num_steps=12, batch_size=None)
    model, ds, loss_fn = build_problem(cfg)
    xs = [parameters_to_vector(model.parameters()).detach().clone()]
    for t in range(12):
        _, g = gradient(model, loss_fn, ds.X, ds.y, xs[max(t - 3, 0)])
        xs.append(xs[-1] - 0.1 * g)
    result = st.simulate(cfg)
    torch.testing.assert_close(result.params, xs[-1])
    assert result.metrics["staleness"].tolist() == [0, 1, 2] + [3] * 9


@pytest.mark.parametrize("distribution", st.DISTRIBUTIONS)
def test_simulation_is_bit_reproducible(distribution):
    cfg = st.SimulatedStalenessConfig(staleness=4, distribution=distribution, num_steps=80)
    a, b = st.simulate(cfg), st.simulate(cfg)
    assert torch.equal(a.params, b.params)
    assert a.metrics["loss"].tolist() == b.metrics["loss"].tolist()
    taus = st.draw_delays(cfg)
    assert torch.equal(taus, st.draw_delays(cfg)) and taus.min() >= 0
    if distribution == "uniform":
        assert taus.max() <= 4


def test_large_lr_with_staleness_diverges_and_the_staleness_aware_rule_recovers():
    common = dict(staleness=8, lr=0.5, num_steps=150)
    plain = st.simulate(st.SimulatedStalenessConfig(**common))
    aware = st.simulate(st.SimulatedStalenessConfig(staleness_aware=True, **common))
    fresh = st.simulate(st.SimulatedStalenessConfig(**{**common, "staleness": 0}))
    assert plain.diverged and "diverged at step" in plain.diverged
    assert aware.diverged is None and aware.final_loss < 0.5
    assert fresh.diverged is None


def test_sweep_and_one_rank_launch():
    df = st.sweep([0, 8], [0.05, 0.5], num_steps=60)
    assert len(df) == 4 and df["diverged"].tolist() == [False, False, False, True]
    run = st.start(st.SimulatedStalenessConfig(num_steps=20), timeout=60)
    assert run.result()[0]["diverged"] is None
    assert len(run.metrics().dropna(subset=["loss"])) == 20


def test_bad_config():
    with pytest.raises(ValueError, match="distribution='poisson'"):
        st.SimulatedStalenessConfig(distribution="poisson")
    with pytest.raises(ValueError, match="staleness=-2"):
        st.SimulatedStalenessConfig(staleness=-2)
