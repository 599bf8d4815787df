"""distlab.fault_tolerance.elastic: restart on the survivors, under distlab's agent and under torchrun."""
import os
import subprocess
import sys

import pytest
import torch

import distlab
from distlab.fault_tolerance.elastic import ElasticConfig, TrainConfig, global_batch, run_elastic
from distlab.fault_tolerance.faults import Fault
from distlab.data_parallel.sync_sgd import build_task

pytestmark = pytest.mark.timeout(120)


def reference(config: TrainConfig) -> torch.Tensor:
    """Single-process SGD with momentum (torch.optim.SGD's update) on the same global batches."""
    task = build_task(config.task, config.seed)
    model, ds = task.model, task.dataset
    params = list(model.parameters())
    buffers = [None] * len(params)
    for step in range(config.num_steps):
        idx = global_batch(len(ds.y), step, config.batch_size, config.seed)
        grads = torch.autograd.grad(task.loss_fn(model(ds.X[idx]), ds.y[idx]), params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                buffers[i] = g.clone() if buffers[i] is None else buffers[i].mul_(
                    config.momentum).add_(g)
                p.sub_(config.lr * buffers[i])
    return torch.nn.utils.parameters_to_vector(params).detach()


def test_bad_configs_are_refused_before_any_process_starts(tmp_path):
    with pytest.raises(ValueError, match="algorithm='ps'"):
        TrainConfig(str(tmp_path), algorithm="ps")
    with pytest.raises(ValueError, match="checkpoint_every > 0 needs a checkpoint_dir"):
        TrainConfig("", checkpoint_every=5)
    with pytest.raises(ValueError, match="momentum=1"):
        TrainConfig("", checkpoint_every=0, momentum=1)
    with pytest.raises(ValueError, match=r"world_size=1 must be in \[min_world_size=2"):
        ElasticConfig(world_size=1, min_world_size=2)


def test_elastic_job_restarts_on_the_survivors_and_matches_the_reference(tmp_path):
    config = TrainConfig(str(tmp_path), num_steps=40, checkpoint_every=10,
                         fault=Fault("kill", rank=1, step=25))
    run = run_elastic(config, ElasticConfig(world_size=3, timeout=60))
    out = run.result()
    assert len(out) == 2 and out[0]["start_step"] == 20          # 3 ranks -> 2, from step 20
    # The global batch is dealt to however many ranks there are: same SGD, to rounding.
    torch.testing.assert_close(out[0]["params"], reference(config))
    ev = run.timeline().drop_duplicates("event").set_index("event")
    assert ev.loc["failure", "time"] <= ev.loc["detection", "time"] \
        <= ev.loc["restart", "time"] <= ev.loc["resume", "time"] <= ev.loc["finish", "time"]
    assert ev.loc["detection", "rank"] == 1 and "SIGKILL" in ev.loc["detection", "reason"]
    s = run.summary()
    assert (s["failure_step"], s["resume_step"], s["lost_steps"], s["restarts"]) == (25, 20, 5, 1)
    assert s["downtime"] > 0 and s["checkpoint_time"] > 0
    m = run.metrics()
    assert set(m.world_size) == {3, 2} and m.time.is_monotonic_increasing is not None


def test_elastic_gives_up_below_min_world_size(tmp_path):
    config = TrainConfig(str(tmp_path), num_steps=10, checkpoint_every=5,
                         fault=Fault("raise", rank=0, step=7))
    with pytest.raises(distlab.WorkerError, match="below min_world_size=2"):
        run_elastic(config, ElasticConfig(world_size=2, min_world_size=2, timeout=30))


def test_a_restarted_torchrun_worker_resumes_from_the_latest_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "--max-restarts=1", "-m", "distlab.fault_tolerance.elastic", "--checkpoint-dir", str(tmp_path / "ck"),
         "--num-steps=30", "--checkpoint-every=10", "--fault=kill:1:15",
         "--out", str(tmp_path / "out.pt")], capture_output=True, text=True, env=env,
        timeout=100, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "attempt 1 resumed at step 10" in out.stdout
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    config = TrainConfig(str(tmp_path), num_steps=30, checkpoint_every=10)
    torch.testing.assert_close(result["params"], reference(config))


def test_the_parameter_server_finishes_with_a_worker_lost():
    ps = pytest.importorskip("distlab.asynchronous.parameter_server")
    from distlab.course.lab07_fault_tolerance import parameter_server_config
    config = parameter_server_config(Fault("kill", rank=2, step=4), num_workers=3,
                                     num_steps=40, worker_timeout=1.0)
    result = ps.train(config, timeout=60)
    assert list(result.lost) == [1]                  # rank 2 is worker 1 (rank 0 serves)
    assert result.servers[0]["version"] == 40        # every update applied, by the others
