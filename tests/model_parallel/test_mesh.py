"""2D parallelism: the DP x TP grid, and its training against a single process."""
import pytest
import torch
from torch.testing import assert_close

import distlab
from distlab.model_parallel import mesh
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)

MLP = Workload("mlp", hidden=16, depth=2, batch_size=32, num_steps=3)
LM = Workload("transformer", hidden=16, num_heads=4, depth=1, block_size=8, batch_size=4,
              num_steps=2, lr=0.3)


@pytest.mark.parametrize("world_size,grids", [(2, [(1, 2), (2, 1)]), (4, [(2, 2), (1, 4)])])
def test_dp_tp_training_matches_single_process(world_size, grids):
    workloads = [MLP.loaded(), LM.loaded()]     # the caller loads the data, once
    configs = [mesh.MeshConfig(w, dp, tp) for dp, tp in grids for w in workloads]
    results = distlab.launch(mesh.sweep, world_size, configs, timeout=120)
    refs = [mesh.reference(c) for c in configs]
    for rank, runs in enumerate(results):
        for c, run, ref in zip(configs, runs, refs):
            assert (run["dp_rank"], run["tp_rank"]) == divmod(rank, c.tp)
            assert_close(torch.tensor(run["losses"]), torch.tensor(ref),
                         rtol=1e-5, atol=1e-5, msg=f"{c} rank {rank}")
            ops = set(run["by_op"])
            assert ("all_reduce" in ops) == (c.world_size > 1)


def test_grid_puts_tensor_parallel_neighbours_on_consecutive_ranks():
    c = mesh.MeshConfig(Workload(hidden=48), dp=2, tp=3)
    assert c.grid() == [[0, 1, 2], [3, 4, 5]]
    assert c.tp_groups() == [[0, 1, 2], [3, 4, 5]]
    assert c.dp_groups() == [[0, 3], [1, 4], [2, 5]]


def test_description_names_both_kinds_of_group():
    text = mesh.describe(mesh.MeshConfig(Workload(hidden=48), dp=2, tp=3))
    assert "dp=2 x tp=3 = 6 ranks" in text and "[0, 3], [1, 4], [2, 5]" in text


def test_bad_grids_are_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="tp=0"):
        mesh.MeshConfig(dp=2, tp=0)
    with pytest.raises(ValueError, match="tp=True"):
        mesh.MeshConfig(dp=2, tp=True)
    with pytest.raises(ValueError, match="tp=32 is out of range; allowed at most 16 with dp=4"):
        mesh.MeshConfig(Workload(hidden=64, batch_size=64), dp=4, tp=32)
    with pytest.raises(ValueError, match="workload='mlp' is out of range"):
        mesh.MeshConfig("mlp")
    with pytest.raises(ValueError, match="dp=4 is out of range; allowed a divisor of "
                                         "batch_size=30"):
        mesh.MeshConfig(Workload(batch_size=30), dp=4, tp=1)


def train_on_ranks_1_and_2(config):
    """Rank 0 stays out: the mesh is built inside a subgroup of the world."""
    import torch.distributed as dist
    group = dist.new_group([1, 2])
    return None if dist.get_rank() == 0 else mesh.train(config, group)["losses"]


def test_mesh_trains_inside_a_subgroup_of_the_world():
    config = mesh.MeshConfig(MLP.loaded(), dp=1, tp=2)
    results = distlab.launch(train_on_ranks_1_and_2, 3, config, timeout=120)
    assert results[0] is None
    for losses in results[1:]:
        assert_close(torch.tensor(losses), torch.tensor(mesh.reference(config)),
                     rtol=1e-5, atol=1e-5)
