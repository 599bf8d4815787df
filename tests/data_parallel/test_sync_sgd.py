"""distlab.data_parallel.sync_sgd: synchronous data-parallel SGD equals single-process SGD on the global batch."""
from dataclasses import replace

import pytest
import torch

from distlab.data_parallel import sync_sgd
from distlab.data_parallel.sync_sgd import SyncSGDConfig, batch_indices, lr_at, reference
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)

LINEAR = Workload(model="linear", batch_size=64, lr=0.1, num_steps=40)
LINEAR_SIZE = len(LINEAR.loaded().dataset.y)   # 1024 training examples


def test_bad_configs_name_the_field_value_and_range():
    cases = {"world_size": 0, "variant": "ring", "bucket_size_mb": 0, "lr_scaling": 1,
             "momentum": 1.0, "eval_every": 0, "timeline_steps": 100}
    for field, value in cases.items():
        with pytest.raises(ValueError, match=rf"SyncSGDConfig\.{field}={value!r}.*allowed"):
            SyncSGDConfig(**{field: value})
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.workload=.*model in \('linear', 'mlp'\)"):
        SyncSGDConfig(workload=Workload(model="transformer"))
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.workload=\{'lr': 0.1\}"):
        SyncSGDConfig(workload={"lr": 0.1})


def test_the_global_batch_must_split_equally_over_the_ranks():
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.world_size=3 .*a divisor of "
                                         r"workload\.batch_size=64"):
        SyncSGDConfig(workload=LINEAR, world_size=3)
    SyncSGDConfig(workload=replace(LINEAR, batch_size=63), world_size=3)   # 21 each


def test_the_global_batch_must_fit_in_the_ranks_shards():
    with pytest.raises(ValueError, match="has 256 examples on 4 ranks"):
        SyncSGDConfig(workload=replace(LINEAR, batch_size=1200), world_size=4)
    SyncSGDConfig(workload=replace(LINEAR, batch_size=1024), world_size=4)   # 256 each


def test_linear_scaling_rule_with_gradual_warmup():
    c = SyncSGDConfig(workload=replace(LINEAR, lr=0.1), world_size=4, lr_scaling=True,
                      warmup_steps=10)
    assert lr_at(c, 0) == pytest.approx(0.1)
    assert lr_at(c, 5) == pytest.approx(0.25)          # halfway from 0.1 to 0.4
    assert lr_at(c, 10) == lr_at(c, 99) == pytest.approx(0.4)
    assert lr_at(replace(c, lr_scaling=False), 50) == 0.1


def test_warmup_is_a_knob_of_its_own_and_zero_turns_it_off():
    c = SyncSGDConfig(workload=replace(LINEAR, lr=0.1), world_size=4, lr_scaling=True,
                      warmup_steps=0)
    assert lr_at(c, 0) == lr_at(c, 7) == pytest.approx(0.4)   # the scaled rate from step 0
    assert lr_at(replace(c, warmup_steps=4), 2) == pytest.approx(0.25)
    assert lr_at(replace(c, lr_scaling=False, warmup_steps=4), 2) == 0.1   # nothing to warm to
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.warmup_steps=-1 .*an int >= 0"):
        replace(c, warmup_steps=-1)


def test_batches_are_disjoint_equal_and_reshuffled_each_epoch():
    c = SyncSGDConfig(workload=replace(LINEAR, batch_size=150), world_size=3)
    n = LINEAR_SIZE                                    # 341 per shard: 6 shares of 50 per epoch
    epoch0 = [torch.cat([batch_indices(c, r, s, n) for s in range(6)]) for r in range(3)]
    assert all(len(e) == 300 for e in epoch0)
    assert len(torch.cat(epoch0).unique()) == 900      # disjoint across ranks and steps
    assert not torch.equal(batch_indices(c, 0, 0, n), batch_indices(c, 0, 6, n))


def test_each_rank_takes_its_share_of_the_global_batch():
    c = SyncSGDConfig(workload=replace(LINEAR, batch_size=96), world_size=4)
    shares = [batch_indices(c, r, 0, LINEAR_SIZE) for r in range(4)]
    assert [len(s) for s in shares] == [24] * 4 and len(torch.cat(shares).unique()) == 96


RUNS = [SyncSGDConfig(workload=LINEAR, world_size=2, variant="naive", eval_every=5,
                      timeline_steps=2),
        SyncSGDConfig(workload=Workload(model="mlp", batch_size=64, num_steps=30, lr=0.05),
                      world_size=4, variant="bucketed", bucket_size_mb=0.01, momentum=0.9,
                      lr_scaling=True, warmup_steps=5, eval_every=10, timeline_steps=2)]


@pytest.mark.parametrize("config", RUNS,
                         ids=lambda c: f"{c.workload.model}-{c.world_size}-{c.variant}")
def test_sync_sgd_equals_single_process_sgd_on_the_global_batch(config):
    run = sync_sgd.start(config, timeout=100)
    results = run.result()
    ref = reference(config)
    for rank, out in enumerate(results):
        torch.testing.assert_close(out["params"], ref["params"], msg=f"rank {rank} params")
    # The mean of the ranks' batch losses is the global batch's loss.
    mean_loss = torch.tensor([r["losses"] for r in results]).mean(0)
    torch.testing.assert_close(mean_loss, torch.tensor(ref["losses"]))
    assert results[0]["final"]["val_loss"] == pytest.approx(ref["final"]["val_loss"], rel=1e-4)

    df = run.metrics()
    steps = config.workload.num_steps
    assert set(df["rank"]) == set(range(config.world_size))
    assert len(df) == config.world_size * steps
    for col in ("loss", "lr", "bytes_sent", "comm_time", "compute_time", "val_loss"):
        assert col in df.columns, col
    assert df.groupby("rank")["bytes_sent"].apply(lambda s: s.is_monotonic_increasing).all()
    kinds = {e["kind"] for e in results[1]["timeline"]}
    assert {"forward", "backward", "all_reduce"} <= kinds
    assert {e["step"] for e in results[1]["timeline"]} == {1, 2}
    if config.workload.model == "linear":   # the worked example converges (noise variance 0.01)
        assert ref["final"]["val_loss"] < 0.05
    else:
        assert "accuracy" in df.columns and ref["final"]["accuracy"] > 0.7


def test_numeric_arguments_of_the_helpers_are_refused_by_name():
    c = SyncSGDConfig(workload=LINEAR, world_size=2)
    n = LINEAR_SIZE
    for call, match in [(lambda: lr_at(c, -1), r"step=-1 .*an int >= 0"),
                        (lambda: lr_at(c, 1.5), r"step=1.5 "),
                        (lambda: batch_indices(c, 2, 0, n), r"rank=2 .*0\.\.1"),
                        (lambda: batch_indices(c, True, 0, n), r"rank=True "),
                        (lambda: batch_indices(c, 0, -3, n), r"step=-3 "),
                        (lambda: batch_indices(c, 0, 0, 63), r"n=63 .*>= 64")]:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="SyncSGDConfig"):
        sync_sgd.start({"world_size": 2})


def test_run_waits_for_every_rank_and_steps_with_torch_sgd():
    config = SyncSGDConfig(workload=replace(LINEAR, num_steps=5), world_size=2, momentum=0.9,
                           lr_scaling=True, warmup_steps=2, variant="overlap")
    results = sync_sgd.run(config, timeout=100)
    ref = reference(config)
    assert len(results) == 2
    for out in results:
        torch.testing.assert_close(out["params"], ref["params"])
    # The reference is torch.optim.SGD with the scheduled rates on the workload's model.
    workload = config.workload.loaded()
    model, ds = workload.build_model(), workload.dataset
    opt = torch.optim.SGD(model.parameters(), lr=workload.lr, momentum=config.momentum)
    for step in range(workload.num_steps):
        idx = torch.cat([batch_indices(config, r, step, len(ds.y)) for r in range(2)])
        opt.param_groups[0]["lr"] = lr_at(config, step)
        opt.zero_grad()
        workload.loss(model(ds.X[idx]), ds.y[idx]).backward()
        opt.step()
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(model.parameters()),
                               ref["params"])



def test_sync_sgd_steps_the_workloads_optimizer_on_real_ranks():
    adam = SyncSGDConfig(workload=replace(LINEAR, num_steps=5, optimizer_name="adam", lr=0.05))
    got = sync_sgd.run(adam, timeout=60)
    want = reference(adam)
    for result in got:
        torch.testing.assert_close(result["params"], want["params"])
    sgd = reference(replace(adam, workload=replace(adam.workload, optimizer_name="sgd")))
    assert not torch.allclose(want["params"], sgd["params"]), "Adam steps, not SGD"


def test_a_given_momentum_is_the_workloads_sgd_momentum_and_adam_refuses_one():
    given = reference(SyncSGDConfig(workload=replace(LINEAR, num_steps=5), momentum=0.9))
    own = reference(SyncSGDConfig(workload=replace(LINEAR, num_steps=5, momentum=0.9)))
    torch.testing.assert_close(given["params"], own["params"])
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.momentum=0\.9 .*'adam'"):
        SyncSGDConfig(workload=replace(LINEAR, optimizer_name="adam"), momentum=0.9)
