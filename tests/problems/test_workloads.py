"""distlab.problems.workloads: every kind of workload trains, the same from the same seed."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from distlab.problems.data import linear_regression
from distlab.problems.models import linear
from distlab.problems.workloads import MODELS, Workload, train_reference


@pytest.mark.parametrize("model", MODELS)
def test_reference_training_lowers_the_loss_and_repeats_exactly(model):
    w = Workload(model=model, hidden=16, depth=1, num_heads=2, num_steps=8, lr=0.1)
    first = train_reference(w)
    assert first == train_reference(w) and first[-1] < first[0]


def test_linear_workload_is_sgd_on_least_squares_by_hand():
    w = Workload(model="linear", batch_size=32, num_steps=3, lr=0.1, seed=3)
    data = linear_regression(seed=3)
    model = linear(data.num_features, seed=3)
    g = torch.Generator().manual_seed(4)
    want = []
    for _ in range(3):
        idx = torch.randint(len(data.y), (32,), generator=g)
        loss = F.mse_loss(model(data.X[idx]), data.y[idx])
        want.append(loss.item())
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    torch.testing.assert_close(torch.tensor(train_reference(w)), torch.tensor(want))


@pytest.mark.parametrize("field, value", [("model", "cnn"), ("lr", 0), ("batch_size", 0),
                                          ("num_steps", True), ("hidden", 1.5),
                                          ("seed", 1.5), ("seed", -1),
                                          ("optimizer_name", "lion"), ("momentum", 1.0),
                                          ("weight_decay", -0.1)])
def test_bad_workloads_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"Workload.{field}="):
        Workload(**{field: value})


def test_replacing_the_seed_of_a_loaded_workload_reloads_its_data():
    w = Workload(model="linear", seed=1).loaded()
    other = replace(w, seed=2)
    assert other.dataset is None
    torch.testing.assert_close(other.loaded().dataset.X, linear_regression(seed=2).X)
    same = replace(w, lr=0.5)                    # not a data field: the data travels on
    assert same.dataset is w.dataset


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_the_workload_builds_the_optimizer_it_names(name, cls):
    w = Workload(optimizer_name=name, lr=0.01, weight_decay=0.1)
    opt = w.optimizer(torch.nn.Linear(2, 1).parameters())
    assert type(opt) is cls
    assert opt.defaults["lr"] == 0.01 and opt.defaults["weight_decay"] == 0.1
