"""Compressors: round trips, exact payload sizes, the error-feedback invariant, and the
compressed all-reduce on 2 and 4 real ranks against a single-process simulation."""
import math

import pytest
import torch

import distlab
from distlab import comm
from distlab.communication_efficient.compression import (METHODS, LowPrecision, RandomK, Sign, TopK,
                                 all_reduce_compressed, bytes_sent_per_call,
                                 compress_with_feedback, make_compressor)

SIZES = [1, 7, 8, 1001]


def vector(n, seed=0):
    # Distinct magnitudes, so top-k has no ties.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * (1 + torch.randperm(n, generator=g).float() / n)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_payload_size_is_the_analytic_size(method, n):
    c = make_compressor(method, ratio=0.1)
    payload = c.compress(vector(n))
    assert payload.dim() == 1
    assert payload.numel() * payload.element_size() == c.payload_bytes(n)


@pytest.mark.parametrize("n", SIZES)
def test_round_trips(n):
    x = vector(n)
    torch.testing.assert_close(make_compressor("none").decompress(
        make_compressor("none").compress(x), n), x, rtol=0, atol=0)

    top = TopK(ratio=0.1)
    k = top.num_kept(n)
    out = top.decompress(top.compress(x), n)
    kept = x.abs().topk(k).indices
    torch.testing.assert_close(out[kept], x[kept], rtol=0, atol=0)
    assert (out != 0).sum() == k, "top-k keeps exactly k coordinates"

    rand = RandomK(ratio=0.5, seed=3)
    out = rand.decompress(rand.compress(x), n)
    nz = out != 0
    assert nz.sum() == rand.num_kept(n)
    torch.testing.assert_close(out[nz], x[nz], rtol=0, atol=0)

    out = Sign().decompress(Sign().compress(x), n)
    torch.testing.assert_close(out, torch.where(x >= 0, 1.0, -1.0) * x.abs().mean())

    for dtype in (torch.float16, torch.bfloat16):
        c = LowPrecision(dtype)
        torch.testing.assert_close(c.decompress(c.compress(x), n), x.to(dtype).float(),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_residual_carries_exactly_what_was_not_sent(method):
    c = make_compressor(method, ratio=0.05)
    residual = 0.1 * vector(1001, seed=1)
    owed = vector(1001) + residual                      # x + old residual
    _, sent = compress_with_feedback(vector(1001), c, residual)
    exact = method in ("none", "topk", "randomk")       # no rounding: bit-exact
    tol = dict(rtol=0, atol=0) if exact else {}
    torch.testing.assert_close(residual + sent, owed, **tol)
    if method == "topk":
        assert (residual[sent != 0] == 0).all() and (residual[sent == 0] == owed[sent == 0]).all()


def test_without_feedback_nothing_is_remembered():
    x = vector(50)
    payload, sent = compress_with_feedback(x, TopK(0.1), None)
    torch.testing.assert_close(sent, TopK(0.1).decompress(payload, 50))


def test_bad_method_or_ratio_is_refused():
    with pytest.raises(ValueError, match="method='gzip'"):
        make_compressor("gzip")
    with pytest.raises(ValueError, match="ratio=0"):
        make_compressor("topk", ratio=0)


@pytest.mark.parametrize("make, message", [
    (lambda: TopK(ratio=-1), "TopK.ratio=-1 is out of range"),
    (lambda: TopK(ratio=True), "TopK.ratio=True is out of range"),
    (lambda: TopK(ratio=1.5), "TopK.ratio=1.5 is out of range"),
    (lambda: RandomK(ratio=0.0), "RandomK.ratio=0.0 is out of range"),
    (lambda: RandomK(ratio=0.1, seed=-1), "RandomK.seed=-1 is out of range"),
    (lambda: RandomK(ratio=0.1, seed=0.5), "RandomK.seed=0.5 is out of range"),
    (lambda: LowPrecision(torch.float32), "LowPrecision.dtype=torch.float32 is out of range"),
    (lambda: make_compressor("randomk", ratio=2.0), "ratio=2.0 is out of range"),
    (lambda: make_compressor("sign", ratio=-1), "ratio=-1 is out of range"),
    (lambda: make_compressor("none", seed=-1), "seed=-1 is out of range"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_compressors_refuse_bad_arguments_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("args, message", [
    ((Sign(), 0, 2), "numel=0 is out of range"), ((Sign(), 10, 0), "world_size=0 is out of range"),
    ((Sign(), 10, True), "world_size=True is out of range"),
    (("sign", 10, 2), "compressor='sign' is out of range")])
def test_bytes_sent_per_call_refuses_bad_arguments_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        bytes_sent_per_call(*args)


N, STEPS = 1001, 3


def _worker(methods):
    import torch.distributed as dist
    rank = dist.get_rank()
    out = {}
    for method in methods:
        c = make_compressor(method, ratio=0.02, seed=5)
        residual = torch.zeros(N)
        means, sent = [], []
        for step in range(STEPS):
            before = comm.ledger().totals()["bytes_sent"]
            means.append(all_reduce_compressed(vector(N, seed=100 * step + rank), c, residual))
            sent.append(comm.ledger().totals()["bytes_sent"] - before)
        out[method] = (means, sent, residual)
    return out


def _simulate(method, world_size):
    """One process plays every rank: each compresses with its own residual; mean of what is sent."""
    cs = [make_compressor(method, ratio=0.02, seed=5) for _ in range(world_size)]
    residuals = [torch.zeros(N) for _ in range(world_size)]
    means = []
    for step in range(STEPS):
        sent = [compress_with_feedback(vector(N, seed=100 * step + r), cs[r], residuals[r])[1]
                for r in range(world_size)]
        means.append(torch.stack(sent).mean(0))
    return means, residuals


@pytest.mark.parametrize("world_size", [2, 4])
def test_compressed_all_reduce_matches_simulation_and_counts_compressed_bytes(world_size):
    results = distlab.launch(_worker, world_size, METHODS, timeout=120)
    for method in METHODS:
        want_means, want_residuals = _simulate(method, world_size)
        c = make_compressor(method, ratio=0.02)
        for rank in range(world_size):
            means, sent, residual = results[rank][method]
            # fp16/bf16 add up in 16 bits on the wire: equal to within their precision.
            tol = dict(rtol=1e-2, atol=2e-2) if method in ("fp16", "bf16") else {}
            for step in range(STEPS):
                torch.testing.assert_close(means[step], want_means[step], **tol,
                                           msg=f"{method} rank {rank} step {step}")
            torch.testing.assert_close(residual, want_residuals[rank], **tol)
            assert sent == [bytes_sent_per_call(c, N, world_size)] * STEPS, (method, sent)
    # the point of it all: top-k at 2% sends far less than float32
    dense = bytes_sent_per_call(make_compressor("none"), N, world_size)
    assert bytes_sent_per_call(TopK(0.02), N, world_size) * 10 < dense
    assert bytes_sent_per_call(Sign(), N, world_size) == (world_size - 1) * (math.ceil(N / 8) + 4)


def _ring_worker(methods):
    import torch.distributed as dist
    rank = dist.get_rank()
    out = {}
    for method in methods:
        means, sent = [], []
        for ring in (False, True):
            c = make_compressor(method, ratio=0.02, seed=5)
            before = comm.ledger().by_op()
            means.append(all_reduce_compressed(vector(N, seed=rank), c, torch.zeros(N), ring=ring))
            after = comm.ledger().by_op()
            none = {"calls": 0, "bytes_sent": 0}
            sent.append({op: s["bytes_sent"] - before.get(op, none)["bytes_sent"]
                         for op, s in after.items() if s["calls"] > before.get(op, none)["calls"]})
        out[method] = (means, sent)
    return out


def test_the_ring_path_gives_the_same_mean_and_really_sends_the_model_bytes():
    world_size = 3                                    # 3 does not divide the payloads
    results = distlab.launch(_ring_worker, world_size, METHODS, timeout=120)
    for method in METHODS:
        c = make_compressor(method, ratio=0.02)
        for rank in range(world_size):
            (built_in, ring), _ = results[rank][method]
            tol = dict(rtol=1e-2, atol=2e-2) if method in ("fp16", "bf16") else {}
            torch.testing.assert_close(ring, built_in, **tol, msg=f"{method} rank {rank}")
        ring_sent = [results[rank][method][1][1] for rank in range(world_size)]
        assert all(set(s) <= {"send", "recv"} for s in ring_sent), "point-to-point only"
        mean_sent = sum(s.get("send", 0) for s in ring_sent) / world_size
        assert abs(mean_sent - bytes_sent_per_call(c, N, world_size)) <= 1, (method, mean_sent)
