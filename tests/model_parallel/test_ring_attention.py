"""Ring attention against full attention: outputs and gradients, causal and not, both layouts;
the context-parallel training it drives, and its memory per rank."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import distlab
from distlab.model_parallel import context_parallel as cp
from distlab.model_parallel import ring_attention as ra

pytestmark = pytest.mark.timeout(120)


def check_ring_equals_full_attention():
    """Runs on every rank: each case's shard of the output and of dQ, dK, dV."""
    import torch.distributed as dist
    r, p = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        for causal in (False, True):
            for layout in ra.LAYOUTS:
                q, k, v = (torch.randn(2, 3, 4 * p, 5, dtype=dtype, requires_grad=True)
                           for _ in range(3))                      # (B, H, T, d), 3 heads
                y = ra.full_attention(q, k, v, causal)
                grad = torch.randn_like(y)
                y.backward(grad)
                shard = lambda t: ra.shard_sequence(t.detach(), r, p, layout, dim=2)
                mine = [shard(t).requires_grad_() for t in (q, k, v)]
                y_ring = ra.ring_attention(*mine, causal=causal, layout=layout)
                y_ring.backward(shard(grad))
                case = f"{dtype}, causal={causal}, layout={layout}"
                assert_close(y_ring, shard(y), msg=f"output, {case}")
                for name, local, full in zip("qkv", mine, (q, k, v)):
                    assert_close(local.grad, shard(full.grad), msg=f"d{name}, {case}")
    return True


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ring_attention_equals_full_attention_outputs_and_gradients(world_size):
    assert distlab.launch(check_ring_equals_full_attention, world_size) == [True] * world_size


def test_full_attention_reference_equals_torch_attention():
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert_close(ra.full_attention(q, k, v, causal), want)


def test_zigzag_layout_balances_causal_work():
    assert ra.work_per_rank(4, causal=True) == [0.25, 0.5, 0.75, 1.0]
    assert ra.work_per_rank(4, causal=True, layout="zigzag") == [9 / 16] * 4
    assert ra.work_per_rank(3, causal=False) == [1.0] * 3


def test_shards_tile_the_sequence_in_both_layouts():
    x = torch.arange(8.0).view(1, 8)
    assert ra.shard_sequence(x, 0, 2, "zigzag").tolist() == [[0, 1, 6, 7]]
    for layout in ra.LAYOUTS:
        shards = [ra.shard_sequence(x, r, 2, layout) for r in range(2)]
        assert_close(ra.unshard_sequence(shards, layout), x)


def test_bad_layouts_and_shards_are_refused_by_name():
    q = torch.zeros(1, 2, 3, 4)                                    # (B, H, T/p, d)
    with pytest.raises(ValueError, match=r"layout='striped' is out of range"):
        ra.ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match=r"shard of 3 tokens does not split"):
        ra.ring_attention(q, q, q, layout="zigzag")
    with pytest.raises(ValueError, match=r"one shape"):
        ra.ring_attention(q, q[:, :, :2], q)
    with pytest.raises(ValueError, match=r"6 tokens does not cut into 4 equal chunks"):
        ra.shard_sequence(torch.zeros(1, 6), 0, 2, "zigzag")
    with pytest.raises(ValueError, match=r"rank=2 is out of range; allowed an int in 0..1"):
        ra.shard_sequence(torch.zeros(1, 4), 2, 2)
    with pytest.raises(ValueError, match=r"world_size=0 is out of range"):
        ra.work_per_rank(0, causal=True)
    with pytest.raises(ValueError, match=r"seq_len=6 is out of range; allowed a multiple of 4"):
        cp.ContextParallelConfig(seq_len=6, layout="zigzag")
    with pytest.raises(ValueError, match=r"method='flash' is out of range"):
        cp.ContextParallelConfig(method="flash")
    with pytest.raises(ValueError, match=r"world_size=0 is out of range"):
        cp.ContextParallelConfig(world_size=0)


def test_ring_context_parallel_training_equals_one_process_and_sends_the_predicted_bytes():
    configs = [cp.ContextParallelConfig(method="ring", layout=layout, num_steps=2)
               for layout in ra.LAYOUTS]
    results = distlab.launch(lambda: [cp.train(c) for c in configs], 2)
    for i, config in enumerate(configs):
        want = cp.reference(config)
        for rank in results:
            got = rank[i]
            assert_close(got["losses"], want["losses"], msg=config.layout)
            for name, w in want["weights"].items():
                assert_close(got["weights"][name], w, msg=f"{config.layout} {name}")
            # 2(p-1) K/V blocks forward, 2(p-1) + 2p backward, counted from the real sends.
            block = 2 * 8 * 8 * 4                      # B·(T/p)·H·d float32 values
            assert got["bytes_sent"] == got["model_bytes"] == (2 + 2 + 4) * block


def test_ring_peak_memory_per_rank_is_below_full_attention():
    rows = {(r["method"], r["seq_len"]): r for r in cp.memory_sweep([32, 64], 2)}
    for T in (32, 64):
        assert rows[("ring", T)]["peak_bytes"] < rows[("full", T)]["peak_bytes"]
        assert rows[("ulysses", T)]["peak_bytes"] < rows[("full", T)]["peak_bytes"]
    # The scores term grows as T^2: doubling T grows full attention's peak more than 3x.
    assert rows[("full", 64)]["peak_bytes"] > 3 * rows[("full", 32)]["peak_bytes"]


def check_subgroup_attention():
    """Runs on 4 ranks in two groups, {0, 1} and {2, 3}: each pair shares its own sequence."""
    import torch.distributed as dist
    from distlab.model_parallel.ulysses import ulysses_attention
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair, r = divmod(dist.get_rank(), 2)
    torch.manual_seed(pair)                                  # a different sequence per pair
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    want = ra.shard_sequence(ra.full_attention(q, k, v, causal=True), r, 2, dim=2)
    mine = [ra.shard_sequence(t, r, 2, dim=2) for t in (q, k, v)]
    assert_close(ra.ring_attention(*mine, group=groups[pair], causal=True), want, msg="ring")
    for exchange in ("torch", "pairwise"):
        assert_close(ulysses_attention(*mine, group=groups[pair], causal=True,
                                       all_to_all=exchange), want, msg=f"ulysses, {exchange}")
    return True


def test_ring_and_ulysses_attend_within_a_subgroup():
    assert distlab.launch(check_subgroup_attention, 4) == [True] * 4
