"""distlab.communication.cost_model: the textbook formulas, the fit, and measurements on real processes."""
import math

import numpy as np
import pandas as pd
import pytest

from distlab.communication import cost_model as cm
from distlab.communication.netsim import Network

pytestmark = pytest.mark.timeout(180)


def test_textbook_terms():
    n = 1000
    assert cm.terms("ring", n, 4) == (6, 1500)
    assert cm.terms("gloo", n, 4) == (6, 1500)
    assert cm.terms("reduce_scatter", n, 4) == (3, 750)
    assert cm.terms("all_gather", n, 4) == (3, 750)
    assert cm.terms("recursive_doubling", n, 8) == (3, 3000)
    assert cm.terms("recursive_doubling", n, 6) == (4, 4000)     # fold, 2 rounds, unfold
    assert cm.terms("naive", n, 4) == (6, 6000)
    assert cm.terms("ring", n, 1) == (0, 0)
    assert cm.predict("ring", n, 4, alpha=1e-5, beta=1e-9) == pytest.approx(6e-5 + 1.5e-6)
    with pytest.raises(ValueError, match="algorithm='tree' is unknown"):
        cm.terms("tree", n, 4)


@pytest.mark.parametrize("algorithm", cm.ALGORITHMS)
def test_terms_refuse_a_world_of_no_ranks(algorithm):
    with pytest.raises(ValueError, match="world_size=0 is out of range; allowed an int >= 1"):
        cm.terms(algorithm, 1000, 0)


@pytest.mark.parametrize("algorithm", cm.ALGORITHMS)
def test_terms_refuse_negative_bytes(algorithm):
    with pytest.raises(ValueError, match="nbytes=-5 is out of range; allowed a number of bytes >= 0"):
        cm.terms(algorithm, -5, 4)


def test_predict_refuses_negative_alpha_and_beta():
    with pytest.raises(ValueError, match="alpha=-1e-05 is out of range"):
        cm.predict("ring", 1000, 4, alpha=-1e-5, beta=1e-9)
    with pytest.raises(ValueError, match="beta=-1e-09 is out of range"):
        cm.predict("ring", 1000, 4, alpha=1e-5, beta=-1e-9)


def test_fit_refuses_measurements_that_are_not_positive_times():
    df = synthetic(50e-6, 1e-9)
    df.loc[3, "time"] = 0.0
    with pytest.raises(ValueError, match=r"fit: measurements.time=0.0 is out of range"):
        cm.fit(df)
    with pytest.raises(ValueError, match=r"relative_errors: measurements.time=0.0"):
        cm.relative_errors(df, cm.fit(synthetic(50e-6, 1e-9)))


def test_a_fit_with_a_negative_parameter_cannot_be_built():
    with pytest.raises(ValueError, match="Fit.beta=-1.0 is out of range"):
        cm.Fit("ring", alpha=0.0, beta=-1.0, median_error=0.0, max_error=0.0, num_points=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(repeats=0), "repeats=0 is out of range"),
    (dict(world_sizes=(2, 0)), r"world_sizes=\(2, 0\): each must be an int"),
    (dict(timeout=-1), "timeout=-1 is out of range"),
    (dict(sizes=(2,)), r"sizes=\(2,\): each must be an int number of bytes"),
])
def test_measure_refuses_bad_settings_before_starting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cm.measure(**kwargs)


def synthetic(alpha, beta, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = [dict(algorithm=a, world_size=p, nbytes=n,
                 time=cm.predict(a, n, p, alpha, beta) * (1 + noise * rng.standard_normal()))
            for a in ("ring", "naive") for p in (2, 4, 8) for n in (4096, 65536, 1 << 20, 1 << 24)]
    return pd.DataFrame(rows)


def test_fit_recovers_alpha_and_beta():
    fits = cm.fit(synthetic(50e-6, 1e-9))
    for f in fits.values():
        assert f.alpha == pytest.approx(50e-6, rel=1e-6) and f.beta == pytest.approx(1e-9, rel=1e-6)
        assert f.median_error < 1e-9 and f.num_points == 12
        assert f.bandwidth == pytest.approx(1e9)
    noisy = cm.fit(synthetic(50e-6, 1e-9, noise=0.1))
    assert all(0.02 < f.median_error < 0.2 for f in noisy.values())
    assert "alpha = " in str(noisy["ring"]) and "median error" in str(noisy["ring"])
    df = synthetic(50e-6, 1e-9)
    assert cm.relative_errors(df, fits).max() < 1e-9


def test_fit_keeps_parameters_non_negative():
    df = synthetic(0.0, 1e-9)
    df.loc[df.nbytes == 4096, "time"] *= 0.5          # would pull alpha below zero
    f = cm.fit(df)["ring"]
    assert f.alpha >= 0 and f.beta > 0


def crowded(alpha, beta, gamma, cores, noise=0.0, seed=0, delta=0.0):
    rng = np.random.default_rng(seed)
    rows = [dict(algorithm=a, world_size=p, nbytes=n,
                 time=cm.predict(a, n, p, alpha, beta, gamma=gamma, cores=cores, delta=delta)
                 * (1 + noise * rng.standard_normal()))
            for a in ("ring", "naive") for p in (2, 4, 8) for n in (4096, 65536, 1 << 20)]
    return pd.DataFrame(rows)


def test_predict_adds_the_oversubscription_term_only_past_the_cores():
    base = cm.predict("ring", 4096, 4, alpha=1e-5, beta=1e-9)
    assert cm.predict("ring", 4096, 4, 1e-5, 1e-9, gamma=1e-3, cores=4) == base
    assert cm.predict("ring", 4096, 4, 1e-5, 1e-9, gamma=1e-3, cores=2) == pytest.approx(
        base + 6 * 1e-3)                                     # 2(p-1) messages, 1 waiting rank


def test_fit_recovers_gamma_from_more_ranks_than_cores():
    fits = cm.fit(crowded(50e-6, 1e-9, 400e-6, cores=2), cores=2)
    for f in fits.values():
        assert f.alpha == pytest.approx(50e-6, rel=1e-6) and f.beta == pytest.approx(1e-9, rel=1e-6)
        assert f.gamma == pytest.approx(400e-6, rel=1e-6) and f.cores == 2
        assert "gamma = 400.0 µs" in str(f)
    errors = cm.errors_by_crowding(crowded(50e-6, 1e-9, 400e-6, cores=2), fits)
    assert errors["p <= cores"] < 1e-9 and errors["p > cores"] < 1e-9


def test_fit_recovers_delta_when_the_bytes_share_the_cores_too():
    df = crowded(50e-6, 1e-9, 400e-6, cores=2, delta=0.6e-9)
    for f in cm.fit(df, cores=2).values():
        assert f.beta == pytest.approx(1e-9, rel=1e-6) and f.delta == pytest.approx(0.6e-9, rel=1e-6)
        assert f.gamma == pytest.approx(400e-6, rel=1e-6) and "delta = 0.600 ns/B" in str(f)
    without = cm.fit(crowded(50e-6, 1e-9, 400e-6, cores=2), cores=2)
    assert all(f.delta == pytest.approx(0.0, abs=1e-15) for f in without.values())


def test_a_noisy_crowded_machine_is_fitted_within_twenty_percent_where_ranks_have_cores():
    df = crowded(200e-6, 1e-9, 300e-6, cores=2, delta=0.6e-9, noise=0.1)
    errors = cm.errors_by_crowding(df, cm.fit(df, cores=2))
    assert errors["p <= cores"] <= 0.2 and errors["p > cores"] <= 0.2


def test_the_plain_model_misses_where_ranks_outnumber_cores():
    df = crowded(50e-6, 1e-9, 400e-6, cores=2)
    plain = cm.fit(df, cores=64)                             # no rank waits: gamma cannot help
    assert all(f.gamma == 0.0 for f in plain.values())
    assert cm.relative_errors(df, plain).median() > 0.2


def test_errors_by_crowding_is_nan_for_a_side_with_no_measurement():
    df = synthetic(50e-6, 1e-9)
    errors = cm.errors_by_crowding(df, cm.fit(df, cores=8), cores=8)
    assert errors["p <= cores"] < 1e-9 and math.isnan(errors["p > cores"])


def test_fit_refuses_a_machine_of_no_cores():
    with pytest.raises(ValueError, match="fit: cores=0 is out of range"):
        cm.fit(synthetic(50e-6, 1e-9), cores=0)


def test_measure_on_real_processes_and_the_injected_floor():
    net = Network(latency=2e-3)
    df = cm.measure(world_sizes=(2, 3), sizes=(4096, 65536), algorithms=("ring", "naive"),
                    repeats=1, network=net)
    assert list(df.columns) == ["algorithm", "world_size", "nbytes", "time"]
    assert len(df) == 2 * 2 * 2
    for row in df.itertuples():
        a, _ = cm.terms(row.algorithm, row.nbytes, row.world_size)
        assert row.time >= 0.9 * a * net.latency, row      # each step paid the injected latency
    fits = cm.fit(df)
    assert set(fits) == {"ring", "naive"}
    assert fits["ring"].alpha >= 0.5 * net.latency   # the machine adds its own on top
