from dataclasses import replace

import pytest

from distlab.communication.cost_model import Fit
from distlab.model_parallel.mesh import MeshConfig
from distlab.planning.validate import (configurations, crowded_gamma, measure, measure_compute,
                                       pipeline_configurations, predict_config, spearman,
                                       validate)
from distlab.problems.workloads import Workload


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


def test_pipeline_configurations_fall_between_and_beyond_the_grids_predictions():
    fit = Fit("gloo", 3e-4, 2.4e-10, 0.05, 0.1, 6, gamma=3.4e-4, cores=2)
    configs = configurations() + pipeline_configurations()
    predicted = sorted(predict_config(c, 3e9, fit).seconds for c in configs)
    assert all(b > 1.5 * a for a, b in zip(predicted, predicted[1:]))
    assert {(c.world_size, c.pp) for c in pipeline_configurations()} == {(4, 2)}


def test_planner_ranks_real_dp_tp_and_pipeline_configurations_as_measured():
    rows = validate(configurations() + pipeline_configurations())
    rho = spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])
    print("\n".join(f"dp={r['dp']} tp={r['tp']} pp={r['pp']} m={r['microbatches']} "
                    f"batch={r['batch_size']}: predicted {1e3 * r['predicted']:.1f} ms, "
                    f"measured {1e3 * r['measured']:.1f} ms" for r in rows),
          f"\nSpearman rho = {rho:.3f}")
    assert len(rows) >= 8 and all(r["world_size"] <= 4 for r in rows)
    assert sum(r["pp"] > 1 for r in rows) >= 2
    assert rho >= 0.8


def test_crowded_gamma_fits_the_small_message_time_beyond_the_cores():
    rows = [dict(world_size=2, time=9.0), dict(world_size=4, time=3e-4),
            dict(world_size=8, time=7e-4)]                # alpha 1e-4 + gamma 2e-4 * (1, 3)
    assert crowded_gamma(rows, alpha=1e-4, cores=2) == pytest.approx(2e-4)
    assert crowded_gamma(rows[:1], alpha=1e-4, cores=2) == 0.0


def test_measure_compute_splits_a_step_into_flops_and_a_fixed_overhead():
    w = Workload("transformer", hidden=16, num_heads=2, depth=1, block_size=8, batch_size=16,
                 num_steps=3).loaded()
    flops, overhead = measure_compute(w, small_batch=2)
    assert flops > 0 and overhead >= 0
    with pytest.raises(ValueError, match="small_batch"):
        measure_compute(w, small_batch=16)
