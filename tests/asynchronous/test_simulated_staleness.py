"""Simulated staleness: exact, reproducible, and the divergence the lab shows."""
from dataclasses import replace

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from distlab.asynchronous import simulated_staleness as st
from distlab.problems.convex import WORKLOAD, flat_gradient


def wl(**fields):
    """Lab 03's workload (linear regression, 32 examples per gradient) with ``fields`` changed."""
    return replace(WORKLOAD, **fields)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_zero_delay_is_plain_sgd(model):
    w = wl(model=model, lr=0.1, num_steps=30).loaded()
    cfg = st.SimulatedStalenessConfig(w, staleness=0)
    net, ds = w.build_model(), w.dataset
    x = parameters_to_vector(net.parameters()).detach().clone()
    for idx in st.minibatches(cfg):
        _, g = flat_gradient(net, w.loss, ds.X[idx], ds.y[idx], x)
        x = x - 0.1 * g
    torch.testing.assert_close(st.simulate(cfg).params, x)


def test_fixed_delay_uses_parameters_from_tau_steps_back():
    w = wl(lr=0.1, num_steps=12).loaded()
    cfg = st.SimulatedStalenessConfig(w, staleness=3)
    net, ds = w.build_model(), w.dataset
    xs = [parameters_to_vector(net.parameters()).detach().clone()]
    for t, idx in enumerate(st.minibatches(cfg)):
        _, g = flat_gradient(net, w.loss, ds.X[idx], ds.y[idx], xs[max(t - 3, 0)])
        xs.append(xs[-1] - 0.1 * g)
    result = st.simulate(cfg)
    torch.testing.assert_close(result.params, xs[-1])
    assert result.metrics["staleness"].tolist() == [0, 1, 2] + [3] * 9


@pytest.mark.parametrize("distribution", st.DISTRIBUTIONS)
def test_simulation_is_bit_reproducible(distribution):
    cfg = st.SimulatedStalenessConfig(wl(num_steps=80), staleness=4, distribution=distribution)
    a, b = st.simulate(cfg), st.simulate(cfg)
    assert torch.equal(a.params, b.params)
    assert a.metrics["loss"].tolist() == b.metrics["loss"].tolist()
    taus = st.draw_delays(cfg)
    assert torch.equal(taus, st.draw_delays(cfg)) and taus.min() >= 0
    if distribution == "uniform":
        assert taus.max() <= 4


def test_large_lr_with_staleness_diverges_and_the_staleness_aware_rule_recovers():
    common = dict(workload=wl(lr=0.5, num_steps=150), staleness=8)
    plain = st.simulate(st.SimulatedStalenessConfig(**common))
    aware = st.simulate(st.SimulatedStalenessConfig(staleness_aware=True, **common))
    fresh = st.simulate(st.SimulatedStalenessConfig(**{**common, "staleness": 0}))
    assert plain.diverged and "diverged at step" in plain.diverged
    assert aware.diverged is None and aware.final_loss < 0.5
    assert fresh.diverged is None


def test_the_launched_run_equals_the_reference_bit_for_bit():
    cfg = st.SimulatedStalenessConfig(wl(num_steps=20), distribution="uniform")
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


def test_every_minibatch_holds_the_workloads_batch_size_of_examples():
    cfg = st.SimulatedStalenessConfig(wl(batch_size=5, num_steps=3))
    assert [len(idx) for idx in st.minibatches(cfg)] == [5, 5, 5]


def test_a_workload_the_flat_vector_cannot_train_is_refused():
    with pytest.raises(ValueError, match="SimulatedStalenessConfig.workload=.*model in"):
        st.SimulatedStalenessConfig(wl(model="transformer", hidden=32))
