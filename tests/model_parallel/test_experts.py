"""Expert parallelism equals the single-process mixture of experts on the union of the tokens.

One launch per world size: every rank runs each case's forward and backward on its own
tokens (a random linear functional of the output plus the auxiliary loss, so every output
value carries its own gradient), then trains; the parent compares with
:class:`distlab.model_parallel.experts.MoE` over all ranks' tokens, one routing group per
rank, with the same weights.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import distlab
from distlab import comm
from distlab.model_parallel import expert_parallel as ep
from distlab.model_parallel.experts import MoE, capacity

pytestmark = pytest.mark.timeout(180)

BASE = ep.ExpertParallelConfig(world_size=2, num_experts=4, d_model=8, expert_hidden=8,
                               tokens=12, num_steps=2)
CASES = {
    "top1": dataclasses.replace(BASE, top_k=1),
    "top2": dataclasses.replace(BASE, top_k=2),
    "top1_torch": dataclasses.replace(BASE, top_k=1, all_to_all="torch"),
    "top2_torch": dataclasses.replace(BASE, top_k=2, all_to_all="torch"),
    "drops": dataclasses.replace(BASE, top_k=2, capacity_factor=0.5),
}
FOUR = {"top2_4ranks": dataclasses.replace(BASE, world_size=4, num_experts=8, top_k=2)}


def tokens_and_weights(config):
    """The union of the ranks' tokens (pT, d) and the loss's weights on the outputs."""
    g = torch.Generator().manual_seed(7)
    shape = (config.world_size * config.tokens, config.d_model)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def forward_backward(layer, x, r, groups=1):
    """The layer on tokens ``x``; backward of ``(output * r).sum()`` plus the auxiliary
    loss of every group (the reference's is their mean); returns x's gradient too."""
    x = x.clone().requires_grad_()
    out = layer(x) if groups == 1 else layer(x, groups=groups)
    ((out.output * r).sum() + groups * out.aux_loss).backward()
    return out, x.grad


def on_rank(cases):
    rank, p = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, config in cases.items():
        layer = ep.ExpertParallelMoE(ep.build_moe(config), None, config.all_to_all)
        X, R = tokens_and_weights(config)
        comm.ledger().reset()
        out, x_grad = forward_backward(layer, X.chunk(p)[rank], R.chunk(p)[rank])
        router_grad = layer.router.weight.grad.clone()
        comm.all_reduce(router_grad)              # the global loss is the sum of the ranks'
        results[name] = dict(
            output=out.output.detach(), x_grad=x_grad, router_grad=router_grad,
            expert_grads=[[q.grad for q in e.parameters()] for e in layer.experts],
            experts=out.experts, kept=out.kept, aux=out.aux_loss.detach(),
            sent=comm.ledger().by_op(), buffer=layer.buffer_bytes(config.tokens, config.d_model),
            train=ep.train(config))
    return results


def reference_case(config):
    moe = ep.build_moe(config)
    X, R = tokens_and_weights(config)
    out, x_grad = forward_backward(moe, X, R, groups=config.world_size)
    return moe, out, x_grad


@pytest.fixture(scope="module")
def two_ranks():
    return distlab.launch(on_rank, 2, CASES, timeout=150)


@pytest.fixture(scope="module")
def four_ranks():
    return distlab.launch(on_rank, 4, FOUR, timeout=150)


def check_equals_reference(name, config, results):
    local = config.num_experts // config.world_size
    moe, out, x_grad = reference_case(config)
    got = lambda key: torch.cat([r[name][key] for r in results])
    assert torch.equal(got("experts"), out.experts), name
    assert torch.equal(got("kept"), out.kept), name
    assert_close(got("output"), out.output.detach(), msg=name)
    assert_close(got("x_grad"), x_grad, msg=name)
    assert_close(torch.stack([r[name]["aux"] for r in results]).mean(), out.aux_loss.detach())
    for rank, r in enumerate(results):
        assert_close(r[name]["router_grad"], moe.router.weight.grad, msg=f"{name} rank {rank}")
        for i, grads in enumerate(r[name]["expert_grads"]):
            want = [q.grad for q in moe.experts[rank * local + i].parameters()]
            for g, w in zip(grads, want):   # an expert no token reached: zeros in both
                assert_close(g, w, msg=f"{name} rank {rank} expert {rank * local + i}")


@pytest.mark.parametrize("name", ["top1", "top2"])
def test_outputs_and_gradients_match_the_single_process_moe_on_two_ranks(two_ranks, name):
    check_equals_reference(name, CASES[name], two_ranks)


def test_outputs_and_gradients_match_the_single_process_moe_on_four_ranks(four_ranks):
    check_equals_reference("top2_4ranks", FOUR["top2_4ranks"], four_ranks)


def test_tokens_over_capacity_are_dropped_as_in_the_reference(two_ranks):
    config = CASES["drops"]
    check_equals_reference("drops", config, two_ranks)
    kept = torch.cat([r["drops"]["kept"] for r in two_ranks])
    assert not kept.all(), "capacity 0.5 must drop choices"
    fully_dropped = ~kept.any(dim=1)
    assert fully_dropped.any(), "some token must lose both choices"
    output = torch.cat([r["drops"]["output"] for r in two_ranks])
    assert (output[fully_dropped] == 0).all(), "a fully dropped token's output is zero"


@pytest.mark.parametrize("k", [1, 2])
def test_pairwise_and_torch_all_to_all_give_the_same_result(two_ranks, k):
    for r in two_ranks:
        mine, theirs = r[f"top{k}"], r[f"top{k}_torch"]
        for key in ("output", "x_grad", "router_grad"):
            assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
        assert mine["train"]["losses"] == theirs["train"]["losses"]
        assert "send" in mine["sent"] and "all_to_all" in theirs["sent"]


@pytest.mark.parametrize("results,names", [("two_ranks", list(CASES)),
                                           ("four_ranks", list(FOUR))])
def test_training_matches_the_reference_and_counts_the_formulas_bytes(request, results,
                                                                       names):
    results = request.getfixturevalue(results)
    configs = {**CASES, **FOUR}
    for name in names:
        config, p = configs[name], configs[name].world_size
        want = ep.reference(config)
        n = config.num_experts * capacity(config.tokens, config.num_experts, config.top_k,
                                          config.capacity_factor) * config.d_model * 4
        for r in results:
            assert r[name]["buffer"] == n
            assert_close(torch.tensor(r[name]["train"]["losses"]), torch.tensor(want["losses"]),
                         msg=name)
            # forward and backward of one step: 4 all-to-alls of (p-1)/p·n bytes each
            sent = sum(r[name]["sent"][o]["bytes_sent"] for o in ("send", "all_to_all")
                       if o in r[name]["sent"])
            assert sent == 4 * ep.model_bytes(n, p) == 4 * (p - 1) * n // p, name
            t = r[name]["train"]
            assert t["bytes_sent"] == t["model_bytes"] == 3 * config.num_steps * (p - 1) * n // p
        for kind in ("kept", "dropped"):
            assert [sum(c) for c in zip(*(r[name]["train"][kind] for r in results))] \
                == want[kind], (name, kind)


def test_bad_configs_are_refused_by_name_before_launch():
    with pytest.raises(ValueError, match="num_experts=6 is out of range; allowed a multiple "
                                         "of world_size=4"):
        ep.ExpertParallelConfig(world_size=4, num_experts=6)
    with pytest.raises(ValueError, match="top_k=2 is out of range; allowed 1 or 2, and at "
                                         "most num_experts=1"):
        ep.ExpertParallelConfig(world_size=1, num_experts=1, top_k=2)
    with pytest.raises(ValueError, match="top_k=3"):
        ep.ExpertParallelConfig(num_experts=4, top_k=3)
    for cf in (0, -1.0, True):
        with pytest.raises(ValueError, match=f"capacity_factor={cf!r} is out of range"):
            ep.ExpertParallelConfig(capacity_factor=cf)
    with pytest.raises(ValueError, match="all_to_all='ring'"):
        ep.ExpertParallelConfig(all_to_all="ring")
    with pytest.raises(ValueError, match="capacity_factor=0"):
        MoE(8, 8, 4, top_k=1, capacity_factor=0)
