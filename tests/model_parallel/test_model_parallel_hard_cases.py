"""Model parallelism on the hard cases real models bring, against one process.

Tensor parallelism (inside the DP x TP mesh), GPipe and 1F1B pipelines, on real gloo groups
of 1 to 4 ranks: float64 and bfloat16 weights, a stage with no parameters, frozen layers,
a parameter no forward uses, BatchNorm statistics where the split keeps them whole, sizes
that do not divide by the world size. Each run trains a few SGD steps and is compared,
weight by weight, with the unsplit model trained in this process; what cannot be right is
refused when it is built, naming the case and the alternative.

Tolerances are stated per dtype, and every comparison also checks that training moved most
weights by more than the tolerance: an untrained model fails it.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import distlab
from distlab.model_parallel import mesh as mesh_lib
from distlab.model_parallel import pipeline as pp
from distlab.model_parallel.tensor_parallel import gather_model, shard_mlp, shard_transformer
from distlab.problems.transformer import TinyTransformer
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)

IN, HIDDEN, CLASSES, STEPS = 8, 16, 4, 3
VOCAB, HEADS, CONTEXT = 11, 4, 6        # the transformer case
# (rtol, atol) per dtype: float64 to round-off; bfloat16 to about two ulps (eps = 2**-7).
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12),
             torch.bfloat16: (1.6e-2, 1e-3)}
LR = {torch.float32: 0.5, torch.float64: 0.5, torch.bfloat16: 1.0}


class Unused(nn.Module):
    """Identity with a parameter the forward never touches: its gradient stays None."""

    def __init__(self, width: int):
        super().__init__()
        self.spare = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x


def build(case: str, dtype=torch.float32) -> nn.Sequential:
    """The same small model in every process (seeded), for one hard case."""
    if case == "transformer":
        return TinyTransformer(VOCAB, HIDDEN, HEADS, 1, CONTEXT, seed=0).to(dtype)
    torch.manual_seed(0)
    L = nn.Linear
    layers = {
        "mlp": [L(IN, HIDDEN), nn.ReLU(), L(HIDDEN, HIDDEN), nn.ReLU(), L(HIDDEN, CLASSES)],
        # on 4 stages, one layer each: stages 0 and 2 have no parameters
        "parameterless": [nn.Tanh(), L(IN, HIDDEN), nn.ReLU(), L(HIDDEN, CLASSES)],
        "batchnorm": [L(IN, HIDDEN), nn.ReLU(), L(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN),
                      nn.ReLU(), L(HIDDEN, CLASSES)],
        "unused": [L(IN, HIDDEN), nn.ReLU(), L(HIDDEN, HIDDEN), Unused(HIDDEN), nn.ReLU(),
                   L(HIDDEN, CLASSES)],
    }[case.replace("frozen", "mlp")]
    if case == "frozen":     # a frozen backbone: the first two linears, a trained head
        for frozen in (layers[0], layers[2]):
            frozen.requires_grad_(False)
    return nn.Sequential(*layers).to(dtype)


def batches(case: str, batch_size: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    if case == "transformer":        # next-token ids: inputs and targets (B, T)
        return [(torch.randint(VOCAB, (batch_size, CONTEXT), generator=g),
                 torch.randint(VOCAB, (batch_size, CONTEXT), generator=g))
                for _ in range(STEPS)]
    return [(torch.randn(batch_size, IN, generator=g).to(dtype),
             torch.randint(CLASSES, (batch_size,), generator=g)) for _ in range(STEPS)]


def loss_fn(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def reference(case: str, dtype, batch_size: int) -> tuple[dict, dict]:
    """The unsplit model's state (weights, buffers) before and after STEPS full-batch steps."""
    model = build(case, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR[dtype])
    for X, y in batches(case, batch_size, dtype):
        loss_fn(model(X), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, model.state_dict()


def assert_trained_like(got: dict, case: str, dtype, batch_size: int, msg: str = ""):
    """Every tensor of ``got`` (a state_dict, or part of one) equals the reference's, and
    training moved most trainable weights and statistics by more than the tolerance."""
    rtol, atol = TOLERANCE[dtype]
    before, want = reference(case, dtype, batch_size)
    frozen = {k for k, p in build(case).named_parameters() if not p.requires_grad}
    for k, v in got.items():
        assert v.dtype == dtype or not want[k].is_floating_point(), f"{msg} {k}: {v.dtype}"
        assert_close(v, want[k], rtol=rtol, atol=atol, msg=lambda m: f"{msg} {k}: {m}")
    floats = [k for k in got if want[k].is_floating_point() and k not in frozen]
    moved = torch.cat([((want[k] - before[k]).abs() > atol + rtol * want[k].abs()).flatten()
                       for k in floats]).double().mean()
    assert moved > 0.5, (f"{msg}: training moved {moved:.0%} of the values beyond the "
                         "tolerance, too few to tell a trained model from an untrained one")


# ----------------------------------------------------------------------------------------
# Workers.
# ----------------------------------------------------------------------------------------

def pipeline_worker(case, dtype, schedule, num_microbatches, batch_size):
    """One pipeline stage per rank; returns this stage's layers' weights and buffers."""
    rank, p = dist.get_rank(), dist.get_world_size()
    model = build(case, dtype)
    layers = pp.partition(len(model), p)[rank]
    # The stage reads only the schedule from the config (its workload is never trained).
    config = pp.PipelineConfig(Workload(batch_size=batch_size), p, num_microbatches, schedule)
    stage = pp.PipelineStage(nn.Sequential(*list(model)[layers.start: layers.stop]), rank,
                             config)
    params = [q for q in stage.layers.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR[dtype]) if params else None
    for X, y in batches(case, batch_size, dtype):
        stage.train_step(X, y, loss_fn)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    return {f"{i}.{k}": v for i in layers for k, v in model[i].state_dict().items()}


def mesh_worker(case, dtype, dp, tp, batch_size):
    """DP x TP training of the case's model; returns the gathered, unsplit state_dict."""
    kind = "transformer" if case == "transformer" else "mlp"
    workload = Workload(kind, hidden=HIDDEN, num_heads=HEADS, batch_size=batch_size)
    mesh = mesh_lib.build_mesh(mesh_lib.MeshConfig(workload, dp, tp))
    model = build(case, dtype)
    if tp > 1:
        model = (shard_transformer if kind == "transformer" else shard_mlp)(model, mesh.tp_group)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR[dtype])
    for X, y in batches(case, batch_size, dtype):
        mesh_lib.train_step(model, optimizer, X, y, loss_fn, mesh)
    return gather_model(model).state_dict() if tp > 1 else model.state_dict()


def run_mesh(case, dtype, dp, tp, batch_size=12):
    results = distlab.launch(mesh_worker, dp * tp, case, dtype, dp, tp, batch_size)
    for rank, state in enumerate(results):
        assert_trained_like(state, case, dtype, batch_size, f"dp={dp} tp={tp} rank {rank}")


def run_pipeline(case, dtype, num_stages, schedule, num_microbatches=3, batch_size=10):
    results = distlab.launch(pipeline_worker, num_stages, case, dtype, schedule,
                             num_microbatches, batch_size)
    got = {k: v for stage in results for k, v in stage.items()}
    assert got.keys() == build(case).state_dict().keys()
    assert_trained_like(got, case, dtype, batch_size, f"{schedule} on {num_stages} stages")


# ----------------------------------------------------------------------------------------
# Pipeline: GPipe and 1F1B.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", pp.SCHEDULES)
def test_pipeline_trains_float64_like_the_unsplit_model(schedule):
    # 5 layers on 2 stages (3 + 2) and a batch of 10 in 3 microbatches (4, 3, 3): neither
    # divides evenly, and neither needs to.
    run_pipeline("mlp", torch.float64, 2, schedule)


@pytest.mark.parametrize("schedule", pp.SCHEDULES)
def test_pipeline_trains_bfloat16_like_the_unsplit_model(schedule):
    run_pipeline("mlp", torch.bfloat16, 3, schedule)


def test_pipeline_stages_without_parameters_pass_gradients_through():
    run_pipeline("parameterless", torch.float32, 4, "1f1b", num_microbatches=4)


def test_pipeline_with_a_frozen_first_stage_trains_the_rest():
    run_pipeline("frozen", torch.float32, 2, "gpipe")


def test_pipeline_trains_a_float64_transformer_like_the_unsplit_model():
    # Token ids (int64) enter stage 0; float64 activations (B, T, C) cross the boundaries.
    run_pipeline("transformer", torch.float64, 3, "1f1b")


def test_pipeline_on_one_rank_is_the_unsplit_model():
    run_pipeline("mlp", torch.float64, 1, "1f1b")


def test_pipeline_keeps_batchnorm_statistics_with_one_microbatch():
    run_pipeline("batchnorm", torch.float64, 3, "1f1b", num_microbatches=1)


def test_pipeline_refuses_batchnorm_split_into_microbatches():
    config = pp.PipelineConfig(Workload(batch_size=10), 2, 4)
    with pytest.raises(ValueError, match=r"stage 0 holds BatchNorm1d.*num_microbatches=4.*"
                                         r"use num_microbatches=1, or a per-example norm"):
        pp.PipelineStage(build("batchnorm")[:4], 0, config)


# ----------------------------------------------------------------------------------------
# Tensor parallel, in the DP x TP mesh.
# ----------------------------------------------------------------------------------------

def test_tensor_parallel_trains_float64_like_the_unsplit_model():
    run_mesh("mlp", torch.float64, dp=1, tp=4)


def test_tensor_parallel_splits_float64_attention_heads_like_the_unsplit_model():
    run_mesh("transformer", torch.float64, dp=1, tp=2, batch_size=4)


def test_dp_tp_mesh_trains_float64_like_the_unsplit_model():
    run_mesh("mlp", torch.float64, dp=2, tp=2)


def test_dp_tp_mesh_trains_bfloat16_like_the_unsplit_model():
    run_mesh("mlp", torch.bfloat16, dp=2, tp=2)


def test_mesh_on_one_rank_is_the_unsplit_model():
    run_mesh("mlp", torch.float64, dp=1, tp=1)


def test_dp_tp_mesh_keeps_frozen_layers_frozen():
    run_mesh("frozen", torch.float64, dp=2, tp=2)


def test_data_parallel_mesh_counts_a_missing_gradient_as_zero():
    run_mesh("unused", torch.float64, dp=2, tp=1)


def test_tensor_parallel_keeps_batchnorm_statistics_outside_the_split():
    # After the row-parallel layer every rank holds the whole activation: its statistics
    # are the unsplit model's.
    run_mesh("batchnorm", torch.float64, dp=1, tp=2)


def test_data_parallel_mesh_refuses_batchnorm():
    with pytest.raises(distlab.WorkerError, match="BatchNorm normalizes over each replica's "
                                                  "slice.*use dp=1"):
        distlab.launch(mesh_worker, 2, "batchnorm", torch.float32, 2, 1, 12)


def test_tensor_parallel_refuses_a_norm_inside_the_split():
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Linear(HIDDEN, 2))
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\) sits between the "
                                         r"column-parallel layer 0 and the row-parallel layer 2"):
        shard_mlp(model)


def test_sizes_that_do_not_split_are_refused_naming_a_size_that_does():
    with pytest.raises(ValueError, match=r"hidden=10 is not divisible by the tensor-parallel "
                                         r"degree 4.*use hidden=8 or 12"):
        mesh_lib.MeshConfig(Workload(hidden=10), dp=1, tp=4)
    with pytest.raises(ValueError, match=r"dp=4 is out of range; allowed a divisor of "
                                         r"batch_size=10"):
        mesh_lib.MeshConfig(Workload(batch_size=10), dp=4)
    with pytest.raises(ValueError, match=r"num_stages=6 is more than the model's 5 layers.*"
                                         r"use num_stages <= 5"):
        pp.PipelineConfig(Workload(depth=2), num_stages=6)


def test_a_linear_workload_is_refused_where_there_is_nothing_to_split():
    from distlab.model_parallel.mesh import MeshConfig
    from distlab.model_parallel.pipeline import PipelineConfig
    from distlab.problems.workloads import Workload
    with pytest.raises(ValueError, match="MeshConfig.workload=.*use tp=1"):
        MeshConfig(Workload(model="linear"), dp=1, tp=2)
    with pytest.raises(ValueError, match="PipelineConfig.workload=.*'linear' is one layer"):
        PipelineConfig(Workload(model="linear"), num_stages=2)


def test_tensor_parallel_refuses_a_buffer_its_rebuilt_layers_would_lose():
    model = TinyTransformer(vocab_size=5, d_model=8, num_heads=2, num_layers=1, block_size=4)
    model.blocks()[0].attn.register_buffer("mask", torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"block 0 holds the buffer 'mask' inside attention "
                                         r"or the MLP.*or use tp=1"):
        shard_transformer(model)
