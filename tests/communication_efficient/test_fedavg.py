"""Federated averaging on 2 and 4 real ranks against single-process FedAvg, its bytes per
round, label-skewed clients (many of them), and bad configurations refused."""
from dataclasses import replace

import pytest
import torch

from distlab.communication_efficient import fedavg
from distlab.communication_efficient.local_sgd import WORKLOAD
from distlab.problems.models import mlp

pytestmark = pytest.mark.timeout(180)

NUM_PARAMETERS = sum(p.numel() for p in mlp(64, 32, 10, depth=1).parameters())
PER_CLIENT = 16              # examples per local step of each sampled client


def workload(rounds, local_steps, clients_per_round):
    return replace(WORKLOAD, num_steps=rounds * local_steps,
                   batch_size=PER_CLIENT * clients_per_round)


SKEWED = dict(workload=workload(rounds=3, local_steps=3, clients_per_round=3), num_clients=6,
              client_fraction=0.5, local_steps=3, shards="label_skewed")


@pytest.mark.parametrize("world_size", [2, 4])
def test_fedavg_equals_single_process_fedavg_and_sends_one_all_reduce_per_round(world_size):
    config = fedavg.FedAvgConfig(world_size=world_size, **SKEWED)
    run = fedavg.start(config, timeout=120)
    results = run.result()
    want, want_params = fedavg.reference(config)
    got = run.metrics()
    got = got[got["rank"] == 0].sort_values("step")
    torch.testing.assert_close(torch.tensor(got["loss"].tolist()), torch.tensor(want))
    for result in results:
        torch.testing.assert_close(torch.tensor(result["params"]), torch.tensor(want_params))
    per_round = 2 * (world_size - 1) * 4 * (NUM_PARAMETERS + 1) // world_size
    assert got["bytes_sent"].tolist() == [r * per_round for r in range(4)]


def test_fifty_clients_with_two_labels_each_train_on_real_ranks():
    config = fedavg.FedAvgConfig(world_size=2, num_clients=50, classes_per_client=2,
                                 client_fraction=0.2, local_steps=2, shards="label_skewed",
                                 workload=workload(rounds=2, local_steps=2,
                                                   clients_per_round=10))
    results = fedavg.run(config, timeout=120)
    _, want_params = fedavg.reference(config)
    for result in results:
        torch.testing.assert_close(torch.tensor(result["params"]), torch.tensor(want_params))


def test_a_label_skewed_split_the_digits_cannot_give_is_refused():
    with pytest.raises(ValueError, match="FedAvgConfig.num_clients=1000 is out of range; "
                                         "allowed a split of the digits' labels"):
        fedavg.FedAvgConfig(num_clients=1000, classes_per_client=2, shards="label_skewed")


@pytest.mark.parametrize("field, value", [
    ("world_size", 0), ("num_clients", 0), ("client_fraction", 0.0),
    ("client_fraction", True), ("local_steps", 2.0),
    ("classes_per_client", 0), ("latency", 11), ("shards", "dirichlet"), ("workload", "mlp"),
    ("dirichlet_alpha", 0.0), ("dirichlet_alpha", "0.1"), ("dropout_prob", 1.0),
    ("slow_clients", -1), ("slow_delay", 2.0), ("scaffold", 1)])
def test_bad_config_names_the_field_before_any_process(field, value):
    with pytest.raises(ValueError, match=f"FedAvgConfig.{field}="):
        fedavg.FedAvgConfig(**{field: value})


def test_rounds_are_the_workloads_local_steps_over_e():
    config = fedavg.FedAvgConfig(local_steps=5, workload=replace(WORKLOAD, num_steps=40,
                                                                 batch_size=80))
    assert config.num_rounds == 8


@pytest.mark.parametrize("fields, message", [
    (dict(num_steps=0), "Workload.num_steps=0"),           # no round at all
    (dict(lr=float("inf")), "Workload.lr=inf"),
    (dict(num_steps=25), "FedAvgConfig.workload.num_steps=25 .* multiple of local_steps=10"),
    (dict(batch_size=64), "FedAvgConfig.workload.batch_size=64 .* multiple of "
                          "clients_per_round=5"),
    (dict(model="transformer"), "FedAvgConfig.workload.model='transformer'")])
def test_a_workload_fedavg_cannot_train_is_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        fedavg.FedAvgConfig(local_steps=10, num_clients=20, client_fraction=0.25,
                            workload=replace(WORKLOAD, **{"num_steps": 300, "batch_size": 80,
                                                          **fields}))
