"""distlab.heterogeneous.hetero_sgd: unequal shares, example-weighted, equal single-process SGD."""
from dataclasses import replace

import pytest
import torch

from distlab.heterogeneous import hetero_sgd
from distlab.heterogeneous.hetero_sgd import HeteroSGDConfig, imbalance, reference
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)

MLP = Workload(model="mlp", hidden=8, depth=1, batch_size=24, lr=0.2, num_steps=6)


def _assert_equals_reference(config):
    results, ref = hetero_sgd.run(config), reference(config)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]))
        torch.testing.assert_close(r["params"], ref["params"])
    return results


def test_equal_shares_equal_single_process_sgd():
    _assert_equals_reference(HeteroSGDConfig(workload=MLP, world_size=2, proportional=False))


def test_unequal_shares_equal_single_process_sgd_when_example_weighted():
    results = _assert_equals_reference(HeteroSGDConfig(workload=MLP, world_size=3,
                                                       speeds=(1.0, 2.0, 5.0)))
    assert [r["batch"] for r in results] == [3, 6, 15]


def test_a_single_rank_is_single_process_sgd():
    _assert_equals_reference(HeteroSGDConfig(workload=MLP, world_size=1))


def test_four_ranks_with_unequal_shares_equal_single_process_sgd():
    _assert_equals_reference(HeteroSGDConfig(workload=MLP, world_size=4, speeds=(1, 1, 2, 4)))


def test_the_plain_average_of_unequal_shares_is_not_single_process_sgd():
    config = HeteroSGDConfig(workload=MLP, world_size=2, speeds=(1.0, 5.0),
                             example_weighted=False)
    results, ref = hetero_sgd.run(config), reference(config)
    assert config.shares == (4, 20)
    assert not torch.allclose(results[0]["params"], ref["params"], atol=1e-4)


def test_proportional_shares_balance_the_compute_that_equal_shares_leave_unequal():
    # Injected speeds 1 and 4: with equal shares the slow rank computes ~4x as long; with
    # shares in proportion it computes as long as the fast one. One run of each, compared.
    slow = Workload(model="mlp", hidden=8, depth=1, batch_size=40, lr=0.1, num_steps=4)
    base = HeteroSGDConfig(workload=slow, world_size=2, speeds=(1.0, 4.0), step_time=0.1)
    equal = imbalance(hetero_sgd.run(replace(base, proportional=False)))
    balanced = imbalance(hetero_sgd.run(base))
    assert equal > 2.0, equal
    assert balanced < 1.6, balanced
    assert equal / balanced > 1.8, (equal, balanced)


@pytest.mark.parametrize("field, value", [("world_size", 0), ("speeds", (1.0,)),
                                          ("speeds", (1.0, 0.0)), ("speeds", [1.0, 2.0]),
                                          ("speeds", (1.0, True)), ("proportional", 1),
                                          ("example_weighted", None), ("step_time", -1.0)])
def test_bad_configs_are_refused_before_any_process_starts(field, value):
    with pytest.raises(ValueError, match=rf"HeteroSGDConfig\.{field}="):
        HeteroSGDConfig(**{"workload": MLP, "world_size": 2, field: value})


def test_a_global_batch_smaller_than_the_ranks_is_refused():
    small = Workload(model="mlp", hidden=8, depth=1, batch_size=2, num_steps=2)
    with pytest.raises(ValueError, match=r"HeteroSGDConfig\.workload=.*batch_size >= world_size=3"):
        HeteroSGDConfig(workload=small, world_size=3)
