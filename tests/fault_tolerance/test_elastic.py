"""distlab.fault_tolerance.elastic: restart on the survivors, under distlab's agent and under torchrun."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import distlab
from distlab.fault_tolerance import elastic
from distlab.fault_tolerance.elastic import WORKLOAD, ElasticConfig, TrainConfig
from distlab.fault_tolerance.faults import Fault
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("kwargs, message", [
    (dict(algorithm="ps"), "algorithm='ps'"),
    (dict(momentum=1), "momentum=1"),
    (dict(workload=Workload(model="transformer")), r"workload=.*model in \('linear', 'mlp'\)"),
    (dict(checkpoint_every=2.5), "checkpoint_every=2.5"),
    (dict(keep=0), "keep=0"),
    (dict(noise=-0.1), "noise=-0.1"),
    (dict(step_time=float("nan")), "step_time=nan"),
    (dict(fault="kill"), "fault='kill'"),
])
def test_a_bad_train_config_is_refused_naming_the_field(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=f"TrainConfig.{message}"):
        TrainConfig(str(tmp_path), **kwargs)


def test_checkpoints_without_a_checkpoint_dir_are_refused():
    with pytest.raises(ValueError, match="checkpoint_every > 0 needs a checkpoint_dir"):
        TrainConfig("", checkpoint_every=5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=1, min_world_size=2), r"world_size=1 .*\[min_world_size=2"),
    (dict(world_size=65), "world_size=65"),
    (dict(min_world_size=0), "min_world_size=0"),
    (dict(max_restarts=-1), "max_restarts=-1"),
    (dict(timeout=0), "timeout=0"),
    (dict(shrink=1), "shrink=1"),
])
def test_a_bad_elastic_config_is_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"ElasticConfig.{message}"):
        ElasticConfig(**kwargs)


def test_start_refuses_what_is_not_a_train_config_and_an_elastic_config(tmp_path):
    with pytest.raises(TypeError, match="TrainConfig"):
        elastic.start({"num_steps": 10})
    with pytest.raises(TypeError, match="ElasticConfig"):
        elastic.start(TrainConfig(str(tmp_path)), {"world_size": 2})


def test_the_workload_refuses_bad_numbers_naming_them():
    with pytest.raises(ValueError, match=r"Workload\.lr=True"):
        TrainConfig("", workload=replace(WORKLOAD, lr=True))
    with pytest.raises(ValueError, match=r"Workload\.num_steps=0"):
        TrainConfig("", workload=replace(WORKLOAD, num_steps=0))


@pytest.mark.parametrize("world_size", [1, 3])
def test_train_equals_the_single_process_reference_on_any_number_of_ranks(world_size):
    config = TrainConfig("", workload=Workload(model="mlp", num_steps=12, batch_size=50, lr=0.05),
                         checkpoint_every=0)
    out = distlab.launch(elastic.train, world_size, config, timeout=60)
    ref = elastic.reference(config)
    for rank in out:   # the global batch is dealt to the ranks: same SGD, to rounding
        torch.testing.assert_close(rank["params"], ref["params"])
        torch.testing.assert_close(torch.tensor(rank["history"]), torch.tensor(ref["history"]))


def test_a_rank_dealt_no_example_still_matches_the_reference():
    # batch_size=1 on 2 ranks: rank 1 gets no example at any step, so no gradient of its own.
    config = TrainConfig("", workload=replace(WORKLOAD, num_steps=8, batch_size=1),
                         checkpoint_every=0)
    out = distlab.launch(elastic.train, 2, config, timeout=60)
    torch.testing.assert_close(out[1]["params"], elastic.reference(config)["params"])


def test_elastic_job_restarts_on_the_survivors_and_matches_the_reference(tmp_path):
    config = TrainConfig(str(tmp_path), checkpoint_every=10, fault=Fault("kill", rank=1, step=25))
    run = elastic.run(config, ElasticConfig(world_size=3, timeout=60))
    out = run.result()
    assert len(out) == 2 and out[0]["start_step"] == 20          # 3 ranks -> 2, from step 20
    # The global batch is dealt to however many ranks there are: same SGD, to rounding.
    torch.testing.assert_close(out[0]["params"], elastic.reference(config)["params"])
    ev = run.timeline().drop_duplicates("event").set_index("event")
    assert ev.loc["failure", "time"] <= ev.loc["detection", "time"] \
        <= ev.loc["restart", "time"] <= ev.loc["resume", "time"] <= ev.loc["finish", "time"]
    assert ev.loc["detection", "rank"] == 1 and "SIGKILL" in ev.loc["detection", "reason"]
    s = run.summary()
    assert (s["failure_step"], s["resume_step"], s["lost_steps"], s["restarts"]) == (25, 20, 5, 1)
    assert s["downtime"] > 0 and s["checkpoint_time"] > 0


def test_elastic_records_are_on_the_job_clock_across_attempts(tmp_path):
    config = TrainConfig(str(tmp_path), workload=replace(WORKLOAD, num_steps=20), checkpoint_every=5,
                         fault=Fault("kill", rank=1, step=12))
    m = elastic.run(config, ElasticConfig(world_size=2, timeout=60)).metrics()
    assert set(m.world_size) == {2, 1} and set(m.attempt) == {0, 1}
    # Every record of the restart comes after every record of the attempt that failed...
    assert m[m.attempt == 0].time.max() < m[m.attempt == 1].time.min()
    # ...and each rank's loss curve runs forward in time, step after step, in each attempt.
    for _, part in m.dropna(subset=["loss"]).groupby(["attempt", "rank"]):
        part = part.sort_values("step")
        assert part.time.is_monotonic_increasing and part.step.is_unique
    assert m[(m.attempt == 1) & m.loss.notna()].step.min() == 10   # resumed at the checkpoint


def test_elastic_gives_up_below_min_world_size(tmp_path):
    config = TrainConfig(str(tmp_path), workload=replace(WORKLOAD, num_steps=10), checkpoint_every=5,
                         fault=Fault("raise", rank=0, step=7))
    with pytest.raises(distlab.WorkerError, match="below min_world_size=2"):
        elastic.run(config, ElasticConfig(world_size=2, min_world_size=2, timeout=30))


def test_a_restarted_torchrun_worker_resumes_from_the_latest_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "--max-restarts=1", "-m", "distlab.fault_tolerance.elastic",
         "--checkpoint-dir", str(tmp_path / "ck"), "--num-steps=30", "--checkpoint-every=10",
         "--fault=kill:1:15", "--out", str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, timeout=100,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "attempt 1 resumed at step 10" in out.stdout
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    config = TrainConfig(str(tmp_path), workload=replace(WORKLOAD, num_steps=30), checkpoint_every=10)
    torch.testing.assert_close(result["params"], elastic.reference(config)["params"])


def test_stop_while_an_attempt_starts_says_stopped(tmp_path):
    # Stop pressed at once: the first attempt may still be starting; the fault it would
    # hit (rank 0 raises at step 24) must not become the run's error.
    config = TrainConfig(str(tmp_path), checkpoint_every=10, fault=Fault("raise", rank=0, step=24))
    run = elastic.start(config, ElasticConfig(world_size=2, timeout=60))
    run.stop()
    assert run.wait(30)
    assert isinstance(run.error, distlab.WorkerError) and str(run.error).startswith("stopped")
