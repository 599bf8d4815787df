"""3-D parallelism: data x tensor x pipeline, against a single process."""
import pytest
import torch
from torch.testing import assert_close

import distlab
from distlab.communication.cost_model import Fit
from distlab.model_parallel import three_d, three_d_plan
from distlab.model_parallel.three_d import ThreeDConfig
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)

LM = Workload("transformer", hidden=16, num_heads=4, depth=2, block_size=8, batch_size=8,
              num_steps=2, lr=0.3)


def assert_equals_one_process(configs, results):
    for config, runs in zip(configs, zip(*results)):
        ref = three_d.reference(config)
        seen = set()
        for rank, run in enumerate(runs):
            where = f"dp={config.dp} tp={config.tp} pp={config.pp}, rank {rank}"
            assert (run["dp_rank"], run["tp_rank"], run["pp_rank"]) == \
                config.coordinates(rank)
            assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]),
                         rtol=1e-5, atol=1e-5, msg=where)
            for key, value in run["state"].items():
                assert_close(value, ref["state"][key], rtol=1e-5, atol=1e-5,
                             msg=f"{where}: {key}")
            seen |= set(run["state"])
        assert seen == set(ref["state"])      # the stages hold the whole model between them


def test_three_d_training_on_4_ranks_matches_single_process():
    configs = [ThreeDConfig(LM.loaded(), dp, tp, pp)
               for dp, tp, pp in [(1, 2, 2), (2, 1, 2), (2, 2, 1)]]
    results = distlab.launch(three_d.sweep, 4, configs, timeout=120)
    assert_equals_one_process(configs, results)


def test_three_d_training_on_8_ranks_matches_single_process():
    config = ThreeDConfig(LM.loaded(), dp=2, tp=2, pp=2)
    results = distlab.launch(three_d.sweep, 8, [config], timeout=120)
    assert_equals_one_process([config], results)
    ops = set(results[0][0]["by_op"])
    assert {"all_reduce", "send", "recv", "broadcast"} <= ops


def test_ranks_are_laid_out_tp_fastest_then_dp_then_pp():
    table = three_d.mesh_table(ThreeDConfig(dp=2, tp=2, pp=2))
    assert table.groups == {"tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
                            "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
                            "pp": [[0, 4], [1, 5], [2, 6], [3, 7]]}
    assert table.rows[5] == dict(rank=5, dp=0, tp=1, pp=1, tp_group=[4, 5],
                                 dp_group=[5, 7], pp_group=[1, 5])
    assert [r["rank"] for r in table.rows] == list(range(8))


def test_bad_grids_are_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="tp=3 is out of range; allowed a divisor of "
                                         "num_heads=4"):
        ThreeDConfig(LM, dp=1, tp=3, pp=1)
    with pytest.raises(ValueError, match="pp=3 is out of range; allowed at most depth=2"):
        ThreeDConfig(LM, dp=1, tp=1, pp=3)
    with pytest.raises(ValueError, match="num_microbatches=4 is out of range; allowed a "
                                         "divisor of batch_size/dp=2"):
        ThreeDConfig(LM, dp=4, tp=1, pp=1, num_microbatches=4)
    with pytest.raises(ValueError, match="dp=3 is out of range; allowed a divisor of "
                                         "batch_size=8"):
        ThreeDConfig(LM, dp=3, tp=1, pp=1)
    with pytest.raises(ValueError, match="pp=2 is out of range; allowed at most 1 with "
                                         "dp=2, tp=4"):
        ThreeDConfig(LM, dp=2, tp=4, pp=2)
    with pytest.raises(ValueError, match="workload="):
        ThreeDConfig(Workload("mlp"))
    with pytest.raises(ValueError, match="schedule='zigzag'"):
        ThreeDConfig(LM, schedule="zigzag")


def test_measured_step_time_is_the_median_of_the_slowest_rank_after_the_first_step():
    results = [{"step_seconds": [9.0, 1.0, 3.0]}, {"step_seconds": [8.0, 2.0, 1.0]}]
    assert three_d_plan.measured_step_time(results) == 2.5     # slowest: 9, 2, 3


def test_planner_table_gives_every_config_a_prediction_and_a_measurement():
    # alpha, beta, gamma as cost_model.fit measured them on the 2-core lab machine
    fit = Fit("gloo", 3e-4, 2.4e-10, 0.05, 0.1, 6, gamma=3.4e-4, cores=2)
    rows = three_d_plan.compare([ThreeDConfig(LM, dp=1, tp=2, pp=2)], fit=fit, flops=3e9)
    assert [(r["config"], r["world_size"]) for r in rows] == [("dp=1 tp=2 pp=2 m=2", 4)]
    for r in rows:
        assert r["predicted"] > 0 and r["measured"] > 0
        assert r["ratio"] == pytest.approx(r["predicted"] / r["measured"])


def train_on_ranks_1_and_2(config):
    """Rank 0 stays out: the grid is built inside a subgroup of the world."""
    import torch.distributed as dist
    group = dist.new_group([1, 2])
    return None if dist.get_rank() == 0 else three_d.train(config, group)["losses"]


def test_three_d_trains_inside_a_subgroup_of_the_world():
    config = ThreeDConfig(LM.loaded(), dp=1, tp=1, pp=2)     # the last stage is world rank 2
    results = distlab.launch(train_on_ranks_1_and_2, 3, config, timeout=120)
    assert results[0] is None
    for losses in results[1:]:
        assert_close(torch.tensor(losses), torch.tensor(three_d.reference(config)["losses"]),
                     rtol=1e-5, atol=1e-5)
