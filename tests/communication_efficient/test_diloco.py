"""DiLoCo on 2 and 4 real ranks against its one-process reference, against local SGD, and
against DDP (bytes from the ledger, loss at equal inner steps)."""
from dataclasses import replace

import pytest
import torch

from distlab.communication import alpha_beta
from distlab.communication_efficient import diloco as D
from distlab.communication_efficient import local_sgd as L
from distlab.communication_efficient import local_training as T
from distlab.data_parallel import sync_sgd

pytestmark = pytest.mark.timeout(180)

H, STEPS, PER_RANK = 4, 12, 16


def config(world_size=2, **fields):
    workload = replace(D.WORKLOAD, hidden=16, num_steps=STEPS, batch_size=PER_RANK * world_size)
    return D.DiLoCoConfig(workload=workload, world_size=world_size, inner_steps=H, **fields)


def num_parameters(workload):
    return sum(w.numel() for w in workload.build_model().parameters())


def training_loss(workload, params):
    model = workload.build_model()
    T.assign(list(model.parameters()), torch.as_tensor(params))
    data = workload.loaded().dataset
    return workload.loss(model(data.X), data.y).item()


@pytest.fixture(scope="module", params=[2, 4])
def runs(request):
    c = config(request.param)
    return c, D.run(c, timeout=170)


def test_diloco_equals_its_one_process_reference(runs):
    c, results = runs
    ref = D.reference(c)
    for r in results:                     # every rank holds the same θ
        torch.testing.assert_close(torch.tensor(r["params"]), torch.tensor(ref["params"]))
    torch.testing.assert_close([h["loss"] for h in results[0]["history"]],
                               [h["loss"] for h in ref["history"]])
    assert [h["step"] for h in ref["history"]] == [0, 4, 8, 12]


def test_one_all_reduce_of_the_model_per_round_from_the_ledger(runs):
    c, results = runs
    model_bytes = 4 * num_parameters(c.workload)
    per_round = alpha_beta.ring_all_reduce_bytes(model_bytes, c.world_size)
    expected = [per_round if step % H == 0 else 0 for step in range(1, STEPS + 1)]
    assert results[0]["bytes_per_step"] == expected
    assert results[0]["history"][-1]["bytes_sent"] == c.num_rounds * per_round


def test_diloco_sends_h_times_fewer_bytes_than_ddp_at_equal_inner_steps():
    c = config(2)
    diloco = D.run(c, timeout=170)[0]["history"][-1]["bytes_sent"]
    ddp = sync_sgd.run(sync_sgd.SyncSGDConfig(workload=c.workload, world_size=2),
                       timeout=170)[0]["final"]["bytes_sent"]
    # DDP: one gradient all-reduce a step, plus building the wrapper's broadcast of the model
    broadcast = 4 * num_parameters(c.workload)
    assert ddp == H * diloco + broadcast


def test_outer_lr_1_without_momentum_equals_local_sgd_with_the_same_inner_optimizer():
    c = config(2, outer_lr=1.0, outer_momentum=0.0)
    local = L.run(L.LocalSGDConfig(workload=c.workload, world_size=2, period=H), timeout=170)
    torch.testing.assert_close(torch.tensor(local[0]["params"]),
                               torch.tensor(D.reference(c)["params"]))


def test_paper_outer_settings_reach_the_ddp_loss_within_0_05_at_equal_inner_steps():
    # Measured (2 ranks, 200 AdamW inner steps of the 4-layer MLP, H = 20): DiLoCo 0.191,
    # DDP 0.172; with H = 10, 0.350 against 0.172 (ten more outer steps of momentum 0.9 do
    # not help at this scale).
    workload = replace(D.WORKLOAD, depth=3)
    diloco = D.reference(D.DiLoCoConfig(workload=workload, inner_steps=20))["loss"]
    with T.one_thread():
        ddp = sync_sgd.reference(sync_sgd.SyncSGDConfig(workload=workload, world_size=2))
    assert diloco - training_loss(workload, ddp["params"]) < 0.05


def test_table_has_one_row_per_outer_step():
    c = config(2)
    df = D.table(D.reference(c), "DiLoCo")
    assert list(df.columns) == ["method", "step", "outer_step", "loss", "bytes_sent"]
    assert df["step"].tolist() == [0, 4, 8, 12] and set(df["method"]) == {"DiLoCo"}


@pytest.mark.parametrize("field, value", [("inner_steps", 5), ("inner_steps", 0),
                                          ("outer_lr", 0), ("outer_momentum", 1.0),
                                          ("world_size", True), ("shards", "sorted")])
def test_config_refuses_a_bad_field(field, value):
    fields = {"workload": replace(D.WORKLOAD, num_steps=STEPS), "inner_steps": H, field: value}
    with pytest.raises(ValueError, match=field):
        D.DiLoCoConfig(**fields)
