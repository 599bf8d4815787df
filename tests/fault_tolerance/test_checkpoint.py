"""distlab.fault_tolerance.checkpoint: atomic writes, crash-safe distributed commits, exact resume."""
import dataclasses
import os
import shutil
import random
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distlab
from distlab.fault_tolerance import checkpoint
from distlab.fault_tolerance.elastic import TrainConfig, train
from distlab.fault_tolerance.faults import Fault
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)

DIGITS = Workload(model="mlp", lr=0.05, num_steps=30)


def _kill_me():
    os.kill(os.getpid(), signal.SIGKILL)


def test_write_atomic_killed_halfway_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.write_atomic({"step": 1, "w": torch.arange(1000.0)}, path)

    def crash_while_saving():   # a real process, SIGKILLed with half the bytes written
        checkpoint.write_atomic({"step": 2, "w": torch.zeros(1000)}, path, on_half_written=_kill_me)

    with pytest.raises(distlab.WorkerError, match="SIGKILL"):
        distlab.launch(crash_while_saving, 1)
    assert os.path.getsize(path + ".tmp") > 0          # the half-written bytes exist...
    old = checkpoint.read(path)                        # ...but never under the real name
    assert old["step"] == 1 and torch.equal(old["w"], torch.arange(1000.0))
    checkpoint.write_atomic({"step": 3}, path)         # and the next save still works
    assert checkpoint.read(path) == {"step": 3}


def test_restored_rngs_draw_the_same_numbers_again():
    state = checkpoint.capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    checkpoint.restore_rng(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def _save_three_and_crash(directory):
    rank = dist.get_rank()
    for step in (10, 20, 30):
        checkpoint.save(directory, step, {"w": torch.full((3,), float(step))} if rank == 0 else None,
                        {"rank": rank, "step": step}, keep=2)
    loaded = checkpoint.load_latest(directory, rank)
    # Now rank 1 dies halfway through its file of step 40: nothing may be committed.
    fault = Fault("kill", rank=1, step=40, where="save")
    checkpoint.save(directory, 40, {"w": torch.zeros(3)}, {"rank": rank, "step": 40},
                    on_half_written=lambda: fault.inject(rank, 40, "save"))
    return loaded


def test_distributed_save_prunes_and_survives_a_kill_during_the_write(tmp_path):
    directory = str(tmp_path / "ckpts")
    with pytest.raises(distlab.WorkerError) as info:
        distlab.launch(_save_three_and_crash, 2, directory, timeout=30)
    assert info.value.rank == 1 and "SIGKILL" in info.value.reason
    assert [os.path.basename(p) for p in checkpoint.committed(directory)] == [
        "step_00000020", "step_00000030"]                 # keep=2, and 40 never committed
    for rank in (0, 1):
        c = checkpoint.load_latest(directory, rank)
        assert (c.step, c.world_size, c.rank_state) == (30, 2, {"rank": rank, "step": 30})
        assert torch.equal(c.state["w"], torch.full((3,), 30.0))
    assert checkpoint.load(checkpoint.latest(directory), rank=5).rank_state is None


def _save_step_10_then_crash_while_saving_it_again(directory):
    checkpoint.save(directory, 10, {"version": 1}, keep=1)
    real_replace = os.replace

    def crash_before_the_new_folder_is_renamed_in(src, dst):
        if os.path.basename(src).startswith(".staging_"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = crash_before_the_new_folder_is_renamed_in   # this worker process only
    checkpoint.save(directory, 10, {"version": 2}, keep=1)   # a restart saves step 10 again


def test_a_crash_while_saving_a_committed_step_again_keeps_its_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpts")
    with pytest.raises(distlab.WorkerError, match="SIGKILL"):
        distlab.launch(_save_step_10_then_crash_while_saving_it_again, 1, directory, timeout=30)
    c = checkpoint.load_latest(directory)           # keep=1: the only checkpoint there is
    assert c is not None and (c.step, c.state) == (10, {"version": 1})
    # The next save of that step commits the new version and leaves nothing aside.
    checkpoint.save(directory, 10, {"version": 3}, keep=1)
    c = checkpoint.load_latest(directory)
    assert (c.step, c.state) == (10, {"version": 3})
    assert sorted(os.listdir(directory)) == ["step_00000010"]


def test_a_folder_left_aside_by_a_crash_after_the_commit_is_ignored_then_pruned(tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    checkpoint.save(old, 10, {"version": 1})
    checkpoint.save(new, 10, {"version": 2})
    # What a crash leaves right after committing step 10 again: the previous one aside.
    shutil.copytree(checkpoint.path_for(old, 10), checkpoint.path_for(new, 10) + ".old")
    assert checkpoint.committed(new) == [checkpoint.path_for(new, 10)]
    assert checkpoint.load_latest(new).state == {"version": 2}
    checkpoint.save(new, 20, {"version": 3}, keep=1)
    assert sorted(os.listdir(new)) == ["step_00000020"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=-1), "step=-1"), (dict(step=2.0), "step=2.0"), (dict(keep=0), "keep=0"),
    (dict(keep=True), "keep=True")])
def test_save_refuses_a_bad_number_naming_it(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        checkpoint.save(str(tmp_path), **{"step": 1, "state": {}, **kwargs})
    assert checkpoint.committed(str(tmp_path)) == []


def test_load_refuses_a_bad_rank_naming_it(tmp_path):
    checkpoint.save(str(tmp_path), 1, {})
    for load in (checkpoint.load_latest, lambda d, rank: checkpoint.load(checkpoint.latest(d), rank)):
        with pytest.raises(ValueError, match="rank=-1"):
            load(str(tmp_path), rank=-1)


def _interrupted_then_resumed(config, world_size, fault):
    with pytest.raises(distlab.WorkerError):
        distlab.launch(train, world_size, dataclasses.replace(config, fault=fault), timeout=60)
    return distlab.launch(train, world_size, config, attempt=1, timeout=60)


def test_sync_sgd_killed_and_resumed_equals_uninterrupted_exactly(tmp_path):
    # noise > 0: each rank draws from its RNG every step, so RNG state must be restored too.
    config = TrainConfig(str(tmp_path), workload=DIGITS, checkpoint_every=10, noise=0.05)
    full = distlab.launch(train, 2, dataclasses.replace(
        config, checkpoint_dir="", checkpoint_every=0))
    resumed = _interrupted_then_resumed(config, 2, Fault("kill", rank=1, step=15))
    assert resumed[0]["start_step"] == 10
    for a, b in zip(full, resumed):
        torch.testing.assert_close(b["params"], a["params"], rtol=0, atol=0)
        assert b["history"] == a["history"]   # the loss curve continues exactly


def test_zero_resumes_exactly_and_reshards_to_another_world_size(tmp_path):
    config = TrainConfig(str(tmp_path / "full"), algorithm="zero", workload=DIGITS,
                         checkpoint_every=10, keep=3)
    full = distlab.launch(train, 2, config, timeout=90)
    # Resume from the checkpoint of step 10 alone, as if the run had died at step 15.
    shutil.copytree(checkpoint.path_for(config.checkpoint_dir, 10),
                    checkpoint.path_for(str(tmp_path / "at10"), 10))
    resumed = distlab.launch(train, 2, dataclasses.replace(
        config, checkpoint_dir=str(tmp_path / "at10")), attempt=1, timeout=90)
    assert resumed[0]["start_step"] == 10
    for a, b in zip(full, resumed):
        torch.testing.assert_close(b["params"], a["params"], rtol=0, atol=0)
        assert b["history"] == a["history"]
    # The consolidated optimizer state reshards: resume step 20 on one rank instead of two.
    shutil.copytree(checkpoint.path_for(config.checkpoint_dir, 20),
                    checkpoint.path_for(str(tmp_path / "at20"), 20))
    (one,) = distlab.launch(train, 1, dataclasses.replace(
        config, checkpoint_dir=str(tmp_path / "at20")), attempt=1, timeout=90)
    assert one["start_step"] == 20 and one["history"][:20] == full[0]["history"][:20]
    # Same global batches, summed in another order: equal to float32 rounding.
    torch.testing.assert_close(one["params"], full[0]["params"])
