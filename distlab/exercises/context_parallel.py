"""Lab 11's assignment: the online-softmax merge of two partial attention results (part A),
then the forward of ring attention (part B), checked against full attention by torch.

Ring attention (Liu, Zaharia and Abbeel 2023, arXiv 2310.01889): each of the p ranks holds
its shard of the sequence, ``q, k, v`` (B, H, T/p, d); in p - 1 ring steps every rank passes
the key/value block it holds to the next rank, so its queries meet every key block once, and
merges each block's partial result (output and log-sum-exp) into the running one, never
forming the (T, T) scores. Cost per rank: ``(p - 1)·(alpha + 2·(T/p)·B·H·d·beta)``.

* ``merge_partial_attention(out_a, lse_a, out_b, lse_b) -> (out, lse)``: attention over the
  union of two disjoint key blocks, from each block's output (B, H, T, d) and lse (B, H, T);
  checked here, in this process.
* ``ring_attention(q, k, v, group=None, causal=False) -> out``: the rank's output shard.

What is right is full attention by torch (``scaled_dot_product_attention``, float64);
distlab's context parallelism and the gathering collectives are off limits. A wrong shard is
explained by the rank, the key block (and the ring step it arrives at), expected against got.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distlab.checks import is_int, is_number, require_arg
from distlab.exercises import (NOT_IMPLEMENTED, ForbiddenCall, Verdict, is_stub, forbid,
                               launch_student, require_case)
from distlab.exercises.messages import MissingMessage, watched

LIBRARY = ("distlab.model_parallel.ring_attention", "distlab.model_parallel.ulysses",
           "distlab.model_parallel.context_parallel")
"""distlab's own context parallelism: every function these modules define is off limits."""
COLLECTIVES = tuple(f"torch.distributed.{name}" for name in (
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "broadcast", "batch_isend_irecv"))
"""Gathering the keys would skip the ring; batch_isend_irecv can hang on gloo."""
WHY_A = "write the merge yourself, with torch"
WHY_B = "pass k and v round the ring with dist.isend and dist.recv (batch_isend_irecv can hang)"
HANG_HINT = ("at each ring step every rank dist.isend()s its k and v to the NEXT rank, "
             "dist.recv()s from the PREVIOUS one, then waits for its sends; a blocking send "
             "first, or a receive from the wrong neighbour, deadlocks")
WAIT = 10.0
"""Seconds a part B rank waits for a message before the check says which one is missing."""
BATCH, HEADS, HEAD_DIM = 2, 2, 8
"""Every case's sizes but T (d >= p: a wrong shard can be read as a mix of the blocks')."""
POINTS_A = {"out": 2 / 3, "lse": 1 / 3}
POINTS_B = {"out": 6 / 7, "ring": 1 / 7}
"""How each part's points are shared: the output, then the lse (A) or the ring's traffic (B)."""


def check_merge(student_fn: Callable, *, points: float, lse_shift: float = 100.0,
                empty_rows: bool = False, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> Verdict:
    """Part A, in this process: ``student_fn(out_a, lse_a, out_b, lse_b)`` for 5 queries
    and two key blocks of 3 and 4 keys whose scores are shifted by up to ``lse_shift``
    (exp() of them overflows: the merge must rescale by the larger lse); ``empty_rows``:
    some queries see no key of block b (its lse -inf, its output 0), as in a causal block.

    Points (``POINTS_A``): 2/3 the merged output, 1/3 the merged lse; both must be
    attention over the union of the blocks, computed by torch.
    """
    require_case(1, 1, dtype, points)
    require_arg("lse_shift", lse_shift, is_number(lse_shift) and 0 <= lse_shift <= 1e4,
                "a number in 0..1e4")
    case = (f"lse up to {lse_shift:g}{', rows block b does not see' * empty_rows}, "
            f"{str(dtype).removeprefix('torch.')}")
    args, (want_out, want_lse) = _merge_problem(lse_shift, empty_rows, dtype, seed)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(
                action="ignore"), forbid(*_library(), why=WHY_A):
            got = student_fn(*[a.clone() for a in args])
    except NotImplementedError:
        return Verdict(False, NOT_IMPLEMENTED.format(name="merge_partial_attention"), 0, points)
    except ForbiddenCall as e:
        return Verdict(False, str(e), 0.0, points)
    except Exception as e:  # the student's bug (not a function, too): a verdict, never raised
        return Verdict(False, f"{case}: it raised {type(e).__name__}: {e}", 0.0, points)
    shapes = [tuple(want_out.shape), tuple(want_lse.shape)]
    if not (isinstance(got, (tuple, list)) and [getattr(t, "shape", None) for t in got] == shapes):
        return Verdict(False, f"{case}: it returned {_what(got)}; return the pair (out, lse) "
                              f"of shapes {shapes[0]} and {shapes[1]}", 0.0, points)
    (out, lse), (out_a, lse_a, out_b, lse_b) = got, args
    out_problem = _wrong("out", out, want_out, dtype, {
        "the sum out_a + out_b: weigh each block by its share, exp(lse_i - lse)": out_a + out_b,
        "the mean of the outputs: weigh each block by exp(lse_i - lse)": (out_a + out_b) / 2})
    lse_problem = _wrong("lse", lse, want_lse, dtype, {
        "lse_a: the merged lse must be updated, lse = log(exp(lse_a) + exp(lse_b))": lse_a,
        "max(lse_a, lse_b): add log(exp(lse_a - m) + exp(lse_b - m)) to the max m":
            torch.maximum(lse_a, lse_b)})
    earned = points * (POINTS_A["out"] * (out_problem is None)
                       + POINTS_A["lse"] * (lse_problem is None))
    problems = [p for p in (out_problem, lse_problem) if p]
    if problems:
        return Verdict(False, f"{case}: " + "\n".join(problems), round(earned, 6), points)
    return Verdict(True, f"{case}: the merged output and lse are attention over both "
                         "blocks", points, points)


def check_ring_attention(student_fn: Callable, *, points: float, world_size: int = 2,
                         causal: bool = True, seq_len: int = 8,
                         dtype: torch.dtype = torch.float32, seed: int = 0) -> Verdict:
    """Part B: ``student_fn(q, k, v, None, causal)`` on ``world_size`` ranks, rank r holding
    rows r·T/p .. (r+1)·T/p - 1 of the sequence (T = ``seq_len``, divisible by p).

    Points (:data:`POINTS_B`): 6/7 every rank's output shard equal to its rows of full
    attention (torch's ``scaled_dot_product_attention``); 1/7 (with the outputs right) the
    ring: each rank sent its k and v blocks to the next rank only, in p - 1 steps.
    """
    require_case(world_size, 1, dtype, points)
    require_arg("causal", causal, isinstance(causal, bool), "True or False")
    require_arg("seq_len", seq_len, is_int(seq_len) and 1 <= seq_len <= 64 and seq_len
                % world_size == 0, f"an int in 1..64 divisible by world_size={world_size}")
    calls = getattr(getattr(student_fn, "__code__", None), "co_names", ())
    merge = getattr(student_fn, "__globals__", {}).get("merge_partial_attention")
    if "merge_partial_attention" in calls and is_stub(merge):     # part B calls part A's
        return Verdict(False, "ring_attention calls your merge_partial_attention, which is "
                              "not implemented yet: write part A first", 0.0, points)
    setting = (world_size, causal, seq_len, dtype, seed)
    results, failed = launch_student("ring_attention", student_fn, _run_ring, world_size,
                                     student_fn, *setting, WAIT, timeout=WAIT + 40,
                                     hang_hint=HANG_HINT, points=points)
    if failed is not None:
        return failed
    p, c = world_size, seq_len // world_size
    case = (f"{p} rank{'s' * (p != 1)}, {'causal' if causal else 'not causal'}, T={seq_len} "
            f"({c} per rank), {str(dtype).removeprefix('torch.')}")
    missing = sorted(r["missing"] for r in results if r["missing"])
    if missing:              # the first rank that gave up waiting: the others waited on it
        return Verdict(False, f"{case}: {missing[0][1]}: {HANG_HINT}", 0.0, points)
    q, k, v = _problem(seq_len, dtype, seed)
    for rank, res in enumerate(results):
        got = res["out"]
        if isinstance(got, str):
            return Verdict(False, f"{case}: rank {rank}: {got}", 0.0, points)
        problem = _shard_problem(got, rank, p, causal, q, k, v, dtype)
        if problem:
            return Verdict(False, f"{case}: rank {rank} (queries {rank * c}.."
                                  f"{rank * c + c - 1}): {problem}", 0.0, points)
    for rank, res in enumerate(results):
        problem = _ring_problem(res["sent"], rank, p, 2 * BATCH * HEADS * c * HEAD_DIM)
        if problem:
            return Verdict(False, f"{case}: every output shard is right, but rank {rank} "
                                  f"{problem}", points * POINTS_B["out"], points)
    return Verdict(True, f"{case}: every rank's output shard equals full attention, from "
                         f"{p - 1} ring step{'s' * (p != 2)} to the next rank", points, points)


# -- The problems, and what is right: attention computed by torch, in float64 ------------

def _merge_problem(shift, empty_rows, dtype, seed):
    """Two blocks' (out, lse) in ``dtype``, and attention over both (in float64)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for keys in (3, 4):
        scores = torch.randn(BATCH, HEADS, 5, keys, generator=g, dtype=torch.float64)
        scores += shift * (0.5 + 0.5 * torch.rand(BATCH, HEADS, 5, 1, generator=g,
                                                  dtype=torch.float64))
        values = torch.randn(BATCH, HEADS, keys, HEAD_DIM, generator=g, dtype=torch.float64)
        blocks.append((scores, values))
    if empty_rows:                        # these queries see none of block b's keys
        blocks[1][0][..., ::2, :] = float("-inf")
    scores, values = (torch.cat(parts, dim=-1 - i) for i, parts in enumerate(zip(*blocks)))
    args = []
    for s, vals in blocks:
        out = torch.softmax(s, -1).nan_to_num(0.0) @ vals           # (B, H, T, d)
        args += [out.to(dtype), s.logsumexp(-1).to(dtype)]          # (B, H, T)
    return args, (torch.softmax(scores, -1) @ values, scores.logsumexp(-1))


def _problem(seq_len, dtype, seed):
    """The whole sequence's q, k, v (B, H, T, d), the same on every rank."""
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(BATCH, HEADS, seq_len, HEAD_DIM, generator=g,
                        dtype=torch.float64).to(dtype) for _ in range(3)]


def _attention(q, k, v, allowed, scale=None):
    """Softmax attention of ``q`` over the keys each query is ``allowed`` (Tq, Tk)."""
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=allowed, scale=scale)


def _masks(rank, p, seq_len, causal):
    """``(right, {mistake: mask})``: which keys rank ``rank``'s queries may see, rightly and
    as the classic mistakes see them; ``blocks`` (Tk,) is each key's block."""
    c = seq_len // p
    qpos = (rank * c + torch.arange(c))[:, None]         # (c, 1): this shard's queries
    kpos = torch.arange(seq_len)[None, :]                # (1, T): every key
    block, earlier = kpos // c, kpos <= qpos
    every = torch.ones(c, seq_len, dtype=torch.bool)
    if not causal:
        return every, {"it applied a causal mask, but this case is not causal": earlier}
    return earlier, {
        "no causal mask at all: rank r sees key blocks j <= r only, block r below its "
        "diagonal": every,
        "the diagonal block's mask was applied to every block: blocks j < r need none":
            (block <= rank) & (kpos % c <= qpos % c),
        "the diagonal block j = r was not masked: its query i sees its keys 0..i": block <= rank,
        "the key blocks j > r were used: they come after rank r's queries; skip them":
            (block > rank) | earlier,
        "the wrong blocks were skipped: keep j < r (unmasked) and j = r (masked), skip j > r":
            (block > rank) | ((block == rank) & earlier),
    }


# -- On each rank: the student's ring attention, its output shard and its messages -------

def _run_ring(student_fn, p, causal, seq_len, dtype, seed, wait):
    rank = dist.get_rank()
    q, k, v = (t.chunk(p, dim=2)[rank].contiguous()          # (B, H, T/p, d)
               for t in _problem(seq_len, dtype, seed))
    log, record = {"sent": [], "received": []}, {"missing": None}
    try:
        with watched(log, wait), forbid(*COLLECTIVES, *_library(), why=WHY_B):
            out = student_fn(q, k, v, None, causal)
    except MissingMessage as e:
        record["missing"] = (time.monotonic(), str(e))
        out = None
    record["sent"] = [(dst, t.numel()) for dst, t in log["sent"]]
    record["out"] = _returned(out, q)
    return record


def _returned(out, q):
    """The output shard, or a sentence saying what came back instead."""
    if isinstance(out, torch.Tensor) and out.shape == q.shape:
        return out.detach().clone()
    return f"returned {_what(out)}; return the output shard, shaped like q: {tuple(q.shape)}"


def _what(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else f"a {type(x).__name__}"


# -- What is wrong with a shard, and with a rank's messages ------------------------------

def _shard_problem(got, rank, p, causal, q, k, v, dtype) -> str | None:
    c = q.shape[2] // p
    queries = q[:, :, rank * c:(rank + 1) * c]
    right, mistakes = _masks(rank, p, q.shape[2], causal)
    want = _attention(queries, k, v, right)
    if _close(got, want, dtype):
        return None
    detail = _first_wrong(got, want, rank * c, dtype)
    if not torch.isfinite(got).all():
        return (f"{detail}. A nan or inf: exp() of the scores overflowed (subtract the max, "
                "or merge with part A's lse), or a block with no key to see was merged (its "
                "softmax is nan: skip it)")
    for mistake, allowed in mistakes.items():
        if _close(got, _attention(queries, k, v, allowed), dtype):
            return f"{mistake}. {detail}"
    if _close(got, _attention(queries, k, v, right, scale=1.0), dtype):
        return f"the scores were not divided by sqrt(d) = {q.shape[-1] ** 0.5:g}. {detail}"
    return _weights_problem(got, queries, k, v, right, rank, p, dtype, detail) or detail


def _weights_problem(got, queries, k, v, right, rank, p, dtype, detail):
    """If ``got`` mixes the right per-block outputs with the wrong weights: how."""
    blocks = torch.arange(k.shape[2]) // queries.shape[2]
    used = sorted({int(j) for j in blocks[right.any(0)]})
    parts = [_attention(queries, k, v, right & (blocks == j)[None, :]) for j in used]
    A = torch.stack(parts, -1)                               # (B, H, c, d, blocks)
    if A.shape[-2] < A.shape[-1]:
        return None
    weights = torch.linalg.lstsq(A, got.double()[..., None]).solution[..., 0]
    if not _close((A @ weights[..., None])[..., 0], got.double(), dtype):
        return None                          # not a mix of the blocks' outputs
    scores = (queries.double() @ k.double().transpose(-2, -1)) / queries.shape[-1] ** 0.5
    lse = torch.stack([scores.masked_fill(~(right & (blocks == j)[None, :]), float("-inf"))
                       .logsumexp(-1) for j in used], -1)     # (B, H, c, blocks)
    right_weights = torch.softmax(lse, -1)
    b, h, i = torch.unravel_index((weights - right_weights).abs().amax(-1).argmax(),
                                  weights.shape[:-1])
    w, rw, total = weights[b, h, i], right_weights[b, h, i], float(weights[b, h, i].sum())
    lost = [j for j, x in zip(used, weights.abs().amax((0, 1, 2)).tolist()) if x < 1e-4]
    if lost:
        return (f"it is attention over the key block(s) {_list(set(used) - set(lost))} only: "
                f"the block(s) {_list(lost)}, which reach rank {rank} at ring step(s) "
                f"{_list([(rank - j) % p for j in lost])}, never entered the merge. {detail}")
    why = (f"they add up to {total:.4g}, not 1: rescale both partial outputs by "
           "exp(lse_i - lse) when merging" if abs(total - 1) > 1e-3 else
           "they add up to 1 but are shared wrongly: was the running lse not updated after "
           "a merge (lse = log(exp(lse) + exp(lse_block))), or a block merged twice?")
    return (f"at query {rank * (queries.shape[2]) + int(i)}, head {int(h)} (batch {int(b)}) "
            f"the output is a mix of the key blocks {_list(used)} (ring steps "
            f"{_list([(rank - j) % p for j in used])}) with weights {_fmt(w)}, expected "
            f"{_fmt(rw)}: {why}")


def _ring_problem(sent, rank, p, numel) -> str | None:
    nxt, total = (rank + 1) % p, sum(n for _, n in sent)
    wrong = sorted({dst for dst, _ in sent if dst != nxt})
    if wrong:
        return (f"sent to rank(s) {_list(wrong)}; in the ring each rank sends only to the next "
                f"one, (rank + 1) % p = {nxt}")
    if total != (p - 1) * numel:
        return (f"sent {total} values through dist.isend/send; a ring passes its k and v "
                f"({numel} values) on at each of the p - 1 = {p - 1} steps: {(p - 1) * numel}")
    return None


def _first_wrong(got, want, first, dtype) -> str:
    bad = ~torch.isclose(got.double(), want, **_tolerance(dtype)) | ~torch.isfinite(got)
    b, h, i, _ = (int(x) for x in bad.nonzero()[0])
    return (f"at query {first + i}, head {h} (batch {b}) the output is {_fmt(got[b, h, i])}, "
            f"expected {_fmt(want[b, h, i])}")


def _wrong(name, got, want, dtype, variants) -> str | None:
    if _close(got, want, dtype):
        return None
    if not torch.isfinite(got[torch.isfinite(want)]).all():
        return (f"{name} holds nan or inf: exp() of an lse overflowed; subtract the larger "
                "lse first (m = max(lse_a, lse_b)), or use torch.logaddexp")
    at = tuple((~torch.isclose(got.double(), want, **_tolerance(dtype))).nonzero()[0].tolist())
    said = (f"{name}[{', '.join(map(str, at))}] is {float(got[at]):.6g}, expected "
            f"{float(want[at]):.6g}")
    for explanation, variant in variants.items():
        if _close(got, variant, dtype):
            return f"{said}: that is {explanation}"
    return said


def _library() -> tuple[str, ...]:
    """Every function distlab's context parallelism (:data:`LIBRARY`) defines, its classes'
    methods (the ring's autograd Function) too."""
    found = [importlib.import_module(m) for m in LIBRARY if importlib.util.find_spec(m)]
    owners = [(m.__name__, m) for m in found] + [(f"{m.__name__}.{n}", c) for m in found
                                                 for n, c in vars(m).items() if inspect.isclass(c)]
    return tuple(f"{at}.{n}" for at, owner in owners for n in vars(owner) if n[:2] != "__"
                 and inspect.isfunction(inspect.unwrap(getattr(owner, n)))
                 and getattr(owner, n).__module__ in LIBRARY)


def _tolerance(dtype) -> dict:
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def _close(got, want, dtype) -> bool:
    return bool(torch.isfinite(got[torch.isfinite(want)]).all()) and torch.allclose(
        got.double(), want.double(), equal_nan=True, **_tolerance(dtype))


def _fmt(t) -> str:
    values = t.reshape(-1).tolist()
    return "[" + ", ".join(f"{x:.4g}" for x in values[:4]) + (", ...]" if len(values) > 4 else "]")


def _list(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
