"""The parameter server: BSP equals synchronous SGD, SSP honours its bound, failures."""
import pytest
import torch

import distlab
from distlab.asynchronous import parameter_server as ps

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("num_workers,num_servers", [(2, 1), (3, 1), (2, 2)])
def test_bsp_reproduces_synchronous_sgd(num_workers, num_servers):
    # 3 and 4 ranks in all; BSP must be exactly the single-process mean-gradient SGD.
    cfg = ps.ParameterServerConfig(num_workers=num_workers, num_servers=num_servers,
                                   staleness=0, lr=0.1, num_steps=12, seed=3)
    result = ps.train(cfg, timeout=60)
    torch.testing.assert_close(result.params, ps.reference_bsp(cfg), rtol=0, atol=0)
    assert all(s["version"] == 12 for s in result.servers)
    assert result.metrics["staleness"].dropna().eq(0).all()


def test_sharded_async_stops_cleanly_on_target():
    # Shards stop independently; workers must tell the other shard they leave (no timeout).
    cfg = ps.ParameterServerConfig(num_workers=2, num_servers=2, staleness=None, lr=0.1,
                                   num_steps=400, target_loss=0.05)
    result = ps.train(cfg, timeout=60)
    assert result.lost == {} and result.servers[1]["lost"] == {}
    assert result.servers[0]["stopped"].startswith("reached target loss")
    assert max(s["elapsed"] for s in result.servers) < 5


def _replay(log, num_workers, staleness):
    """Recompute clock gaps and delays from the server's event log, independently."""
    pushed, applied, gaps, taus = [0] * num_workers, 0, [], []
    for event in log:
        if event[0] == "read":
            _, w, clock, version, _ = event
            assert clock == pushed[w], "a worker read out of turn"
            assert version == applied, "the version is not the number of updates applied"
            gaps.append(clock - min(pushed))
        else:
            _, w, clock, v_read, tau = event
            assert tau == applied - v_read
            taus.append(tau)
            pushed[w] = clock + 1
            applied += 1
    return gaps, taus


def test_ssp_never_exceeds_its_bound_and_async_does():
    common = dict(num_workers=3, lr=0.02, num_steps=60, step_time=0.004,
                  slowdown=(1, 1, 4), random_delay=0.002)
    for s in (1, None):
        cfg = ps.ParameterServerConfig(staleness=s, **common)
        result = ps.train(cfg, timeout=60)
        gaps, taus = _replay(result.servers[0]["log"], 3, s)
        if s is None:
            assert max(gaps) > 1, "the straggler should fall behind without a bound"
        else:
            assert max(gaps) <= s
            assert max(taus) <= ps.max_delay(s, 3)
            measured = result.metrics["staleness"].dropna()
            assert measured.max() <= ps.max_delay(s, 3)


def test_staleness_aware_lr_and_clipping_are_applied():
    cfg = ps.ParameterServerConfig(num_workers=3, staleness=None, lr=0.04, num_steps=40,
                                   staleness_aware=True, clip=1.0, step_time=0.002)
    m = ps.train(cfg, timeout=60).metrics.dropna(subset=["staleness"])
    expected = 0.04 / m["staleness"].clip(lower=1)
    torch.testing.assert_close(torch.tensor(m["lr"].to_numpy()),
                               torch.tensor(expected.to_numpy()))


def test_server_survives_a_killed_worker():
    seen = []
    cfg = ps.ParameterServerConfig(num_workers=3, staleness=1, lr=0.05, num_steps=50,
                                   step_time=0.005, drop_worker=1, drop_at=4,
                                   worker_timeout=1.0)
    result = ps.train(cfg, timeout=60, on_output=lambda r, s, t: seen.append(t))
    assert result.died == {2: "was killed by SIGKILL"}       # rank 2 = worker 1, really dead
    assert list(result.lost) == [1] and "clock 4" in result.lost[1]
    server = result.servers[0]
    assert server["version"] == 50 and server["stopped"] == "finished 50 updates"
    assert server["clocks"][1] == 4 and min(server["clocks"][0], server["clocks"][2]) > 10
    assert [w["worker"] for w in result.workers] == [0, 2]
    assert any("worker 1 (rank 2) lost" in t for t in seen)


def test_divergence_stops_the_run_with_one_message():
    seen = []
    cfg = ps.ParameterServerConfig(num_workers=2, staleness=None, lr=3.0, num_steps=500)
    result = ps.train(cfg, timeout=60, on_output=lambda r, s, t: seen.append(t))
    assert result.diverged and "diverged at update" in result.diverged
    assert result.servers[0]["version"] < 500
    assert sum(t.count("diverged") for t in seen) == 1


def test_a_wait_rule_that_blocks_everyone_is_reported_as_deadlock():
    cfg = ps.ParameterServerConfig(num_workers=2, staleness=1, num_steps=20,
                                   wait_rule=lambda clock, clocks, s: clock == 0)
    with pytest.raises(distlab.WorkerError, match="deadlock"):
        ps.train(cfg, timeout=30)


@pytest.mark.parametrize("field,value,match", [
    ("staleness", -1, "staleness=-1"), ("lr", 0, "lr=0"), ("num_workers", 0, "num_workers"),
    ("slowdown", (1, 1, 1, 1, 2), "slowdown"), ("problem", "mnist", "problem"),
    ("drop_worker", 9, "drop_worker"), ("worker_timeout", 0.1, "worker_timeout")])
def test_bad_config_is_refused_before_any_process(field, value, match):
    with pytest.raises(ValueError, match=match):
        ps.ParameterServerConfig(**{field: value})


def test_may_proceed_and_max_delay():
    assert ps.may_proceed(3, [3, 3, 3], 0) and not ps.may_proceed(4, [4, 3], 0)
    assert ps.may_proceed(5, [5, 3], 2) and not ps.may_proceed(6, [6, 3], 2)
    assert ps.may_proceed(100, [100, 0], None)
    assert ps.max_delay(0, 4) == 0 and ps.max_delay(1, 4) == 9


def test_ssp_exercise_checker():
    from distlab.exercises import async_sgd as exercise
    assert exercise.check_ssp_wait(exercise.may_proceed).ok
    verdict = exercise.check_ssp_wait(lambda clock, clocks, s: True)   # never waits
    assert not verdict.ok and "must wait" in verdict.message
    too_strict = exercise.check_ssp_wait(lambda c, cl, s: s is None or c - min(cl) < s)
    assert not too_strict.ok and "clocks=[0, 0, 0]" in too_strict.message
