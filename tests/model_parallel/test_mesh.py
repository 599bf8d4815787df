"""2D parallelism: the DP x TP grid, and its training against a single process."""
import pytest
import torch
from torch.testing import assert_close

import distlab
from distlab.model_parallel import mesh
from distlab.problems.workloads import Workload, train_reference

pytestmark = pytest.mark.timeout(120)

MLP = Workload("mlp", hidden=16, depth=2, batch_size=32, num_steps=3)
LM = Workload("transformer", hidden=16, num_heads=4, depth=1, block_size=8, batch_size=4,
              num_steps=2, lr=0.3)


@pytest.mark.parametrize("world_size,configs", [
    (2, [mesh.MeshConfig(dp=1, tp=2), mesh.MeshConfig(dp=2, tp=1)]),
    (4, [mesh.MeshConfig(dp=2, tp=2), mesh.MeshConfig(dp=1, tp=4)]),
])
def test_dp_tp_training_matches_single_process(world_size, configs):
    workloads = [MLP.loaded(), LM.loaded()]     # the caller loads the data, once
    for c in configs:
        for w in workloads:
            mesh.check(c, w)
    results = distlab.launch(mesh.sweep, world_size, configs, workloads, timeout=120)
    refs = [train_reference(w) for w in workloads]
    for rank, runs in enumerate(results):
        for k, run in enumerate(runs):
            c, w = configs[k // 2], workloads[k % 2]
            assert (run["dp_rank"], run["tp_rank"]) == divmod(rank, c.tp)
            assert_close(torch.tensor(run["losses"]), torch.tensor(refs[k % 2]),
                         rtol=1e-5, atol=1e-5, msg=f"{c} {w.model} rank {rank}")
            ops = set(run["by_op"])
            assert ("all_reduce" in ops) == (c.world_size > 1)


def test_grid_and_description():
    c = mesh.MeshConfig(dp=2, tp=3)
    assert c.grid() == [[0, 1, 2], [3, 4, 5]]
    assert c.dp_groups() == [[0, 3], [1, 4], [2, 5]]
    text = mesh.describe(c)
    assert "dp=2 x tp=3 = 6 ranks" in text and "[0, 3], [1, 4], [2, 5]" in text
    with pytest.raises(ValueError, match="tp=0"):
        mesh.MeshConfig(dp=2, tp=0)
    with pytest.raises(ValueError, match="batch_size=30 must be divisible by dp=4"):
        mesh.check(mesh.MeshConfig(dp=4, tp=1), Workload(batch_size=30))
