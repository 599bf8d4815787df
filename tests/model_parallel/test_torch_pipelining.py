"""PyTorch's own pipeline schedules on distlab's stages: the ones that run on gloo train like
distlab's schedules (and the unsplit model); the table says which run."""
import pytest
from torch.testing import assert_close

import distlab
from distlab.model_parallel import pipeline as pp
from distlab.model_parallel import torch_pipelining as tpp
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(150)

MLP = Workload("mlp", hidden=16, depth=3, batch_size=16, num_steps=2, lr=0.5)   # 7 layers


def torch_then_distlab(configs):
    """Runs on every rank: each of PyTorch's schedules, then distlab's of the same shape
    (1F1B where distlab has none); per config, both losses (empty off the loss's rank)."""
    out = []
    for c in configs:
        ours = tpp.TORCH_SCHEDULES[c.schedule]["distlab"] or "1f1b"
        distlab_config = pp.PipelineConfig(c.workload, c.num_stages, c.num_microbatches, ours,
                                           virtual_stages=c.chunks)
        out.append((tpp.train(c)["losses"], pp.train(distlab_config)["losses"]))
    return out


def test_torch_schedules_that_run_on_gloo_train_like_distlabs():
    running = [name for name, row in tpp.TORCH_SCHEDULES.items() if row["runs_on_gloo"]]
    configs = [tpp.TorchPipelineConfig(MLP.loaded(), 2, 4, name) for name in running]
    results = distlab.launch(torch_then_distlab, 2, configs, timeout=90)
    reference = tpp.reference(configs[0])
    for n, name in enumerate(running):
        theirs = [r[n][0] for r in results if r[n][0]]
        ours = [r[n][1] for r in results if r[n][1]]
        assert len(theirs) == len(ours) == 1, name      # one rank holds the loss
        assert_close(theirs[0], ours[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert_close(theirs[0], reference, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    zbv = running.index("ScheduleZBVZeroBubble")
    assert results[0][zbv][0] and not results[1][zbv][0]   # ZB-V's last stage is on rank 0


def test_torch_schedule_table_names_its_counterpart_and_what_was_seen():
    for name, row in tpp.TORCH_SCHEDULES.items():
        assert row["distlab"] in (*pp.ALL_SCHEDULES, None) and row["chunks"] in (1, 2)
        assert isinstance(row["runs_on_gloo"], bool) and row["note"], name
    assert tpp.stage_indices("ScheduleZBVZeroBubble", 2, 0) == [0, 3]
    assert tpp.stage_indices("ScheduleInterleaved1F1B", 2, 1) == [1, 3]


def test_bad_torch_pipeline_configs_are_refused_when_made():
    with pytest.raises(ValueError, match=r"schedule='ScheduleZigzag' is out of range"):
        tpp.TorchPipelineConfig(MLP, schedule="ScheduleZigzag")
    with pytest.raises(ValueError, match=r"num_microbatches=3 is out of range; allowed an int "
                                         r"dividing batch_size=16"):
        tpp.TorchPipelineConfig(MLP, 2, 3)
    with pytest.raises(ValueError, match=r"num_stages=4 is more than the model's 3 layers"):
        tpp.TorchPipelineConfig(Workload("mlp", depth=1, batch_size=8), 2, 2,
                                "ScheduleInterleaved1F1B")
