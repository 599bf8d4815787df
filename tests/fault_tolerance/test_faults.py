"""distlab.fault_tolerance.faults: each kind of failure, on real processes, and how sync training meets it."""
import dataclasses
import time

import pytest
import torch

import distlab
from distlab.fault_tolerance.elastic import WORKLOAD, TrainConfig, train
from distlab.fault_tolerance.faults import Fault, InjectedFault, fail, maybe_inject

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kwargs, field", [
    (dict(kind="explode"), "kind"), (dict(rank=-1), "rank"), (dict(step=1.5), "step"),
    (dict(seconds=-1), "seconds"), (dict(where="forward"), "where"), (dict(attempt=True), "attempt")])
def test_bad_fault_is_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Fault.{field}="):
        Fault(**kwargs)


def test_fires_on_one_rank_one_step_one_attempt_only():
    f = Fault("raise", rank=1, step=3)
    assert f.fires(1, 3) and not f.fires(0, 3) and not f.fires(1, 4)
    assert not f.fires(1, 3, where="save") and not f.fires(1, 3, attempt=1)
    maybe_inject(None, 1, 3)          # no fault: nothing happens
    f.inject(0, 3)                    # another rank: nothing happens
    with pytest.raises(InjectedFault, match="rank 1 at step 3"):
        f.inject(1, 3)
    assert f.describe() == "raise rank 1 at step 3"


def _sync(fault, **kw):
    return TrainConfig("", workload=dataclasses.replace(WORKLOAD, num_steps=20), checkpoint_every=0,
                       fault=fault, **kw)


@pytest.mark.parametrize("kind, reason", [("kill", "SIGKILL"), ("raise", "InjectedFault")])
def test_sync_training_stops_with_a_clear_error_naming_the_rank(kind, reason):
    timeout = 20
    t = time.monotonic()
    with pytest.raises(distlab.WorkerError) as info:
        distlab.launch(train, 3, _sync(Fault(kind, rank=2, step=5)), timeout=timeout)
    assert time.monotonic() - t < timeout + 5        # detected, never a hang
    assert info.value.rank == 2 and reason in info.value.reason


def test_a_hung_rank_is_detected_by_the_timeout():
    timeout = 4
    t = time.monotonic()
    with pytest.raises(distlab.WorkerError, match="(?i)timed out"):
        # Either the launcher's deadline or the peer's collective timeout (gloo's, set to the
        # same 4 s) fires first; both name the hang instead of waiting forever.
        distlab.launch(train, 2, _sync(Fault("hang", rank=0, step=3)), timeout=timeout)
    assert time.monotonic() - t < timeout + 5


def test_a_delayed_rank_slows_every_rank_of_sync_training_and_changes_nothing_else():
    ref = distlab.launch(train, 2, _sync(None))
    slow = distlab.start(train, 2, _sync(Fault("delay", rank=1, step=10, seconds=1.0)))
    out = slow.result()
    df = slow.metrics().dropna(subset=["loss"]).set_index(["rank", "step"]).time
    for rank in (0, 1):        # rank 0 waits in the all-reduce for its slow peer
        assert df[rank, 10] - df[rank, 9] >= 0.9
    torch.testing.assert_close(out[0]["params"], ref[0]["params"], rtol=0, atol=0)


def test_fail_refuses_a_bad_number_of_seconds_naming_it():
    with pytest.raises(ValueError, match="seconds=-1"):
        fail("delay", seconds=-1)
