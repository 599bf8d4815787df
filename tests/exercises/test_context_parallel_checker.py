"""Lab 11's checkers (distlab.exercises.context_parallel): they pass the lab's own solutions,
and name the rank, the key block or ring step, and expected against got, of the classic
mistakes, with the points each share earns."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distlab.course.grading import lab_solutions
from distlab.exercises import context_parallel as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "11_model_parallelism_at_scale.ipynb"

SOLVED = lab_solutions(LAB)
merge, ring_attention = SOLVED["merge_partial_attention"], SOLVED["ring_attention"]


# -- part A -------------------------------------------------------------------------------

def test_part_a_checker_accepts_the_labs_solution():
    verdict = exercise.check_merge(merge, points=3)
    assert verdict.ok and verdict.points == 3, verdict


def test_part_a_checker_says_a_merge_without_the_max_overflows():
    def unscaled(out_a, lse_a, out_b, lse_b):
        w_a, w_b = torch.exp(lse_a), torch.exp(lse_b)           # e^100: inf in float32
        out = (w_a[..., None] * out_a + w_b[..., None] * out_b) / (w_a + w_b)[..., None]
        return out, torch.log(w_a + w_b)
    verdict = exercise.check_merge(unscaled, points=3)
    assert not verdict and verdict.points == 0, verdict
    assert "out holds nan or inf: exp() of an lse overflowed" in verdict.message
    assert exercise.check_merge(unscaled, points=3, lse_shift=0.0).ok     # small scores: fine


def test_part_a_checker_gives_the_output_share_when_the_lse_is_not_updated():
    def stale(out_a, lse_a, out_b, lse_b):
        return merge(out_a, lse_a, out_b, lse_b)[0], lse_a
    verdict = exercise.check_merge(stale, points=3)
    assert not verdict and verdict.points == 2, verdict
    assert "lse[0, 0, 0] is" in verdict.message and "that is lse_a" in verdict.message


def test_part_a_checker_says_a_stub_is_not_implemented_yet():
    def merge_partial_attention(out_a, lse_a, out_b, lse_b):
        raise NotImplementedError()
    verdict = exercise.check_merge(merge_partial_attention, points=3)
    assert not verdict and "not implemented yet" in verdict.message and verdict.max_points == 3


# -- part B -------------------------------------------------------------------------------

def test_part_b_checker_accepts_the_labs_solution():
    verdict = exercise.check_ring_attention(ring_attention, points=7)
    assert verdict.ok and verdict.points == 7, verdict


def _ring(q, k, v, causal, merge_fn=merge, diagonal_mask_everywhere=False, skip_earlier=False,
          recv_from=-1, send_last=False, scale=None):
    """Ring attention with the mistakes the tests switch on (the right one without)."""
    rank, p = dist.get_rank(), dist.get_world_size()
    out = lse = None
    for step in range(p):
        source, last = (rank - step) % p, step == p - 1
        if send_last or not last:
            sends = [dist.isend(t.contiguous(), (rank + 1) % p) for t in (k, v)]
            next_k, next_v = torch.empty_like(k), torch.empty_like(v)
        later = source < rank if skip_earlier else source > rank
        if not (causal and later):
            scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
            if causal and (source == rank or diagonal_mask_everywhere):
                above = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
                scores = scores.masked_fill(above, float("-inf"))
            block = torch.softmax(scores, -1) @ v, scores.logsumexp(-1)
            out, lse = block if out is None else merge_fn(out, lse, *block)
        if send_last or not last:
            dist.recv(next_k, (rank + recv_from) % p)
            dist.recv(next_v, (rank + recv_from) % p)
            for request in sends:
                request.wait()
            k, v = next_k, next_v
    return out


def test_part_b_checker_names_the_block_weights_when_the_running_lse_is_not_updated():
    def stale_lse(q, k, v, group=None, causal=False):
        return _ring(q, k, v, causal, merge_fn=lambda o, l, bo, bl: (merge(o, l, bo, bl)[0], l))
    verdict = exercise.check_ring_attention(stale_lse, points=7, world_size=3, causal=False,
                                            seq_len=6)
    assert not verdict and verdict.points == 0, verdict
    assert "3 ranks, not causal, T=6 (2 per rank), float32: rank 0 (queries 0..1): at query" \
        in verdict.message
    assert "the output is a mix of the key blocks 0, 1 and 2 (ring steps 0, 2 and 1)" \
        in verdict.message
    assert "they add up to 1 but are shared wrongly: was the running lse not updated" \
        in verdict.message


def test_part_b_checker_says_the_partial_outputs_were_added_without_rescaling():
    def added(q, k, v, group=None, causal=False):
        return _ring(q, k, v, causal, merge_fn=lambda o, l, bo, bl: (o + bo, l))
    verdict = exercise.check_ring_attention(added, points=7)
    assert not verdict and verdict.points == 0, verdict
    assert "rank 1 (queries 4..7): at query 4, head 1" in verdict.message
    assert "they add up to 2, not 1: rescale both partial outputs" in verdict.message


@pytest.mark.parametrize("mistake, said", [
    (dict(diagonal_mask_everywhere=True),
     "rank 1 (queries 4..7): the diagonal block's mask was applied to every block"),
    (dict(skip_earlier=True), "rank 0 (queries 0..3): the key blocks j > r were used"),
])
def test_part_b_checker_names_the_causal_mask_on_the_wrong_blocks(mistake, said):
    def masked(q, k, v, group=None, causal=False):
        return _ring(q, k, v, causal, **mistake)
    verdict = exercise.check_ring_attention(masked, points=7)
    assert not verdict and verdict.points == 0, verdict
    assert said in verdict.message and "expected [" in verdict.message


def test_part_b_checker_says_the_scores_were_not_scaled():
    def unscaled(q, k, v, group=None, causal=False):
        return _ring(q, k, v, causal, scale=1.0)
    verdict = exercise.check_ring_attention(unscaled, points=7)
    assert not verdict and verdict.points == 0, verdict
    assert "rank 0 (queries 0..3): the scores were not divided by sqrt(d) = 2.82843" \
        in verdict.message


def test_part_b_checker_names_the_missing_message_of_a_receive_from_the_wrong_neighbour(
        monkeypatch):
    monkeypatch.setattr(exercise, "WAIT", 2.0)     # each rank gives up after 2 s, not 10

    def wrong_neighbour(q, k, v, group=None, causal=False):
        return _ring(q, k, v, causal, recv_from=+1)
    verdict = exercise.check_ring_attention(wrong_neighbour, points=7, world_size=3,
                                            causal=False, seq_len=6)
    assert not verdict and verdict.points == 0, verdict
    assert "waited 2 s for the message from rank" in verdict.message
    assert exercise.HANG_HINT in verdict.message


def test_part_b_checker_takes_the_ring_point_for_a_send_at_the_last_step():
    def one_send_too_many(q, k, v, group=None, causal=False):
        return _ring(q, k, v, causal, send_last=True)
    verdict = exercise.check_ring_attention(one_send_too_many, points=7)
    assert not verdict and verdict.points == 6, verdict
    assert "every output shard is right, but rank 0 sent 512 values" in verdict.message


def test_part_b_checker_refuses_gathering_the_keys():
    def gathered(q, k, v, group=None, causal=False):
        keys = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(keys, k)
        return q
    verdict = exercise.check_ring_attention(gathered, points=7)
    assert not verdict and verdict.points == 0
    assert "torch.distributed.all_gather is off limits in this assignment" in verdict.message


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=3, seq_len=8), r"seq_len=8 is out of range.*divisible by world_size=3"),
    (dict(causal=1), r"causal=1 is out of range"),
    (dict(dtype=torch.float16), r"dtype=torch.float16 is out of range"),
])
def test_part_b_checker_refuses_bad_cases_before_any_process_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        exercise.check_ring_attention(ring_attention, points=7, **kwargs)



def merge_partial_attention(out_a, lse_a, out_b, lse_b):     # part A, as released
    raise NotImplementedError()


def test_part_b_checker_says_part_a_is_not_implemented_when_part_b_calls_its_stub():
    def ring_attention(q, k, v, group=None, causal=False):
        return merge_partial_attention(q, None, q, None)[0]
    verdict = exercise.check_ring_attention(ring_attention, points=7)
    assert not verdict and verdict.max_points == 7
    assert "calls your merge_partial_attention, which is not implemented yet" in verdict.message
