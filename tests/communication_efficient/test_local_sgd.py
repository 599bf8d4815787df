"""Local SGD, FedAvg and data-parallel Adam/LAMB/1-bit Adam warm-up against single-process
references, on 2 and 4 real ranks (one launch per world size runs every configuration)."""
import pytest
import torch

from distlab.communication_efficient import local_sgd as L
from distlab.communication_efficient.compression import bytes_sent_per_call, make_compressor
from distlab.problems.models import mlp

pytestmark = pytest.mark.timeout(180)

STEPS = 12
SYNC = {  # configurations that must equal single-process synchronous training
    "sgd H=1": L.LocalSGDConfig(num_steps=STEPS, period=1, lr=0.3),
    "sgd H=1 skewed": L.LocalSGDConfig(num_steps=STEPS, period=1, shards="label_skewed"),
    "adam": L.LocalSGDConfig(num_steps=STEPS, optimizer="adam", lr=0.01),
    "lamb": L.LocalSGDConfig(num_steps=STEPS, optimizer="lamb", lr=0.01),
    "1-bit adam warm-up": L.LocalSGDConfig(num_steps=STEPS, optimizer="onebit_adam", lr=0.01,
                                           warmup_steps=STEPS),
}
LOCAL = L.LocalSGDConfig(num_steps=STEPS, period=4, lr=0.3)
TOPK = L.LocalSGDConfig(num_steps=STEPS, period=3, compression="topk", ratio=0.05)
FEDAVG = L.FedAvgConfig(num_rounds=3, num_clients=6, client_fraction=0.5, local_steps=3,
                        shards="label_skewed")
NUM_PARAMETERS = sum(p.numel() for p in mlp(64, 32, 10, depth=1).parameters())


def local_sgd_simulation(config, world_size):
    """One process plays every rank: H local SGD steps each, then the mean model."""
    with L._one_thread():
        return _simulation(config, world_size)


def _simulation(config, world_size):
    data = L.digits(seed=config.seed)
    shards = L._shards(data, config, world_size)
    models = [mlp(64, config.hidden, 10, depth=1, seed=config.seed) for _ in range(world_size)]
    streams = [L._batches(s, config.batch_size, seed=config.seed * 1000 + r + 1)
               for r, s in enumerate(shards)]
    losses = [L.evaluate(models[0], data)["loss"]]
    for step in range(1, config.num_steps + 1):
        for model, stream in zip(models, streams):
            idx = next(stream)
            L._sgd_step(model, list(model.parameters()), data.X[idx], data.y[idx], config.lr)
        if step % config.period == 0 or step == config.num_steps:
            mean = torch.stack([L._flat(m.parameters()) for m in models]).mean(0)
            for m in models:
                L._assign(list(m.parameters()), mean)
            losses.append(L.evaluate(models[0], data)["loss"])
    return losses


@pytest.fixture(scope="module", params=[2, 4])
def runs(request):
    configs = {**SYNC, "local H=4": LOCAL, "topk H=3": TOPK, "fedavg": FEDAVG}
    return request.param, L.compare(configs, world_size=request.param, timeout=170)


def rank0(df, run):
    return df[(df["run"] == run) & (df["rank"] == 0)].sort_values("step")


def test_h1_and_data_parallel_optimizers_equal_single_process_training(runs):
    world_size, df = runs
    for name, config in SYNC.items():
        want, _ = L.reference(config, world_size)
        got = rank0(df, name)
        assert got["step"].tolist() == list(range(STEPS + 1)), name
        torch.testing.assert_close(torch.tensor(got["loss"].tolist()), torch.tensor(want),
                                   msg=name)
        per_step = bytes_sent_per_call(make_compressor("none"), NUM_PARAMETERS, world_size)
        assert got["bytes_sent"].tolist() == [s * per_step for s in range(STEPS + 1)], name


def test_local_sgd_with_period_h_equals_the_simulation(runs):
    world_size, df = runs
    got = rank0(df, "local H=4")
    assert got["step"].tolist() == [0, 4, 8, 12]
    torch.testing.assert_close(torch.tensor(got["loss"].tolist()),
                               torch.tensor(local_sgd_simulation(LOCAL, world_size)))
    per_sync = bytes_sent_per_call(make_compressor("none"), NUM_PARAMETERS, world_size)
    assert got["bytes_sent"].tolist() == [0, per_sync, 2 * per_sync, 3 * per_sync]
    div = df[(df["run"] == "local H=4") & (df["step"] > 0)]["divergence"]
    assert len(div) == 3 * world_size and (div > 0).all(), "local models drift between averages"


def test_compressed_local_sgd_sends_the_compressed_bytes(runs):
    world_size, df = runs
    got = rank0(df, "topk H=3")
    per_sync = bytes_sent_per_call(make_compressor("topk", 0.05), NUM_PARAMETERS, world_size)
    assert got["bytes_sent"].tolist() == [s * per_sync for s in range(5)]
    assert got["loss"].iloc[-1] < got["loss"].iloc[0]


def test_fedavg_equals_single_process_fedavg(runs):
    world_size, df = runs
    want, _ = L.fedavg_reference(FEDAVG)
    got = rank0(df, "fedavg")
    torch.testing.assert_close(torch.tensor(got["loss"].tolist()), torch.tensor(want))
    per_round = 2 * (world_size - 1) * 4 * (NUM_PARAMETERS + 1) // world_size
    assert got["bytes_sent"].tolist() == [r * per_round for r in range(4)]


@pytest.mark.parametrize("cls, field, value", [
    (L.LocalSGDConfig, "period", 0), (L.LocalSGDConfig, "lr", -1.0),
    (L.LocalSGDConfig, "compression", "zip"), (L.LocalSGDConfig, "ratio", 1.5),
    (L.LocalSGDConfig, "shards", "random"), (L.LocalSGDConfig, "bandwidth", 0.0),
    (L.FedAvgConfig, "client_fraction", 0.0), (L.FedAvgConfig, "num_clients", 0)])
def test_bad_config_names_the_field_before_any_process(cls, field, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field}="):
        cls(**{field: value})


def test_adaptive_optimizers_need_period_one():
    with pytest.raises(ValueError, match="optimizer='lamb'.*period=1"):
        L.LocalSGDConfig(optimizer="lamb", period=4)
    with pytest.raises(ValueError, match="LocalSGDConfig.period=0"):
        L.start_run(world_size=2, period=0)
