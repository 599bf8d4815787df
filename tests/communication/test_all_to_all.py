"""distlab.communication.all_to_all: the pairwise all-to-all equals dist.all_to_all_single.

One launch per world size runs both implementations on equal and unequal splits (some
chunks empty), a 2-D input, and bad splits; the tests read its results.
"""
import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import distlab
from distlab import comm
from distlab.communication import all_to_all as A

pytestmark = pytest.mark.timeout(240)


def unequal_splits(p):
    """``sends[s][r]``: rows rank s sends rank r; rank 0 sends nothing to the last rank."""
    return [[0 if (s, r) == (0, p - 1) else s + 2 * r + 1 for r in range(p)] for s in range(p)]


def run_everything():
    rank, p = dist.get_rank(), dist.get_world_size()
    sends = unequal_splits(p)
    out = {}
    for name, fn in A.ALL_TO_ALLS.items():
        x = torch.arange(6 * p, dtype=torch.float32) + 100 * rank          # equal: 6 rows each
        want = torch.empty_like(x)
        dist.all_to_all_single(want, x)
        comm.ledger().reset()
        got = fn(x, check=False)
        ops = comm.ledger().by_op()
        sent = sum(ops[o]["bytes_sent"] for o in ("send", "all_to_all") if o in ops)
        recv = sum(ops[o]["bytes_recv"] for o in ("recv", "all_to_all") if o in ops)
        out[name, "equal"] = (got, want, sent, recv, comm.nbytes(x))

        in_sizes = sends[rank]
        out_sizes = [sends[s][rank] for s in range(p)]
        x = (torch.arange(sum(in_sizes) * 3, dtype=torch.float64).reshape(-1, 3)
             + 1000 * rank)                                                 # (rows, 3)
        want = x.new_empty(sum(out_sizes), 3)
        dist.all_to_all_single(want, x, out_sizes, in_sizes)
        out[name, "unequal"] = (fn(x, out_sizes, in_sizes), want)
    trace = []
    A.pairwise_all_to_all(torch.ones(p), trace=trace)
    out["rounds"] = [(e["dst"], e["src"]) for e in trace]
    out["errors"] = errors(rank, p)
    return out


def errors(rank, p):
    """The messages of bad calls, each refused on every rank."""
    caught = []
    x = torch.zeros(2 * p, 2)
    for call in (lambda: A.pairwise_all_to_all(x, input_split_sizes=[1] * p),   # sum p, not 2p
                 lambda: A.torch_all_to_all(x, [2] * p, [2] * (p + 1)),
                 lambda: A.pairwise_all_to_all(torch.zeros(2 * p + 1)),
                 # rank 0 sends 3 rows to rank 1, which expects 2 from it
                 lambda: A.pairwise_all_to_all(x, [2] * p, [3, 1] + [2] * (p - 2) if rank == 0
                                               else [2] * p)):
        try:
            call()
            caught.append(None)
        except ValueError as e:
            caught.append(str(e))
    return caught


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda p: f"p={p}")
def everything(request):
    return request.param, distlab.launch(run_everything, request.param, timeout=120)


@pytest.mark.parametrize("name", list(A.ALL_TO_ALLS))
def test_equal_splits_match_torch_all_to_all_single(everything, name):
    p, results = everything
    for rank, out in enumerate(results):
        got, want, *_ = out[name, "equal"]
        assert_close(got, want, rtol=0, atol=0, msg=f"{name}, rank {rank} of {p}")


@pytest.mark.parametrize("name", list(A.ALL_TO_ALLS))
def test_unequal_splits_with_an_empty_chunk_match_torch(everything, name):
    p, results = everything
    for rank, out in enumerate(results):
        got, want = out[name, "unequal"]
        assert got.shape == (sum(row[rank] for row in unequal_splits(p)), 3)
        assert_close(got, want, rtol=0, atol=0, msg=f"{name}, rank {rank} of {p}")


@pytest.mark.parametrize("name", list(A.ALL_TO_ALLS))
def test_ledger_counts_the_formulas_bytes(everything, name):
    p, results = everything
    for out in results:
        _, _, sent, recv, n = out[name, "equal"]
        assert sent == recv == A.model_bytes(n, p) == (p - 1) * n // p


def test_pairwise_round_k_sends_to_rank_plus_k_and_receives_from_rank_minus_k(everything):
    p, results = everything
    for rank, out in enumerate(results):
        assert out["rounds"] == [((rank + k) % p, (rank - k) % p) for k in range(1, p)]


def test_bad_splits_are_refused_by_name(everything):
    p, results = everything
    for rank, out in enumerate(results):
        wrong_sum, wrong_count, unequal_rows, disagree = out["errors"]
        assert "input_split_sizes=[1" in wrong_sum and f"sum to {p}" in wrong_sum
        assert f"first dimension is {2 * p}" in wrong_sum
        assert "input_split_sizes" in wrong_count and f"must be {p} ints" in wrong_count
        assert f"{2 * p + 1} rows do not split equally over {p} ranks" in unequal_rows
        assert "the ranks disagree" in disagree and "(0, 1)" in disagree, (rank, disagree)


def test_compare_reports_both_algorithms_per_world_size():
    rows = A.compare(world_sizes=(2,), chunk_numel=8)
    assert [(r["world_size"], r["algorithm"]) for r in rows] == [(2, "pairwise"), (2, "torch")]
    assert all(r["equal"] and r["bytes_sent"] == r["model_bytes"] == 32 for r in rows)
    with pytest.raises(ValueError, match="chunk_numel=0"):
        A.compare(chunk_numel=0)
