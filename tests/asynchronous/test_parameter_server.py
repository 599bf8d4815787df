"""The parameter server: BSP equals synchronous SGD, SSP honours its bound, failures."""
from dataclasses import replace

import pytest
import torch

import distlab
from distlab.asynchronous import parameter_server as ps
from distlab.asynchronous.ps_config import shard_bounds, worker_batch
from distlab.problems import convex, data
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(180)


def wl(**fields) -> Workload:
    """Lab 03's workload (linear regression, 32 examples per push) with ``fields`` changed."""
    return replace(convex.WORKLOAD, **fields)


@pytest.mark.parametrize("num_workers,num_servers", [(2, 1), (3, 1), (2, 2)])
def test_bsp_reproduces_synchronous_sgd(num_workers, num_servers):
    # 3 and 4 ranks in all; BSP must be exactly the single-process mean-gradient SGD.
    cfg = ps.ParameterServerConfig(wl(lr=0.1, num_steps=12, seed=3), num_workers=num_workers,
                                   num_servers=num_servers, staleness=0)
    result = ps.run(cfg, timeout=60)
    torch.testing.assert_close(result.params, ps.reference(cfg), rtol=0, atol=0)
    assert all(s["version"] == 12 for s in result.servers)
    assert result.metrics["staleness"].dropna().eq(0).all()


def test_sharded_async_stops_cleanly_on_target():
    # Shards stop independently; workers must tell the other shard they leave (no timeout).
    cfg = ps.ParameterServerConfig(wl(lr=0.1, num_steps=400), num_workers=2, num_servers=2,
                                   staleness=None, target_loss=0.05)
    result = ps.run(cfg, timeout=60)
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


SKEWED = dict(workload=wl(lr=0.02, num_steps=60), num_workers=3, step_time=0.004,
              slowdown=(1, 1, 4),
              random_delay=0.002)


def test_ssp_never_lets_a_worker_run_more_than_s_clocks_ahead():
    cfg = ps.ParameterServerConfig(staleness=1, **SKEWED)
    result = ps.run(cfg, timeout=60)
    gaps, taus = _replay(result.servers[0]["log"], 3, 1)
    assert max(gaps) <= 1
    assert max(taus) <= ps.max_delay(1, 3)
    measured = result.metrics["staleness"].dropna()
    assert measured.max() <= ps.max_delay(1, 3)


def test_without_a_bound_the_straggler_falls_behind():
    cfg = ps.ParameterServerConfig(staleness=None, **SKEWED)
    result = ps.run(cfg, timeout=60)
    gaps, _ = _replay(result.servers[0]["log"], 3, None)
    assert max(gaps) > 1, "the straggler should fall behind without a bound"


def test_staleness_aware_lr_and_clipping_are_applied():
    cfg = ps.ParameterServerConfig(wl(lr=0.04, num_steps=40), num_workers=3, staleness=None,
                                   staleness_aware=True, clip=1.0, step_time=0.002)
    m = ps.run(cfg, timeout=60).metrics.dropna(subset=["staleness"])
    expected = 0.04 / m["staleness"].clip(lower=1)
    torch.testing.assert_close(torch.tensor(m["lr"].to_numpy()),
                               torch.tensor(expected.to_numpy()))


def test_server_survives_a_killed_worker():
    seen = []
    cfg = ps.ParameterServerConfig(wl(lr=0.05, num_steps=50), num_workers=3, staleness=1,
                                   step_time=0.005, drop_worker=1, drop_at=4,
                                   worker_timeout=1.0)
    result = ps.run(cfg, timeout=60, on_output=lambda r, s, t: seen.append(t))
    assert result.died == {2: "was killed by SIGKILL"}       # rank 2 = worker 1, really dead
    assert list(result.lost) == [1] and "clock 4" in result.lost[1]
    server = result.servers[0]
    assert server["version"] == 50 and server["stopped"] == "finished 50 updates"
    assert server["clocks"][1] == 4 and min(server["clocks"][0], server["clocks"][2]) > 10
    assert [w["worker"] for w in result.workers] == [0, 2]
    assert any("worker 1 (rank 2) lost" in t for t in seen)


def test_divergence_stops_the_run_with_one_message():
    seen = []
    cfg = ps.ParameterServerConfig(wl(lr=3.0, num_steps=500), num_workers=2, staleness=None)
    result = ps.run(cfg, timeout=60, on_output=lambda r, s, t: seen.append(t))
    assert result.diverged and "diverged at update" in result.diverged
    assert result.servers[0]["version"] < 500
    assert sum(t.count("diverged") for t in seen) == 1


def test_a_wait_rule_that_blocks_everyone_is_reported_as_deadlock():
    cfg = ps.ParameterServerConfig(wl(num_steps=20), num_workers=2, staleness=1,
                                   wait_rule=lambda clock, clocks, s: clock == 0)
    with pytest.raises(distlab.WorkerError, match="deadlock"):
        ps.run(cfg, timeout=30)


@pytest.mark.parametrize("field,value,match", [
    ("staleness", -1, "staleness=-1"), ("num_workers", 0, "num_workers"),
    ("slowdown", (1, 1, 1, 1, 2), "slowdown"),
    ("workload", Workload("transformer"), "workload=.*model in \\('linear', 'mlp'\\)"),
    ("drop_worker", 9, "drop_worker"), ("worker_timeout", 0.1, "worker_timeout")])
def test_bad_config_is_refused_before_any_process(field, value, match):
    with pytest.raises(ValueError, match=match):
        ps.ParameterServerConfig(**{field: value})


def test_a_bad_learning_rate_is_refused_by_the_workload():
    with pytest.raises(ValueError, match="lr=0"):
        ps.ParameterServerConfig(wl(lr=0))


def test_a_push_larger_than_the_workers_shard_is_refused():
    # 1,024 examples over 4 workers: a shard of 256, so a push holds at most 256 examples.
    assert ps.ParameterServerConfig(wl(batch_size=256), num_workers=4)
    with pytest.raises(ValueError, match="batch_size <= 256.*num_workers=4"):
        ps.ParameterServerConfig(wl(batch_size=257), num_workers=4)
    with pytest.raises(ValueError, match="batch_size <= 32.*num_workers=32"):
        ps.ParameterServerConfig(wl(batch_size=33), num_workers=32)


def test_a_bsp_step_averages_every_workers_push_of_batch_size_examples():
    cfg = ps.ParameterServerConfig(wl(batch_size=8, num_steps=1), num_workers=3)
    ds = cfg.workload.loaded().dataset
    batches = [worker_batch(cfg, ds, w, 0) for w in range(3)]
    assert [len(b) for b in batches] == [8, 8, 8]
    shards = [set(data.shard_indices(len(ds.y), w, 3).tolist())
              for w in range(3)]
    assert all(set(b.tolist()) <= shard for b, shard in zip(batches, shards))


def test_may_proceed_allows_at_most_s_clocks_ahead_of_the_slowest():
    assert ps.may_proceed(3, [3, 3, 3], 0) and not ps.may_proceed(4, [4, 3], 0)
    assert ps.may_proceed(5, [5, 3], 2) and not ps.may_proceed(6, [6, 3], 2)
    assert ps.may_proceed(100, [100, 0], None)


def test_max_delay_is_2s_plus_1_times_other_workers():
    assert ps.max_delay(0, 4) == 0 and ps.max_delay(1, 4) == 9
    assert ps.max_delay(None, 4) == float("inf")


def test_every_rank_returns_a_loss_and_the_servers_that_of_the_final_parameters():
    # What the command line reads (issue 14 item 11): rank 0's ``loss`` under a plain launch.
    cfg = ps.ParameterServerConfig(wl(lr=0.1, num_steps=8, seed=1), num_workers=2,
                                   num_servers=2, staleness=0)
    results = distlab.launch(ps.train, cfg.world_size, cfg, timeout=60)
    w = cfg.workload.loaded()
    final = convex.loss_at(w.build_model(), w.loss, w.dataset.X[:cfg.eval_size],
                           w.dataset.y[:cfg.eval_size], ps.reference(cfg))
    assert [r["loss"] for r in results[:2]] == [pytest.approx(final, rel=1e-6)] * 2
    assert all(isinstance(r["loss"], float) for r in results[2:])


def test_a_group_that_is_not_gloo_is_refused_with_the_alternative(monkeypatch):
    monkeypatch.setattr(ps.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="needs a gloo group.*new_group"):
        ps.train(ps.ParameterServerConfig(num_workers=1))


def test_the_result_loss_is_the_last_loss_reported():
    cfg = ps.ParameterServerConfig(wl(lr=0.1, num_steps=8), num_workers=2, staleness=0)
    result = ps.run(cfg, timeout=60)
    losses = result.metrics.dropna(subset=["loss"]).sort_values("step")
    assert losses["step"].iloc[-1] == 8
    assert losses["loss"].iloc[-1] == pytest.approx(result.loss, rel=1e-6)


def test_the_server_reports_the_staleness_and_lr_of_every_gradient_it_applies():
    cfg = ps.ParameterServerConfig(wl(lr=0.05, num_steps=30), num_workers=3, staleness=None,
                                   step_time=0.002)
    result = ps.run(cfg, timeout=60)
    applied = result.metrics.dropna(subset=["staleness"])
    assert len(applied) == 30 and applied["rank"].eq(0).all()      # rank 0 is the server
    assert sorted(applied["step"]) == list(range(30))              # one row per update
    assert set(applied["worker"]) <= {0, 1, 2} and applied["lr"].eq(0.05).all()
    pushes = [e for e in result.servers[0]["log"] if e[0] == "push"]
    assert applied.sort_values("step")["staleness"].tolist() == [e[4] for e in pushes]


@pytest.mark.parametrize("kwargs,match", [
    (dict(staleness_aware="yes"), "staleness_aware='yes'"),
    (dict(num_servers=0), "num_servers=0"),
    (dict(eval_size=0), "eval_size=0"), (dict(step_time=-1), "step_time=-1"),
    (dict(random_delay=float("nan")), "random_delay=nan"), (dict(drop_at=0), "drop_at=0")])
def test_every_numeric_or_flag_field_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ps.ParameterServerConfig(**kwargs)


def test_helpers_refuse_bad_numbers_by_name():
    with pytest.raises(ValueError, match="staleness=-1"):
        ps.max_delay(-1, 4)
    with pytest.raises(ValueError, match="num_workers=0"):
        ps.max_delay(1, 0)
    with pytest.raises(ValueError, match="num_servers=20"):
        shard_bounds(17, 20)
    cfg = ps.ParameterServerConfig(num_workers=2)
    ds = cfg.workload.loaded().dataset
    with pytest.raises(ValueError, match="worker=2"):
        worker_batch(cfg, ds, 2, 0)
