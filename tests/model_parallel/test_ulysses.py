"""DeepSpeed-Ulysses against full attention: outputs and gradients, and its training."""
import pytest
import torch
from torch.testing import assert_close

import distlab
from distlab.model_parallel import context_parallel as cp
from distlab.model_parallel import ring_attention as ra
from distlab.model_parallel import ulysses

pytestmark = pytest.mark.timeout(120)


def check_ulysses_equals_full_attention():
    """Runs on every rank: its sequence shard of the output and of dQ, dK, dV."""
    import torch.distributed as dist
    r, p = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    shard = lambda t: ra.shard_sequence(t.detach(), r, p, dim=2)
    cases = [(dtype, causal, exchange) for dtype in (torch.float64, torch.float32)
             for causal in (False, True) for exchange in ("torch", "pairwise")]
    for dtype, causal, exchange in cases:
        q, k, v = (torch.randn(2, 2 * p, 3 * p, 4, dtype=dtype, requires_grad=True)
                   for _ in range(3))                          # (B, H, T, d)
        y = ra.full_attention(q, k, v, causal)
        grad = torch.randn_like(y)
        y.backward(grad)
        mine = [shard(t).requires_grad_() for t in (q, k, v)]
        y_u = ulysses.ulysses_attention(*mine, causal=causal, all_to_all=exchange)
        y_u.backward(shard(grad))
        case = f"{dtype}, causal={causal}, all_to_all={exchange}"
        assert_close(y_u, shard(y), msg=f"output, {case}")
        for name, local, full in zip("qkv", mine, (q, k, v)):
            assert_close(local.grad, shard(full.grad), msg=f"d{name}, {case}")
    # Rank r gets heads 2r, 2r+1 of the whole sequence; the reverse all-to-all undoes it.
    full = torch.randn(2, 2 * p, 3 * p, 4)                         # (B, H, T, d), same everywhere
    heads = ulysses.sequence_to_heads(shard(full))                 # (B, H/p, T, d)
    assert_close(heads, full[:, 2 * r:2 * r + 2])
    assert_close(ulysses.heads_to_sequence(heads), shard(full))
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_ulysses_equals_full_attention_outputs_and_gradients(world_size):
    assert distlab.launch(check_ulysses_equals_full_attention, world_size) == [True] * world_size


def test_heads_not_divisible_by_the_ranks_are_refused_by_name():
    with pytest.raises(ValueError, match=r"num_heads=3 is not divisible .* degree 2"):
        ulysses.check_heads(3, 2)
    with pytest.raises(ValueError, match=r"num_heads=3 is not divisible"):
        cp.ContextParallelConfig(method="ulysses", heads=3, world_size=2)
    with pytest.raises(ValueError, match=r"layout='zigzag' is out of range"):
        cp.ContextParallelConfig(method="ulysses", layout="zigzag")
    with pytest.raises(ValueError, match=r"all_to_all='ring' is out of range"):
        cp.ContextParallelConfig(method="ulysses", all_to_all="ring")


def test_ulysses_context_parallel_training_equals_one_process_and_moves_the_predicted_bytes():
    configs = [cp.ContextParallelConfig(method="ulysses", causal=causal, all_to_all=exchange,
                                        num_steps=2)
               for causal, exchange in ((True, "torch"), (False, "pairwise"))]
    results = distlab.launch(lambda: [cp.train(c) for c in configs], 2)
    for i, config in enumerate(configs):
        want = cp.reference(config)
        for rank in results:
            got = rank[i]
            assert_close(got["losses"], want["losses"])
            for name, w in want["weights"].items():
                assert_close(got["weights"][name], w, msg=name)
            # 8 all-to-alls a step, each (p-1)/p of B·(T/p)·H·d float32 values.
            block = 2 * 8 * 8 * 4                      # B·(T/p)·H·d float32 values
            assert got["bytes_sent"] == got["model_bytes"] == 8 * block // 2
