"""The two-phase compressed all-reduce (Tang et al. 2021) on 2 and 3 real ranks against its
one-process simulation; its bytes per rank from the ledger against the formula, beside
today's all-gather version; the world size from which it sends less."""
import pytest
import torch

import distlab
from distlab.communication_efficient import compressed_all_reduce as C
from distlab.communication_efficient.compression import RandomK, Sign, make_compressor

pytestmark = pytest.mark.timeout(120)

N = 1001          # not a multiple of 8 or of 3: unequal chunks, padded sign bits
CALLS = 3


def vector(n, rank, call):
    return torch.randn(n, generator=torch.Generator().manual_seed(100 * rank + call))


def _worker(methods, n, calls):
    """Every method: ``calls`` two-phase all-reduces with both errors, the bytes each sent,
    and the bytes of one all-gather version call."""
    import torch.distributed as dist
    from distlab import comm
    from distlab.communication_efficient import compressed_all_reduce as C
    from distlab.communication_efficient.compression import all_reduce_compressed
    p, r = dist.get_world_size(), dist.get_rank()
    out = {}
    for method in methods:
        comp = make_compressor(method, ratio=0.1)
        e, s = torch.zeros(n), torch.zeros(C.chunk_sizes(n, p)[r])
        results, sent = [], []
        for call in range(calls):
            before = comm.ledger().totals()["bytes_sent"]
            results.append(C.compressed_all_reduce(vector(n, r, call), comp, e, s))
            sent.append(comm.ledger().totals()["bytes_sent"] - before)
        before = comm.ledger().totals()["bytes_sent"]
        all_reduce_compressed(vector(n, r, 0), comp, torch.zeros(n))
        out[method] = {"results": results, "sent": sent,
                       "all_gather_sent": comm.ledger().totals()["bytes_sent"] - before}
    return out


@pytest.fixture(scope="module")
def three_ranks():
    return distlab.launch(_worker, 3, ["sign"], N, CALLS)


@pytest.fixture(scope="module")
def two_ranks():
    return distlab.launch(_worker, 2, ["sign", "topk", "fp16"], N, CALLS)


def simulation(method, p):
    comp = make_compressor(method, ratio=0.1)
    errors = [torch.zeros(N) for _ in range(p)]
    server = [torch.zeros(k) for k in C.chunk_sizes(N, p)]
    return [C.simulate([vector(N, r, call) for r in range(p)], comp, errors, server)
            for call in range(CALLS)]


def test_two_phase_all_reduce_on_three_ranks_equals_its_simulation(three_ranks):
    expected = simulation("sign", 3)
    for rank in three_ranks:
        for got, want in zip(rank["sign"]["results"], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["sign", "topk", "fp16"])
def test_two_phase_all_reduce_equals_its_simulation_for_each_compressor(two_ranks, method):
    expected = simulation(method, 2)
    for rank in two_ranks:
        for got, want in zip(rank[method]["results"], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bytes_per_rank_from_the_ledger_equal_the_formula(two_ranks, three_ranks):
    for p, results in ((2, two_ranks), (3, three_ranks)):
        for rank, out in enumerate(results):
            for method, got in out.items():
                comp = make_compressor(method, ratio=0.1)
                assert got["sent"] == [C.bytes_per_rank("two_phase", N, p, comp, rank)] * CALLS
                assert got["all_gather_sent"] == C.bytes_per_rank("all_gather", N, p, comp)


def test_two_phase_sends_less_from_the_crossover_world_size_on(two_ranks, three_ranks):
    assert C.crossover_world_size(N) == 3
    # Measured: at 2 ranks the all-gather of sign payloads is smaller, at 3 it is larger.
    assert two_ranks[0]["sign"]["sent"][0] > two_ranks[0]["sign"]["all_gather_sent"]
    assert three_ranks[0]["sign"]["sent"][0] < three_ranks[0]["sign"]["all_gather_sent"]
    for p in range(3, 65):
        assert C.bytes_per_rank("two_phase", N, p) < C.bytes_per_rank("all_gather", N, p)


def test_two_phase_bytes_stay_near_n_over_4_while_all_gather_grows_with_ranks():
    n = 2 ** 20
    for p in (2, 4, 8, 16, 64):
        two_phase = max(C.bytes_per_rank("two_phase", n, p, rank=r) for r in range(p))
        assert two_phase <= 2 * (p - 1) * (n // (8 * p) + 1 + 4)
        assert two_phase < n / 4 + 8 * p
        assert C.bytes_per_rank("all_gather", n, p) == (p - 1) * (n // 8 + 4)


def test_errors_carry_exactly_what_both_compressions_missed():
    # out = mean_r(x_r) - mean_r(e_r) - s  (both errors start at zero)
    p, n = 3, 50
    xs = [vector(n, r, 0) for r in range(p)]
    errors = [torch.zeros(n) for _ in range(p)]
    server = [torch.zeros(k) for k in C.chunk_sizes(n, p)]
    out = C.simulate(xs, Sign(), errors, server)
    expected = torch.stack(xs).mean(0) - torch.stack(errors).mean(0) - torch.cat(server)
    torch.testing.assert_close(out, expected)
    assert torch.cat(server).abs().sum() > 0          # the server side did miss something


def test_chunks_cover_the_vector_first_ones_longer():
    assert C.chunk_sizes(10, 3) == [4, 3, 3]
    assert C.chunk_sizes(9, 3) == [3, 3, 3]


def test_bad_arguments_are_refused_before_communicating():
    with pytest.raises(ValueError, match="RandomK"):
        C.compressed_all_reduce(torch.zeros(4), RandomK(0.5))
    with pytest.raises(ValueError, match="world_size"):
        C.chunk_sizes(2, 3)
    with pytest.raises(ValueError, match="method"):
        C.bytes_per_rank("ring", 10, 2)
    with pytest.raises(ValueError, match="rank"):
        C.bytes_per_rank("two_phase", 10, 2, rank=2)
