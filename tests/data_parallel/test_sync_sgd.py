"""distlab.data_parallel.sync_sgd: synchronous data-parallel SGD equals single-process SGD on the global batch."""
import pytest
import torch

from distlab.problems import data
from distlab.data_parallel.sync_sgd import (TRAIN_SIZES, SyncSGDConfig, batch_indices, build_task, lr_at,
                           start_run, train_reference)

pytestmark = pytest.mark.timeout(120)


def test_bad_configs_name_the_field_value_and_range():
    cases = {"task": "mnist", "world_size": 0, "lr": -1.0, "batch_size": 600,
             "num_steps": 0, "variant": "ring", "bucket_size_mb": 0, "lr_scaling": 1,
             "momentum": 1.0, "eval_every": 0, "timeline_steps": 100}
    for field, value in cases.items():
        with pytest.raises(ValueError, match=rf"SyncSGDConfig\.{field}={value!r}.*allowed"):
            SyncSGDConfig(**{field: value})
    with pytest.raises(ValueError, match="has 256 examples on 4 ranks"):
        SyncSGDConfig(world_size=4, batch_size=300)


def test_train_sizes_match_the_datasets():
    assert TRAIN_SIZES == {t: len(build_task(t).dataset.y) for t in TRAIN_SIZES}
    assert len(data.digits().y) == TRAIN_SIZES["digits"]


def test_linear_scaling_rule_with_gradual_warmup():
    c = SyncSGDConfig(world_size=4, lr=0.1, lr_scaling=True, warmup_steps=10)
    assert lr_at(c, 0) == pytest.approx(0.1)
    assert lr_at(c, 5) == pytest.approx(0.25)          # halfway from 0.1 to 0.4
    assert lr_at(c, 10) == lr_at(c, 99) == pytest.approx(0.4)
    assert lr_at(SyncSGDConfig(world_size=4, lr=0.1), 50) == 0.1


def test_batches_are_disjoint_equal_and_reshuffled_each_epoch():
    c = SyncSGDConfig(world_size=3, batch_size=50)     # 341 per shard: 6 batches per epoch
    n = TRAIN_SIZES["linear"]
    epoch0 = [torch.cat([batch_indices(c, r, s, n) for s in range(6)]) for r in range(3)]
    assert all(len(e) == 300 for e in epoch0)
    assert len(torch.cat(epoch0).unique()) == 900      # disjoint across ranks and steps
    assert not torch.equal(batch_indices(c, 0, 0, n), batch_indices(c, 0, 6, n))


RUNS = [SyncSGDConfig(task="linear", world_size=2, variant="naive", num_steps=40, lr=0.1,
                      eval_every=5, timeline_steps=2),
        SyncSGDConfig(task="digits", world_size=4, variant="bucketed", bucket_size_mb=0.01,
                      batch_size=16, num_steps=30, lr=0.05, momentum=0.9, lr_scaling=True,
                      warmup_steps=5, eval_every=10, timeline_steps=2)]


@pytest.mark.parametrize("config", RUNS, ids=lambda c: f"{c.task}-{c.world_size}-{c.variant}")
def test_sync_sgd_equals_single_process_sgd_on_the_global_batch(config):
    run = start_run(config, timeout=100)
    results = run.result()
    ref = train_reference(config)
    for rank, out in enumerate(results):
        torch.testing.assert_close(out["params"], ref["params"], msg=f"rank {rank} params")
    # The mean of the ranks' batch losses is the global batch's loss.
    mean_loss = torch.tensor([r["losses"] for r in results]).mean(0)
    torch.testing.assert_close(mean_loss, torch.tensor(ref["losses"]))
    assert results[0]["final"]["val_loss"] == pytest.approx(ref["final"]["val_loss"], rel=1e-4)

    df = run.metrics()
    assert set(df["rank"]) == set(range(config.world_size))
    assert len(df) == config.world_size * config.num_steps
    for col in ("loss", "lr", "bytes_sent", "comm_time", "compute_time", "val_loss"):
        assert col in df.columns, col
    assert df.groupby("rank")["bytes_sent"].apply(lambda s: s.is_monotonic_increasing).all()
    kinds = {e["kind"] for e in results[1]["timeline"]}
    assert {"forward", "backward", "all_reduce"} <= kinds
    assert {e["step"] for e in results[1]["timeline"]} == {1, 2}
    if config.task == "linear":   # the seed's worked example converges (noise variance 0.01)
        assert ref["final"]["val_loss"] < 0.05
    else:
        assert "accuracy" in df.columns and ref["final"]["accuracy"] > 0.7


def test_hand_written_sgd_is_torch_sgd():
    from distlab.data_parallel.sync_sgd import SGD
    torch.manual_seed(0)
    w1 = torch.randn(5, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_(True)
    ours, theirs = SGD([w1], momentum=0.9), torch.optim.SGD([w2], lr=0.1, momentum=0.9)
    for step in range(4):
        for w in (w1, w2):
            ((w - step) ** 2).sum().backward()
        ours.step(0.1)
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
    torch.testing.assert_close(w1, w2)
