"""distlab.communication.collectives: every algorithm equals torch.distributed's, on real gloo processes.

One launch per world size runs every algorithm on several lengths (shorter than the world,
uneven, long) and dtypes; the parent compares with a single-process reference.
"""
import pytest
import torch
import torch.distributed as dist

import distlab
from distlab.communication import collectives as C
from distlab import comm

pytestmark = pytest.mark.timeout(240)

LENGTHS = (1, 3, 7, 1000)
DTYPES = (torch.float32, torch.float64, torch.int64)


def value(rank, n, dtype):
    # Different on every rank and element; integers so int64 sums are exact too.
    return ((torch.arange(n) % 13 + 1) * (rank + 1) + 7 * rank).to(dtype).reshape(-1)


def run_everything():
    rank, p = dist.get_rank(), dist.get_world_size()
    out = {}
    for dtype in DTYPES:
        for n in LENGTHS:
            x = value(rank, n, dtype)
            want = x.clone()
            comm.all_reduce(want)                        # gloo's built-in, the reference here
            for name in ("ring", "recursive_doubling", "naive"):
                y = x.clone()
                comm.ledger().reset()
                returned = C.ALL_REDUCES[name](y)
                assert returned is y
                sent = comm.ledger().by_op()["send"]["bytes_sent"] if p > 1 else 0
                out[name, dtype, n] = (y, want, sent)
            y = x.clone()
            chunk = C.ring_reduce_scatter(y).clone()
            parts = [torch.empty_like(x) for _ in range(p)]
            dist.all_gather(parts, x)
            g = torch.zeros_like(x)
            g.tensor_split(p)[rank].copy_(x.tensor_split(p)[rank])
            C.ring_all_gather(g)
            out["reduce_scatter", dtype, n] = (chunk, want.tensor_split(p)[rank], 0)
            gathered = torch.cat([parts[r].tensor_split(p)[r] for r in range(p)])
            out["all_gather", dtype, n] = (g, gathered, 0)
    x2 = value(rank, 12, torch.float32).reshape(3, 4)      # 2-D tensors work on their view
    C.ring_all_reduce(x2)
    trace = []
    C.ring_all_reduce(value(rank, 10, torch.float32), trace=trace)
    return out, x2, trace


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda p: f"p={p}")
def everything(request):
    """One launch per world size: ``(p, [(out, x2, trace) for each rank])``."""
    return request.param, distlab.launch(run_everything, request.param, timeout=120)


def reference(name, dtype, n, p, rank):
    """The single-process answer for one algorithm's output on ``rank``."""
    if name == "reduce_scatter":
        return sum(value(r, n, dtype) for r in range(p)).tensor_split(p)[rank]
    if name == "all_gather":
        return torch.cat([value(r, n, dtype).tensor_split(p)[r] for r in range(p)])
    return sum(value(r, n, dtype) for r in range(p))


def test_every_algorithm_equals_one_process_and_torch(everything):
    p, results = everything
    for rank, (out, x2, _) in enumerate(results):
        for (name, dtype, n), (got, want, _) in out.items():
            msg = f"{name} {dtype} n={n} rank {rank} of {p}"
            torch.testing.assert_close(got, reference(name, dtype, n, p, rank), msg=msg)
            torch.testing.assert_close(got, want, msg=msg)
        torch.testing.assert_close(x2, sum(value(r, 12, torch.float32) for r in range(p))
                                   .reshape(3, 4))


def test_ring_sends_every_chunk_but_its_own_twice(everything):
    p, results = everything
    for rank, (out, _, _) in enumerate(results):
        for (name, dtype, n), (got, _, sent) in out.items():
            if name != "ring":
                continue
            msg = f"{dtype} n={n} rank {rank} of {p}"
            sizes = [c.numel() for c in torch.empty(n).tensor_split(p)]
            item = torch.empty((), dtype=dtype).element_size()
            assert sent == item * (2 * n - sizes[rank] - sizes[(rank + 1) % p]), msg
            if n % p == 0:
                assert sent == 2 * (p - 1) * n * item // p, msg


def test_naive_root_sends_p_minus_one_copies_and_the_others_one(everything):
    p, results = everything
    for rank, (out, _, _) in enumerate(results):
        for (name, dtype, n), (got, _, sent) in out.items():
            if name == "naive":
                assert sent == (p - 1 if rank == 0 else 1) * n * got.element_size(), (rank, n)


def test_trace_records_each_ring_step_to_the_right_neighbour(everything):
    p, results = everything
    for rank, (_, _, trace) in enumerate(results):
        assert len(trace) == 2 * (p - 1)                    # one event per step
        assert [e["phase"] for e in trace] == ["reduce-scatter"] * (p - 1) + ["all-gather"] * (p - 1)
        assert all(e["rank"] == rank and e["dst"] == (rank + 1) % p for e in trace)
        assert trace[0]["chunk"] == (rank - 1) % p and trace[p - 1]["chunk"] == rank


def bad_inputs():
    rank = dist.get_rank()
    errors = {}

    def attempt(name, fn):
        try:
            fn()
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"

    for algo in ("ring", "recursive_doubling", "naive"):
        f = C.ALL_REDUCES[algo]
        attempt(f"{algo} shape", lambda: f(torch.ones(4 + (rank == 1))))
        attempt(f"{algo} dtype", lambda: f(torch.ones(4, dtype=torch.float64 if rank == 2
                                                      else torch.float32)))
        attempt(f"{algo} noncontiguous", lambda: f(torch.ones(4, 4).t()))
        attempt(f"{algo} not a tensor", lambda: f([1.0, 2.0]))
    attempt("reduce_scatter shape", lambda: C.ring_reduce_scatter(torch.ones(2, 2 + rank)))
    empty = torch.ones(0)
    attempt("empty", lambda: C.ring_all_reduce(empty))
    # A group of ranks 0 and 1: rank 2 is not in it and must be told so, not hang.
    pair = dist.new_group([0, 1])
    x = torch.full((5,), float(rank + 1))
    attempt("not in group", lambda: C.ring_all_reduce(x, group=pair))
    y = torch.full((5,), float(rank + 1))
    attempt("not in group rd", lambda: C.recursive_doubling_all_reduce(y, group=pair))
    # A group whose ranks are not 0..k-1: peers are addressed by their global rank.
    upper = dist.new_group([1, 2])
    z = {}
    if rank in (1, 2):
        for algo in ("ring", "recursive_doubling", "naive"):
            z[algo] = C.ALL_REDUCES[algo](torch.full((3,), float(rank)), group=upper)
    return errors, x, y, z


@pytest.fixture(scope="module")
def refusals():
    """One launch of 3 ranks: ``[(errors, x, y, z) for each rank]``."""
    return distlab.launch(bad_inputs, 3, timeout=60)


def test_mismatched_shapes_and_dtypes_are_named_rank_by_rank(refusals):
    for errors, _, _, _ in refusals:
        for algo in ("ring", "recursive_doubling", "naive"):
            assert "same shape and dtype" in errors[f"{algo} shape"], errors
            assert "rank 1: (5,) torch.float32" in errors[f"{algo} shape"], errors
            assert "rank 2: (4,) torch.float64" in errors[f"{algo} dtype"], errors
        assert "rank 2: (2, 4)" in errors["reduce_scatter shape"]


def test_noncontiguous_tensors_and_non_tensors_are_refused(refusals):
    for errors, _, _, _ in refusals:
        for algo in ("ring", "recursive_doubling", "naive"):
            assert "contiguous" in errors[f"{algo} noncontiguous"]
            assert errors[f"{algo} not a tensor"].startswith("TypeError")


def test_an_empty_all_reduce_is_a_no_op(refusals):
    assert all(errors["empty"] is None for errors, _, _, _ in refusals)


def test_a_rank_outside_the_group_is_told_so_while_members_sum(refusals):
    for rank, (errors, x, y, _) in enumerate(refusals):
        if rank == 2:
            assert "rank 2 is not in the group [0, 1]" in errors["not in group"]
            assert "not in the group" in errors["not in group rd"]
        else:                                           # the members sum among themselves
            assert errors["not in group"] is None and errors["not in group rd"] is None
            torch.testing.assert_close(x, torch.full((5,), 3.0))
            torch.testing.assert_close(y, torch.full((5,), 3.0))


def test_a_group_of_ranks_1_and_2_addresses_peers_by_global_rank(refusals):
    for rank, (_, _, _, z) in enumerate(refusals):
        assert len(z) == (0 if rank == 0 else 3)
        for algo, got in z.items():
            torch.testing.assert_close(got, torch.full((3,), 3.0), msg=algo)


def segmented_ring():
    C._MAX_MESSAGE_BYTES = 40                       # 400 bytes in 133-byte chunks: 4 segments
    C.alpha_beta.machine_cores = lambda: 1          # more ranks than cores, on any machine
    x = torch.arange(100, dtype=torch.float32) * (dist.get_rank() + 1)
    comm.ledger().reset()
    C.ring_all_reduce(x)
    return x, comm.ledger().by_op()["send"]["calls"]


def test_a_crowded_ring_goes_round_in_segments_and_still_sums():
    for x, sends in distlab.launch(segmented_ring, 3, timeout=60):
        torch.testing.assert_close(x, torch.arange(100, dtype=torch.float32) * 6)
        assert sends == 4 * 2 * (3 - 1)             # every segment: 2(p-1) messages
