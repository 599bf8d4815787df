"""distlab.data_parallel.ddp: every variant against single-process SGD on the global batch.

One launch per world size trains every variant (2 cores are shared); the tests below each
read one behaviour from it: ranks that start from different random weights end identical
after construction; three steps (one with ``no_sync`` gradient accumulation) match the
single-process reference with a frozen parameter, a tied weight and a buffer; gradients
inside ``no_sync`` stay local; a subgroup broadcasts from its own rank 0. The hard cases
(rank-dependent graphs, dtypes, BatchNorm, ...) are in ``test_data_parallel_hard_cases.py``.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distlab
from distlab.data_parallel import ddp as dp

pytestmark = pytest.mark.timeout(120)

CASES = [("naive", "sgd"), ("flat", "sgd"), ("overlap", "sgd"), ("bucketed", "sgd"),
         ("bucketed", "adam")]
BATCH = 4            # per rank, per micro-batch
TINY_BUCKET = 1e-4   # MiB: about 100 bytes, so the model spans several buckets


class Tied(nn.Module):
    """A frozen layer, a weight shared by two layers, and a buffer."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(6, 8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight                      # tied: one tensor, used twice
        self.head = nn.Linear(8, 1)
        self.register_buffer("scale", torch.rand(8) + 0.5)

    def forward(self, x):
        h = torch.tanh(self.inp(x)) * self.scale
        h = torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.frozen(h))))))
        return self.head(h)


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(256, 6, generator=g), torch.randn(256, 1, generator=g)


def _batch(rank: int, world_size: int, micro: int):
    """Micro-batch ``micro`` of ``rank``: disjoint rows, BATCH of them."""
    X, y = _data()
    rows = torch.arange(BATCH) * world_size + rank + micro * BATCH * world_size
    return X[rows], y[rows]


def _global(world_size: int, micro: int):
    parts = [_batch(r, world_size, micro) for r in range(world_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _optimizer(name, params):
    return (torch.optim.SGD(params, lr=0.1, momentum=0.9) if name == "sgd"
            else torch.optim.Adam(params, lr=0.01))


# step 0: micro-batch 0; step 1: micro-batches 1 (in no_sync) and 2 accumulated; step 2: 3
SCHEDULE = [[0], [1, 2], [3]]


def _train_rank(variant, opt_name, rank, world_size, init_seed, group=None):
    model = Tied(seed=init_seed)
    ddp = dp.wrap(model, variant, group=group, bucket_size_mb=TINY_BUCKET)
    after_init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _optimizer(opt_name, ddp.parameters())
    ddp.events = []
    local_grads = None
    for micros in SCHEDULE:
        opt.zero_grad()
        for j, m in enumerate(micros):
            X, y = _batch(rank, world_size, m)
            last = j == len(micros) - 1
            with (ddp.no_sync() if not last else _nothing()):
                F.mse_loss(ddp(X), y).backward()
            if not last:
                ddp.finish_gradient_synchronization()   # a no-op inside no_sync
                local_grads = {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}
        ddp.finish_gradient_synchronization()
        opt.step()
    return {"init": after_init, "final": dict(model.state_dict()), "local": local_grads,
            "events": len(ddp.events), "frozen_grad": model.frozen.weight.grad}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _reference(opt_name, world_size, init_seed):
    """Single process, whole global batch: what every rank must end with."""
    model = Tied(seed=init_seed)
    opt = _optimizer(opt_name, model.parameters())
    local = None
    for micros in SCHEDULE:
        opt.zero_grad()
        if len(micros) > 1:   # what each rank holds after its no_sync micro-batch
            local = []
            for r in range(world_size):
                X, y = _batch(r, world_size, micros[0])
                local.append(torch.autograd.grad(F.mse_loss(model(X), y),
                                                 [p for p in model.parameters() if p.requires_grad]))
        loss = sum(F.mse_loss(model(X), y) for X, y in (_global(world_size, m) for m in micros))
        loss.backward()
        opt.step()
    return dict(model.state_dict()), local


def _worker_all_variants(world_size):
    import torch.distributed as dist
    rank = dist.get_rank()
    out = {case: _train_rank(*case, rank, world_size, init_seed=100 + rank) for case in CASES}
    if world_size == 4:   # two independent groups of 2: the broadcast source is rank 0 *of the group*
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        out["group"] = _train_rank("bucketed", "sgd", rank % 2, 2, 100 + rank,
                                   group=groups[rank // 2])
    return out


@pytest.fixture(scope="module", params=[2, 4])
def trained(request):
    """``(world_size, per-rank results)`` of one launch of every variant."""
    world_size = request.param
    return world_size, distlab.launch(_worker_all_variants, world_size, world_size, timeout=100)


def test_construction_copies_rank_0s_parameters_and_buffers(trained):
    world_size, results = trained
    start = Tied(seed=100).state_dict()
    for case in CASES:
        for rank, out in enumerate(results):
            for k in start:
                torch.testing.assert_close(out[case]["init"][k], start[k],
                                           msg=f"{case} rank {rank} init {k}")


def test_every_variant_equals_single_process_sgd(trained):
    world_size, results = trained
    for case in CASES:
        expected, _ = _reference(case[1], world_size, init_seed=100)
        for rank, out in enumerate(results):
            for k in expected:
                torch.testing.assert_close(out[case]["final"][k], expected[k],
                                           msg=f"{case} rank {rank} {k}")


def test_frozen_parameters_get_no_gradient(trained):
    _, results = trained
    for case in CASES:
        for rank, out in enumerate(results):
            assert out[case]["frozen_grad"] is None, f"{case} rank {rank}: frozen got a gradient"


def test_no_sync_leaves_each_rank_its_own_gradient(trained):
    world_size, results = trained
    trainable = [n for n, p in Tied(0).named_parameters() if p.requires_grad]   # tied: once
    for case in CASES:
        _, local = _reference(case[1], world_size, init_seed=100)
        for rank, out in enumerate(results):
            for n, g in zip(trainable, local[rank]):
                torch.testing.assert_close(out[case]["local"][n], g,
                                           msg=f"{case} rank {rank} no_sync {n}")


def test_communication_intervals_are_recorded(trained):
    _, results = trained
    for case in CASES:
        for rank, out in enumerate(results):
            assert out[case]["events"] >= len(SCHEDULE), f"{case} rank {rank}: none recorded"


def test_a_subgroup_broadcasts_from_its_own_rank_0(trained):
    world_size, results = trained
    if world_size != 4:
        pytest.skip("needs two groups of 2")
    for rank, out in enumerate(results):
        expected, _ = _reference("sgd", 2, init_seed=100 + 2 * (rank // 2))
        for k in expected:
            torch.testing.assert_close(out["group"]["final"][k], expected[k],
                                       msg=f"group of rank {rank}: {k}")


def test_bad_arguments_are_refused_before_any_communication():
    with pytest.raises(ValueError, match="variant='ring'"):
        dp.wrap(nn.Linear(2, 1), "ring")
    with pytest.raises(ValueError, match="bucket_size_mb=0"):
        dp.BucketedDDP(nn.Linear(2, 1), bucket_size_mb=0)


def _buffer_devices():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 1).double())
    # The default device (a GPU in a notebook that called torch.set_default_device, here
    # "meta") must not decide where buffers go: NCCL needs them beside the parameters.
    with torch.device("meta"):
        ddp = dp.BucketedDDP(model, bucket_size_mb=TINY_BUCKET)
    return [(str(b.device), str(ps[0].device)) for b, ps in zip(ddp._flat, ddp.buckets)]


def test_bucket_buffers_are_allocated_on_the_parameters_device():
    devices = distlab.launch(_buffer_devices, 1, timeout=60)[0]
    assert len(devices) >= 2 and all(b == p == "cpu" for b, p in devices), devices


@pytest.mark.parametrize("value", ["1", True, float("nan"), -1, 0.0])
def test_bucket_size_that_is_not_a_positive_number_is_refused_by_name(value):
    with pytest.raises(ValueError, match=rf"bucket_size_mb={value!r}.*allowed a number > 0"):
        dp.BucketedDDP(nn.Linear(2, 1), bucket_size_mb=value)   # no process group needed
    with pytest.raises(ValueError, match=rf"bucket_size_mb={value!r}"):
        dp.wrap(nn.Linear(2, 1), "bucketed", bucket_size_mb=value)


@pytest.mark.parametrize("cls", list(dp.VARIANTS.values()), ids=list(dp.VARIANTS))
def test_broadcast_buffers_must_be_a_bool(cls):
    with pytest.raises(ValueError, match=r"broadcast_buffers=1.*True or False"):
        cls(nn.Linear(2, 1), broadcast_buffers=1)


@pytest.mark.parametrize("variant", ["overlap", "bucketed"])
def test_overlapping_variants_start_all_reduces_during_backward(variant):
    from distlab.data_parallel import sync_sgd
    from distlab.problems.workloads import Workload
    config = sync_sgd.SyncSGDConfig(workload=Workload(model="mlp", num_steps=3), world_size=2,
                                    timeline_steps=2, variant=variant, bucket_size_mb=0.01)
    events = [e for out in sync_sgd.run(config, timeout=60) for e in out["timeline"]]
    backward_end = {(e["rank"], e["step"]): e["end"] for e in events if e["kind"] == "backward"}
    early = [e for e in events
             if e["kind"] == "all_reduce" and e["start"] < backward_end[e["rank"], e["step"]]]
    assert len(early) >= 2 * 2, f"{variant}: only {len(early)} all-reduces overlapped backward"
