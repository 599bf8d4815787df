"""Simulated staleness: exact, reproducible, and the divergence the lab shows."""
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from distlab.asynchronous import simulated_staleness as st
from distlab.problems.convex import build, flat_gradient


def test_zero_delay_is_plain_sgd():
    cfg = st.SimulatedStalenessConfig(staleness=0, lr=0.1, num_steps=30, batch_size=None)
    model, ds, loss_fn = build(cfg.problem, cfg.hidden, cfg.seed)
    x = parameters_to_vector(model.parameters()).detach().clone()
    for _ in range(30):
        _, g = flat_gradient(model, loss_fn, ds.X, ds.y, x)
        x = x - 0.1 * g
    torch.testing.assert_close(st.simulate(cfg).params, x)


def test_fixed_delay_uses_parameters_from_tau_steps_back():
    cfg = st.SimulatedStalenessConfig(staleness=3, lr=0.1, num_steps=12, batch_size=None)
    model, ds, loss_fn = build(cfg.problem, cfg.hidden, cfg.seed)
    xs = [parameters_to_vector(model.parameters()).detach().clone()]
    for t in range(12):
        _, g = flat_gradient(model, loss_fn, ds.X, ds.y, xs[max(t - 3, 0)])
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


def test_the_launched_run_equals_the_reference_bit_for_bit():
    cfg = st.SimulatedStalenessConfig(num_steps=20, distribution="uniform")
    handle = st.start(cfg, timeout=60)
    out = handle.result()[0]
    assert out["diverged"] is None
    assert torch.equal(out["params"], st.reference(cfg))
    losses = handle.metrics().dropna(subset=["loss"])
    assert len(losses) == 20 and out["loss"] == losses["loss"].iloc[-1]


def test_an_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="distribution='poisson'"):
        st.SimulatedStalenessConfig(distribution="poisson")


def test_a_negative_staleness_is_refused():
    with pytest.raises(ValueError, match="staleness=-2"):
        st.SimulatedStalenessConfig(staleness=-2)


def test_staleness_aware_must_be_true_or_false():
    with pytest.raises(ValueError, match="staleness_aware=1"):
        st.SimulatedStalenessConfig(staleness_aware=1)
