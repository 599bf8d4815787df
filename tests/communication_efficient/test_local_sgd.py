"""Local SGD and data-parallel Adam/LAMB/1-bit Adam warm-up against single-process
references, on 2 and 4 real ranks (one launch per world size runs every configuration)."""
from dataclasses import replace

import pytest
import torch

from distlab.communication_efficient import local_sgd as L
from distlab.communication_efficient import local_training as T
from distlab.communication_efficient.compression import bytes_sent_per_call, make_compressor
from distlab.course import lab06_communication_efficient as lab
from distlab.problems.data import digits
from distlab.problems.models import mlp

pytestmark = pytest.mark.timeout(180)

STEPS = 12
PER_RANK = 16                # examples per rank per step, on every world size


def workload(**fields):
    return replace(L.WORKLOAD, num_steps=STEPS, **fields)


SYNC = {  # configurations that must equal single-process synchronous training
    "sgd H=1": L.LocalSGDConfig(workload=workload(lr=0.3), period=1),
    "sgd H=1 skewed": L.LocalSGDConfig(workload=workload(), period=1, shards="label_skewed"),
    "adam": L.LocalSGDConfig(workload=workload(lr=0.01), optimizer="adam"),
    "lamb": L.LocalSGDConfig(workload=workload(lr=0.01), optimizer="lamb"),
    "1-bit adam warm-up": L.LocalSGDConfig(workload=workload(lr=0.01), optimizer="onebit_adam",
                                           warmup_steps=STEPS),
}
LOCAL = L.LocalSGDConfig(workload=workload(lr=0.3), period=4)
TOPK = L.LocalSGDConfig(workload=workload(), period=3, compression="topk", ratio=0.05)
NUM_PARAMETERS = sum(p.numel() for p in mlp(64, 32, 10, depth=1).parameters())


def local_sgd_simulation(config):
    """One process plays every rank: H local SGD steps each, then the mean model."""
    wl = config.workload
    with T.one_thread():
        data = digits(seed=wl.seed)
        shards = T.split(data, config.shards, config.world_size, config.classes_per_rank,
                         wl.seed)
        models = [mlp(64, wl.hidden, 10, depth=1, seed=wl.seed)
                  for _ in range(config.world_size)]
        optimizers = [torch.optim.SGD(m.parameters(), lr=wl.lr) for m in models]
        streams = [T.sample_batches(s, wl.batch_size // config.world_size,
                                    seed=wl.seed * 1000 + r + 1)
                   for r, s in enumerate(shards)]
        loss = torch.nn.functional.cross_entropy
        losses = [T.evaluate(models[0], data, loss)["loss"]]
        for step in range(1, wl.num_steps + 1):
            for model, opt, stream in zip(models, optimizers, streams):
                idx = next(stream)
                opt.zero_grad()
                loss(model(data.X[idx]), data.y[idx]).backward()
                opt.step()
            if step % config.period == 0 or step == wl.num_steps:
                mean = torch.stack([T.flat(m.parameters()) for m in models]).mean(0)
                for m in models:
                    T.assign(list(m.parameters()), mean)
                losses.append(T.evaluate(models[0], data, loss)["loss"])
        return losses


def on(world_size, config):
    """``config`` on ``world_size`` ranks, each still drawing PER_RANK examples a step."""
    return replace(config, world_size=world_size,
                   workload=replace(config.workload, batch_size=PER_RANK * world_size))


@pytest.fixture(scope="module", params=[2, 4])
def runs(request):
    p = request.param
    configs = {name: on(p, c) for name, c in {**SYNC, "local H=4": LOCAL,
                                               "topk H=3": TOPK}.items()}
    return p, lab.compare(configs, timeout=170)


def rank0(df, run):
    return df[(df["run"] == run) & (df["rank"] == 0)].sort_values("step")


def test_h1_and_data_parallel_optimizers_equal_single_process_training(runs):
    world_size, df = runs
    for name, config in SYNC.items():
        want, _ = L.reference(on(world_size, config))
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
                               torch.tensor(local_sgd_simulation(on(world_size, LOCAL))))
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


def test_run_returns_the_same_final_model_on_every_rank():
    config = L.LocalSGDConfig(workload=replace(L.WORKLOAD, num_steps=6), world_size=2,
                              period=3)
    results = L.run(config, timeout=120)
    assert len(results) == 2
    assert results[0]["params"] == results[1]["params"]
    assert results[0]["loss"] == results[1]["loss"]
    torch.testing.assert_close(results[0]["loss"], local_sgd_simulation(config)[-1])


def _train_on_two(config):
    return L.train(config)


def test_train_refuses_a_group_of_another_size():
    import distlab
    with pytest.raises(distlab.WorkerError, match="config.world_size=3 but the group has 2"):
        distlab.launch(_train_on_two, 2, L.LocalSGDConfig(
            world_size=3, workload=replace(L.WORKLOAD, num_steps=1, batch_size=48)), timeout=60)


@pytest.mark.parametrize("field, value", [
    ("world_size", 0), ("world_size", True), ("world_size", 65), ("period", 0),
    ("compression", "zip"), ("ratio", 1.5), ("shards", "random"),
    ("bandwidth", 0.0), ("latency", -1.0), ("classes_per_rank", 11),
    ("error_feedback", 1), ("optimizer", "adamw"), ("workload", None)])
def test_bad_config_names_the_field_before_any_process(field, value):
    with pytest.raises(ValueError, match=f"LocalSGDConfig.{field}="):
        L.LocalSGDConfig(**{field: value})


@pytest.mark.parametrize("fields, message", [
    (dict(lr=-1.0), "Workload.lr=-1.0"), (dict(lr=True), "Workload.lr=True"),
    (dict(seed=-1), "Workload.seed=-1"),
    (dict(model="linear"), "LocalSGDConfig.workload.model='linear' .* allowed 'mlp'"),
    (dict(batch_size=30), "LocalSGDConfig.workload.batch_size=30 .* multiple of world_size=4")])
def test_a_workload_local_sgd_cannot_train_is_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        L.LocalSGDConfig(world_size=4, workload=replace(L.WORKLOAD, **fields))


@pytest.mark.parametrize("make, message", [
    (lambda: next(T.sample_batches(torch.arange(5), 0, seed=0)), "batch_size=0 is out of range"),
    (lambda: next(T.sample_batches(torch.arange(0), 4, seed=0)), "shard is empty"),
    (lambda: T.split(digits(), "dirichlet", 4, 2, 0), "shards='dirichlet' is out of range"),
    (lambda: T.TrafficMeter(1e-4, 0.0, 2), "TrafficMeter.bandwidth=0.0 is out of range"),
    (lambda: T.TrafficMeter(-1.0, 1e6, 2), "TrafficMeter.latency=-1.0 is out of range"),
    (lambda: T.TrafficMeter(1e-4, 1e6, 0), "TrafficMeter.world_size=0 is out of range"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_shared_pieces_refuse_bad_numbers_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_adaptive_optimizers_need_period_one():
    with pytest.raises(ValueError, match="optimizer='lamb'.*period=1"):
        L.LocalSGDConfig(optimizer="lamb", period=4)
