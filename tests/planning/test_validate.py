from dataclasses import replace

import pytest

from distlab.communication.cost_model import Fit

from distlab.model_parallel.mesh import MeshConfig
from distlab.planning.validate import (configurations, measure, predict_config, spearman,
                                       validate)


def test_spearman_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    assert spearman([1, 2, 3, 4], [10, 20, 35, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_gives_ties_their_mean_rank():
    # ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): Pearson of those = 0.9487
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, 3, 2, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1 - 6 * 2 / (5 * 24))


def test_configurations_are_predicted_far_apart_on_a_two_core_machine():
    # alpha, beta, gamma as cost_model.fit measured them on the 2-core lab machine
    fit = Fit("gloo", 3e-4, 2.4e-10, 0.05, 0.1, 6, gamma=3.4e-4, cores=2)
    predicted = [predict_config(c, 3e9, fit).seconds for c in configurations()]
    assert all(b > 1.5 * a for a, b in zip(predicted, predicted[1:]))


def test_measure_refuses_world_sizes_that_do_not_divide_the_largest():
    w = replace(configurations()[0].workload, batch_size=48)
    with pytest.raises(ValueError, match="divide the largest"):
        measure([MeshConfig(w, dp=2), MeshConfig(w, dp=3)])


def test_planner_ranks_six_real_configurations_as_measured():
    rows = validate()
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    print("\n".join(f"dp={r['dp']} tp={r['tp']} batch={r['batch_size']}: predicted "
                    f"{1e3 * r['predicted']:.1f} ms, measured {1e3 * r['measured']:.1f} ms"
                    for r in rows), f"\nSpearman rho = {rho:.3f}")
    assert len(rows) >= 6 and all(r["world_size"] <= 4 for r in rows)
    assert rho >= 0.8
