"""Lab 11's model-parallel modules on the hard cases real models bring, against one process.

Expert, sequence, context and 3-D parallelism on real gloo groups of 1, 2 and 4 ranks:
float64 and bfloat16 weights, frozen weights (a router, a LayerNorm, an embedding, a
projection's bias), an embedding tied to the head, registered buffers, and experts that no
token reaches (a zero gradient, never None, so AdamW's weight decay and state match). Each
launch trains a few steps of several cases and is compared, weight by weight and (AdamW)
state by state, with the same model trained in this process; what cannot be right is
refused when it is built, naming the field.

Every comparison also checks that training moved most trainable weights by more than the
tolerance: an untrained model fails it.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import distlab
from distlab.communication import all_to_all as a2a
from distlab.model_parallel import context_parallel as cp
from distlab.model_parallel import crossover as xo
from distlab.model_parallel import dtensor_tp, three_d_plan, ulysses
from distlab.model_parallel import experts as moe_lib
from distlab.model_parallel import ring_attention as ra
from distlab.model_parallel import expert_parallel as ep
from distlab.model_parallel import sequence_parallel as sp
from distlab.model_parallel import three_d
from distlab.model_parallel.experts import MoE
from distlab.model_parallel.pipeline import PipelineStage
from distlab.model_parallel.ring_attention import shard_sequence
from distlab.model_parallel.tensor_parallel import gather_model
from distlab.problems.transformer import CausalSelfAttention, TinyTransformer, lm_loss
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(120)

STEPS = 3
# (rtol, atol) per dtype: float64 to round-off; bfloat16 to a few ulps (eps = 2**-7).
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12),
             torch.bfloat16: (3e-2, 1e-2)}


def adamw(params):
    """AdamW with weight decay: a parameter given a zero gradient still decays and counts a
    step, one given None does neither, so a zero-versus-None mistake shows in the weights.
    A large eps: the keys' bias has a zero gradient in exact arithmetic (softmax ignores a
    shift), and Adam would blow its round-off up to full steps of lr."""
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1, eps=1e-3)


def optimizer_state(optimizer, names: dict) -> dict:
    """``{"name.key": tensor}`` of every state entry, named through ``names`` (id -> name)."""
    return {f"{names[id(p)]}.{k}": torch.as_tensor(v).clone()
            for p, state in optimizer.state.items() for k, v in state.items()}


def assert_trained_like(got: dict, want: dict, before: dict, dtype, msg: str = "",
                        frozen=()):
    """Every tensor of ``got`` equals ``want``'s; frozen ones equal ``before``; training
    moved most other values of ``want`` beyond the tolerance."""
    rtol, atol = TOLERANCE[dtype]
    assert got.keys() == want.keys(), f"{msg}: {sorted(got)} != {sorted(want)}"
    for k, v in got.items():
        assert_close(v, want[k], rtol=rtol, atol=atol, msg=lambda m: f"{msg} {k}: {m}")
        if k in frozen:
            assert torch.equal(v, before[k]), f"{msg} {k}: a frozen weight moved"
    moving = [k for k in want if k not in frozen and k in before]
    moved = torch.cat([((want[k] - before[k]).abs() > atol + rtol * want[k].abs()).flatten()
                       for k in moving]).double().mean()
    assert moved > 0.5, f"{msg}: training moved only {moved:.0%} of the values"


def train_here(model: nn.Module, optimizer, steps) -> dict:
    """The single-process reference: ``loss()`` of each step's forward, backward, step;
    returns the state before training."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for loss in steps:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad()
    return before


@pytest.fixture(scope="module")
def one_rank():
    """Every module's own ``train`` on a group of one rank, in one launch."""
    return distlab.launch(train_everything, 1, ONE_RANK)[0]


# ----------------------------------------------------------------------------------------
# Expert parallelism: a frozen router, starved experts, dropped tokens, buffers, dtypes.
# ----------------------------------------------------------------------------------------

EP_CASES = {  # name: dtype, router frozen, experts no token picks (rank 1 holds 2 and 3)
    "float64": (torch.float64, False, (3,)),
    "frozen_router": (torch.float64, True, (3,)),
    "bfloat16": (torch.bfloat16, False, (3,)),
    # Rank 1's experts get nothing: its whole expert compute has zero gradients; every
    # token picks experts 0 and 1, 4 places each for 8 tokens: half the tokens lose both.
    "rank_1_starved": (torch.float64, False, (2, 3)),
}


def build_moe(dtype, freeze_router: bool, starved) -> MoE:
    """Top-2 of 4 experts, capacity 4 of 8 tokens' 16 choices (so some are dropped); the
    tokens are positive and the router's rows of ``starved`` very negative: no token picks
    those. The router and expert 0 carry a buffer, which must travel with them."""
    torch.manual_seed(0)
    moe = MoE(8, 8, num_experts=4, top_k=2, capacity_factor=1.0).to(dtype)
    with torch.no_grad():
        moe.router.weight[list(starved)] = -4.0
    moe.router.requires_grad_(not freeze_router)
    moe.router.register_buffer("temperature", torch.tensor(1.5, dtype=dtype))
    moe.experts[0].register_buffer("calls", torch.arange(3, dtype=dtype))
    return moe


def moe_batches(dtype, p: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(8 * p, 8, generator=g).to(dtype),
             torch.randn(8 * p, 8, generator=g).to(dtype)) for _ in range(STEPS)]


def moe_loss(out, X, y):
    return F.mse_loss(X + out.output, y) + 0.01 * out.aux_loss


def expert_parallel_worker(cases):
    rank, p = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, (dtype, freeze, starved) in cases.items():
        layer = ep.ExpertParallelMoE(build_moe(dtype, freeze, starved), all_to_all="pairwise")
        local = len(layer.experts)   # name the weights as the unsplit layer does
        names = {k: k if k.startswith("router") else
                 f"experts.{rank * local + int(k.split('.')[1])}.{k.split('.', 2)[2]}"
                 for k in layer.state_dict()}
        mine = [e for e in range(rank * local, (rank + 1) * local) if e in starved]
        optimizer = adamw(layer.parameters())
        starved_grads, all_dropped = [], 0
        for X, y in moe_batches(dtype, p):
            X, y = X.chunk(p)[rank], y.chunk(p)[rank]                     # (T, d): mine
            out = layer(X)
            moe_loss(out, X, y).backward()
            layer.finish_gradient_synchronization()
            starved_grads += [q.grad for e in mine
                              for q in layer.experts[e - rank * local].parameters()]
            all_dropped += int((~out.kept).all(dim=1).sum())
            optimizer.step()
            optimizer.zero_grad()
        ids = {id(q): names[k] for k, q in layer.named_parameters()}
        results[name] = {"state": {names[k]: v for k, v in layer.state_dict().items()},
                         "optimizer": optimizer_state(optimizer, ids),
                         "starved_grads": starved_grads, "all_dropped": all_dropped}
    return results


def moe_reference(dtype, freeze, starved, p):
    moe = build_moe(dtype, freeze, starved)
    optimizer = adamw(moe.parameters())
    before = train_here(moe, optimizer, [lambda X=X, y=y: moe_loss(moe(X, groups=p), X, y)
                                         for X, y in moe_batches(dtype, p)])
    ids = {id(q): k for k, q in moe.named_parameters()}
    return before, moe.state_dict(), optimizer_state(optimizer, ids)


@pytest.fixture(scope="module")
def expert_parallel():
    return distlab.launch(expert_parallel_worker, 2, EP_CASES)


@pytest.mark.parametrize("case", EP_CASES)
def test_expert_parallel_weights_buffers_and_adamw_state_equal_one_process(expert_parallel,
                                                                           case):
    dtype, freeze, starved = EP_CASES[case]
    before, want, want_state = moe_reference(dtype, freeze, starved, 2)
    got = {k: v for r in expert_parallel for k, v in r[case]["state"].items()}
    got_state = {k: v for r in expert_parallel for k, v in r[case]["optimizer"].items()}
    frozen = {"router.weight"} if freeze else set()
    assert_trained_like(got, want, before, dtype, case, frozen)
    rtol, atol = TOLERANCE[dtype]
    assert got_state.keys() == want_state.keys(), case
    for k, v in got_state.items():
        assert_close(v, want_state[k], rtol=rtol, atol=atol, msg=lambda m: f"{case} {k}: {m}")


def test_experts_no_token_reaches_get_zero_gradients_not_none(expert_parallel):
    for case, (_, _, starved) in EP_CASES.items():
        grads = [g for r in expert_parallel for g in r[case]["starved_grads"]]
        assert len(grads) == 4 * len(starved) * STEPS, case     # 4 tensors per expert
        for g in grads:
            assert g is not None and not g.any(), f"{case}: {g}"


def test_tokens_whose_every_choice_is_dropped_occur_on_every_rank(expert_parallel):
    # With rank 1's experts starved, 16 choices per rank compete for 8 places: some tokens
    # lose both (output 0), which the equality with one process above then covers.
    assert all(r["rank_1_starved"]["all_dropped"] > 0 for r in expert_parallel)


def test_expert_parallel_on_one_rank_is_the_reference(one_rank):
    assert_close(one_rank["expert_parallel"]["losses"], ep.reference(ONE_RANK["ep"])["losses"])


# ----------------------------------------------------------------------------------------
# Sequence parallelism: tied embedding and head, frozen LayerNorm and embedding, buffers.
# ----------------------------------------------------------------------------------------

VOCAB, D, HEADS, T = 11, 16, 4, 8
SP_CASES = {"float64_tied": (torch.float64, True, False),
            "float64_frozen": (torch.float64, False, True),
            "bfloat16": (torch.bfloat16, False, False)}
SP_FROZEN = ("0.pos.weight", "1.ln1.weight", "1.ln1.bias")


def build_transformer(dtype, tied: bool, frozen: bool) -> TinyTransformer:
    """Two blocks; ``tied``: the head's projection is the token embedding (GPT-2's tying);
    ``frozen``: the position embedding and block 0's first LayerNorm do not train. A buffer
    on the head travels with it."""
    model = TinyTransformer(VOCAB, D, HEADS, 2, block_size=T, seed=3).to(dtype)
    if tied:
        model[-1].out.weight = model[0].tok.weight
    if frozen:
        for name, q in model.named_parameters():
            q.requires_grad_(name not in SP_FROZEN)
    model[-1].register_buffer("temperature", torch.full((VOCAB,), 2.0, dtype=dtype))
    return model


def lm_batches(batch_size: int = 4):
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(VOCAB, (batch_size, T), generator=g),
             torch.randint(VOCAB, (batch_size, T), generator=g)) for _ in range(STEPS)]


def sequence_parallel_worker(cases):
    results = {}
    for name, (dtype, tied, frozen) in cases.items():
        model = sp.SequenceParallelTransformer.from_transformer(
            build_transformer(dtype, tied, frozen))
        optimizer = adamw(model.parameters())
        for X, y in lm_batches():
            model.loss(model(X), y).backward()
            model.finish_gradient_synchronization()
            optimizer.step()
            optimizer.zero_grad()
        results[name] = {"state": gather_model(model).state_dict(),
                         "tied": model[-1].out.weight is model[0].tok.weight}
    return results


@pytest.fixture(scope="module")
def sequence_parallel():
    return distlab.launch(sequence_parallel_worker, 2, SP_CASES)


@pytest.mark.parametrize("case", SP_CASES)
def test_sequence_parallel_trains_like_one_process(sequence_parallel, case):
    dtype, tied, frozen = SP_CASES[case]
    model = build_transformer(dtype, tied, frozen)
    before = train_here(model, adamw(model.parameters()),
                        [lambda X=X, y=y: lm_loss(model(X), y) for X, y in lm_batches()])
    for rank, r in enumerate(sequence_parallel):
        assert r[case]["tied"] == tied, f"{case} rank {rank}: tying not kept"
        assert_trained_like(r[case]["state"], model.state_dict(), before, dtype,
                            f"{case} rank {rank}", SP_FROZEN if frozen else ())


def test_sequence_parallel_refuses_a_buffer_its_blocks_would_drop():
    model = TinyTransformer(VOCAB, D, HEADS, 1, block_size=T)
    model[1].attn.register_buffer("mask", torch.ones(T, T))
    with pytest.raises(ValueError, match=r"block holds the buffer 'attn.mask'.*keep buffers "
                                         r"in the embedding or the head"):
        sp.SequenceParallelBlock.from_block(model[1])


def test_sequence_parallel_on_one_rank_is_the_reference(one_rank):
    assert_close(one_rank["sequence_parallel"]["losses"], sp.reference(ONE_RANK["sp"]))


# ----------------------------------------------------------------------------------------
# Context parallelism: ring (both layouts) and Ulysses, float64, a frozen bias, a buffer.
# ----------------------------------------------------------------------------------------

CP_CASES = {"ring_float64": ("ring", "contiguous", torch.float64),
            "ring_zigzag_float64": ("ring", "zigzag", torch.float64),
            "ulysses_float64": ("ulysses", "contiguous", torch.float64),
            "ring_bfloat16": ("ring", "contiguous", torch.bfloat16),
            "ulysses_bfloat16": ("ulysses", "contiguous", torch.bfloat16)}
CP_FROZEN = ("proj.bias",)


def build_attention(dtype) -> CausalSelfAttention:
    torch.manual_seed(0)
    layer = CausalSelfAttention(8, 2).to(dtype)
    layer.proj.bias.requires_grad_(False)
    layer.register_buffer("scale", torch.tensor(0.5, dtype=dtype))
    return layer


def attention_batch(dtype):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 16, 8, generator=g).to(dtype) for _ in range(2)]   # (B, T, C)


def context_parallel_worker(cases):
    rank, p = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, (method, layout, dtype) in cases.items():
        layer = cp.ContextParallelAttention(build_attention(dtype), method, True, layout)
        X, Y = (shard_sequence(t, rank, p, layout) for t in attention_batch(dtype))
        optimizer = adamw(layer.parameters())
        for _ in range(STEPS):
            F.mse_loss(layer(X), Y).backward()
            layer.finish_gradient_synchronization()
            optimizer.step()
            optimizer.zero_grad()
        results[name] = layer.layer.state_dict()
    return results


@pytest.fixture(scope="module")
def context_parallel():
    return distlab.launch(context_parallel_worker, 2, CP_CASES)


@pytest.mark.parametrize("case", CP_CASES)
def test_context_parallel_trains_like_one_process(context_parallel, case):
    dtype = CP_CASES[case][2]
    layer = cp.ContextParallelAttention(build_attention(dtype), "full", True)
    X, Y = attention_batch(dtype)
    before = train_here(layer.layer, adamw(layer.parameters()),
                        [lambda: F.mse_loss(layer(X), Y)] * STEPS)
    for rank, got in enumerate(context_parallel):
        assert_trained_like(got[case], layer.layer.state_dict(), before, dtype,
                            f"{case} rank {rank}", CP_FROZEN + ("scale",))


@pytest.mark.parametrize("method", cp.METHODS)
def test_context_parallel_on_one_rank_is_the_reference(one_rank, method):
    config = ONE_RANK[f"cp_{method}"]
    got, want = one_rank[f"context_parallel_{method}"], cp.reference(config)
    assert_close(got["losses"], want["losses"])
    assert_close(got["weights"], want["weights"])


# ----------------------------------------------------------------------------------------
# 3-D: dp=2, tp=1, pp=2 on 4 ranks, float64 and bfloat16, a frozen token embedding,
# SGD with momentum and weight decay.
# ----------------------------------------------------------------------------------------

WORKLOAD = Workload("transformer", hidden=8, num_heads=2, depth=2, block_size=8,
                    batch_size=4, num_steps=STEPS, lr=0.5, momentum=0.9, weight_decay=0.1)
THREE_D = three_d.ThreeDConfig(WORKLOAD, dp=2, tp=1, pp=2, num_microbatches=2)
THREE_D_FROZEN = ("0.tok.weight",)


def freeze(model: nn.Module, dtype) -> nn.Module:
    """In ``dtype``, the token embedding frozen (a pretrained vocabulary)."""
    model = model.to(dtype)
    for name, q in model.named_parameters():
        q.requires_grad_(name not in THREE_D_FROZEN)
    return model


def three_d_worker(config, dtypes):
    grid = three_d.build_grid(config)
    states = {}
    for dtype in dtypes:
        layers = freeze(three_d.stage_layers(config.workload, grid), dtype)
        stage = PipelineStage(layers, grid.pp_rank, config.pipeline, grid.pp_group)
        optimizer = config.workload.optimizer(layers.parameters())
        for X, y in config.workload.batches():
            three_d.train_step(stage, optimizer, X, y, config.workload.loss, grid)
        states[dtype] = gather_model(layers).state_dict()
    return states


@pytest.fixture(scope="module")
def three_d_ranks():
    config = dataclasses.replace(THREE_D, workload=WORKLOAD.loaded())
    return distlab.launch(three_d_worker, config.world_size, config,
                          [torch.float64, torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_three_d_trains_with_a_frozen_embedding_like_one_process(three_d_ranks, dtype):
    model = freeze(WORKLOAD.build_model(), dtype)
    before = train_here(model, WORKLOAD.optimizer(model.parameters()),
                        [lambda X=X, y=y: WORKLOAD.loss(model(X), y)
                         for X, y in WORKLOAD.batches()])
    got = {k: v for r in three_d_ranks for k, v in r[dtype].items()}
    for rank, r in enumerate(three_d_ranks):   # the dp replicas agree
        for k, v in r[dtype].items():
            assert_close(v, got[k], rtol=0, atol=0, msg=f"rank {rank} {k}")
    assert_trained_like(got, model.state_dict(), before, dtype, f"3-D {dtype}", THREE_D_FROZEN)


def test_three_d_on_one_rank_is_the_reference(one_rank):
    want = three_d.reference(ONE_RANK["three_d"])
    assert_close(one_rank["three_d"]["losses"], want["losses"])
    assert_close(one_rank["three_d"]["state"], dict(want["state"]))


# ----------------------------------------------------------------------------------------
# One rank, every module's own train().
# ----------------------------------------------------------------------------------------

ONE_RANK = {
    "ep": ep.ExpertParallelConfig(world_size=1, num_experts=2, top_k=1, tokens=8,
                                  num_steps=2),
    "sp": sp.SequenceParallelConfig(dataclasses.replace(sp.TINY, num_steps=2).loaded(),
                                    degree=1),
    "cp_ring": cp.ContextParallelConfig("ring", world_size=1, seq_len=8, num_steps=2),
    "cp_ulysses": cp.ContextParallelConfig("ulysses", world_size=1, seq_len=8, num_steps=2),
    "three_d": three_d.ThreeDConfig(WORKLOAD.loaded(), dp=1, tp=1, pp=1, num_microbatches=1),
}


def train_everything(configs):
    return {"expert_parallel": ep.train(configs["ep"]),
            "sequence_parallel": sp.train(configs["sp"]),
            "context_parallel_ring": cp.train(configs["cp_ring"]),
            "context_parallel_ulysses": cp.train(configs["cp_ulysses"]),
            "three_d": three_d.train(configs["three_d"])}


# ----------------------------------------------------------------------------------------
# Bad input, refused by name before any process starts.
# ----------------------------------------------------------------------------------------

TINY = Workload("transformer", hidden=16, num_heads=4, depth=2, block_size=8, batch_size=4)
REFUSED = {
    "experts": [
        (lambda: MoE(True, 4, 2), "d_model=True"),
        (lambda: MoE(4, 0, 2), "expert_hidden=0"),
        (lambda: MoE(4, 4, 2, top_k=3), "top_k=3"),
        (lambda: MoE(4, 4, 2, capacity_factor=True), "capacity_factor=True"),
        (lambda: moe_lib.capacity(-4, 2, 1, 1.0), "num_tokens=-4"),
        (lambda: moe_lib.capacity(True, 2, 1, 1.0), "num_tokens=True"),
    ],
    "expert_parallel": [
        (lambda: ep.ExpertParallelConfig(tokens=True), "tokens=True"),
        (lambda: ep.ExpertParallelConfig(world_size=0), "world_size=0"),
        (lambda: ep.ExpertParallelConfig(num_experts=3), "num_experts=3"),
        (lambda: ep.ExpertParallelConfig(capacity_factor=-1.0), "capacity_factor=-1.0"),
        (lambda: ep.ExpertParallelConfig(lr=True), "lr=True"),
        (lambda: ep.ExpertParallelConfig(all_to_all=["torch"]), r"all_to_all=\['torch'\]"),
    ],
    "sequence_parallel": [
        (lambda: sp.SequenceParallelConfig(degree=True), "degree=True"),
        (lambda: sp.SequenceParallelConfig(degree=0), "degree=0"),
        (lambda: sp.SequenceParallelConfig(regather=1), "regather=1"),
        (lambda: sp.SequenceParallelConfig(Workload("mlp")), "workload="),
    ],
    "context_parallel": [
        (lambda: cp.ContextParallelConfig(heads=True), "heads=True"),
        (lambda: cp.ContextParallelConfig(seq_len=-8), "seq_len=-8"),
        (lambda: cp.ContextParallelConfig(lr=True), "lr=True"),
        (lambda: cp.ContextParallelConfig(method=["ring"]), r"method=\['ring'\]"),
        (lambda: cp.ContextParallelConfig(causal=1), "causal=1"),
        (lambda: cp.ContextParallelAttention(CausalSelfAttention(8, 2), "rign", True),
         "method='rign'"),
        (lambda: cp.predicted_scores_bytes("ring", True, 2, 2), "seq_len=True"),
        (lambda: cp.predicted_scores_bytes("ring", 8, 0, 2), "world_size=0"),
        (lambda: cp.predicted_bytes("ring"), "config='ring'"),
        (lambda: cp.memory_sweep([8], True), "world_size=True"),
    ],
    "ring_attention_and_ulysses": [
        (lambda: ra.chunk_ids(0, True), "world_size=True"),
        (lambda: ra.work_per_rank(2, 1), "causal=1"),
        (lambda: ra.shard_sequence(torch.zeros(1, 4), 0, 0), "world_size=0"),
        (lambda: ra.ring_attention(*[torch.zeros(1, 1, 2, 2)] * 3, causal=1), "causal=1"),
        (lambda: ulysses.check_heads(True, 1), "num_heads=True"),
        (lambda: ulysses.check_heads(2, 0), "world_size=0"),
    ],
    "three_d": [
        (lambda: three_d.ThreeDConfig(dp=True), "dp=True"),
        (lambda: three_d.ThreeDConfig(num_microbatches=0), "num_microbatches=0"),
        (lambda: three_d.ThreeDConfig(schedule=["1f1b"]), "schedule="),
        (lambda: three_d_plan.configurations(True), "num_steps=True"),
        (lambda: three_d_plan.predict_step_time("x"), "config='x'"),
        (lambda: three_d_plan.measured_step_time("x"), "results='x'"),
        (lambda: three_d_plan.compare([]), r"configs=\[\]"),
        (lambda: three_d_plan.compare([three_d.ThreeDConfig()], fit=object(), flops=-1.0),
         "flops=-1.0"),
    ],
    "crossover_and_dtensor": [
        (lambda: xo.saved_activation_bytes(TINY, 0, True), "degree=0"),
        (lambda: xo.saved_activation_bytes(TINY, 2, 1), "sequence_parallel=1"),
        (lambda: xo.saved_activation_bytes("x", 2, True), "workload='x'"),
        (lambda: xo.paper_activation_bytes(8, 1, 16, 4, True, True), "t=True"),
        (lambda: xo.volumes(TINY, 2, itemsize=True), "itemsize=True"),
        (lambda: xo.block_crossover(True), "d_model=True"),
        (lambda: dtensor_tp.compare(TINY, True), "world_size=True"),
        (lambda: dtensor_tp.compare(Workload("mlp"), 2), "workload="),
    ],
    "all_to_all": [
        (lambda: a2a.model_bytes(True, 2), "nbytes=True"),
        (lambda: a2a.model_bytes(8, 0), "world_size=0"),
        (lambda: a2a.compare(2), "world_sizes=2"),
        (lambda: a2a.compare((True,)), r"world_sizes=\(True,\)"),
        (lambda: a2a.compare(chunk_numel=0), "chunk_numel=0"),
    ],
}


@pytest.mark.parametrize("module", REFUSED)
def test_bad_numbers_and_types_are_refused_by_name_before_any_process_starts(module):
    for call, name in REFUSED[module]:
        with pytest.raises(ValueError, match=rf"{name}.* is out of range; allowed"):
            call()


@pytest.mark.parametrize("call", [
    lambda: ep.ExpertParallelMoE("a MoE"), lambda: three_d.mesh_table("a config"),
    lambda: sp.SequenceParallelTransformer.from_transformer(nn.Linear(2, 2))])
def test_layers_refuse_what_they_cannot_split_by_type(call):
    with pytest.raises(TypeError, match="must be a"):
        call()
