"""Pipeline schedules: the orders of work, their bubbles and memory, and every schedule on
real processes against the unsplit model.

The orders are checked without processes (complete, dependencies respected, simulated
bubble equal to each paper's formula); two launches at 2 ranks and one at 4 run them.
"""
import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import distlab
from distlab.model_parallel import pipeline as pp
from distlab.model_parallel import schedules as sc
from distlab.model_parallel.timeline import measured_bubble
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(150)

EVERY = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1))   # (schedule, v)
MLP = Workload("mlp", hidden=16, depth=3, batch_size=24, num_steps=2, lr=0.5)   # 7 layers


def key(op):
    return op.microbatch, op.chunk


@pytest.mark.parametrize("p,m,v", [(1, 3, 2), (2, 2, 2), (2, 4, 3), (3, 6, 2), (4, 8, 2),
                                   (4, 4, 1)])
def test_every_order_does_each_pass_once_after_the_pass_it_needs(p, m, v):
    for name in sc.ALL_SCHEDULES:
        chunks = v if name == "interleaved" else 1
        kinds = ("F", "B", "W") if name in sc.SPLIT_BACKWARD else ("F", "B")
        for s in range(p):
            order = sc.ops(name, p, m, s, chunks)
            every = [sc.Op(k, i, c) for k in kinds for i in range(m) for c in range(chunks)]
            assert sorted(order) == sorted(every), (name, s)
            at = {op: n for n, op in enumerate(order)}
            for i in range(m):
                for c in range(chunks):
                    steps = [at[sc.Op(k, i, c)] for k in kinds]
                    assert steps == sorted(steps), (name, s, i, c)
        sc.simulate(name, p, m, chunks)          # raises if the orders deadlock


@pytest.mark.parametrize("p,m", [(2, 2), (2, 4), (3, 3), (3, 6), (4, 4), (4, 8), (4, 12)])
def test_simulated_bubble_is_each_papers_formula(p, m):
    # With ideal timings (F : B : W = 1 : 1 : 1, no message cost) each order's idle share is
    # exactly its formula: (p-1)/m, (p-1)/(v m), (p-1)(F+B-W)/(m(F+B+W)) in ideal-time
    # units b, measured as the share b/(1+b) of the step (ZB-H1's needs m >= p).
    for name, v in EVERY + (("interleaved", 3),):
        got = measured_bubble(sc.simulate(name, p, m, v))
        assert got == pytest.approx(sc.bubble_formula(name, p, m, v), abs=1e-12), name
    assert sc.bubble_formula("1f1b", p, m) == pytest.approx((p - 1) / (m + p - 1))
    assert sc.bubble_formula("interleaved", p, m, 2) == pytest.approx((p - 1) / (2 * m + p - 1))
    assert sc.bubble_formula("zb-h1", p, m) == pytest.approx((p - 1) / (3 * m + p - 1))


def test_zb_h1_holds_1f1b_peak_and_interleaving_holds_more():
    p, m = 4, 8
    peak = {name: [sc.peak_in_flight(sc.ops(name, p, m, s, v)) for s in range(p)]
            for name, v in EVERY}
    assert peak["1f1b"] == [4, 3, 2, 1] and peak["gpipe"] == [8] * 4       # p - s; m
    # ZB-H1 (Qi et al. section 3.1): W later on later stages, so each stage holds p
    # microbatches, the most 1F1B holds anywhere (stage 0): the same peak memory.
    assert peak["zb-h1"] == [4] * 4 and max(peak["zb-h1"]) == max(peak["1f1b"])
    # Interleaved: (microbatch, chunk) pairs of 1/v of a stage each; more than 1F1B's.
    assert peak["interleaved"] == [11, 9, 7, 5]
    assert all(n / 2 > f for n, f in zip(peak["interleaved"], peak["1f1b"]))


def test_interleaving_microbatches_not_a_multiple_of_the_stages_is_refused():
    with pytest.raises(ValueError, match=r"num_microbatches=3 is out of range; allowed a "
                                         r"multiple of num_stages=2 under schedule 'interleaved'"):
        pp.PipelineConfig(MLP, 2, 3, "interleaved", virtual_stages=2)
    with pytest.raises(ValueError, match=r"num_microbatches=3 .* multiple of num_stages=2"):
        sc.ops("interleaved", 2, 3, 0, 2)
    with pytest.raises(ValueError, match=r"virtual_stages=0 is out of range"):
        pp.PipelineConfig(MLP, 2, 4, "interleaved", virtual_stages=0)
    with pytest.raises(ValueError, match=r"virtual_stages=4 is out of range; allowed at "
                                         r"most 3 on 2 stages"):
        pp.PipelineConfig(MLP, 2, 4, "interleaved", virtual_stages=4)     # 8 chunks, 7 layers
    with pytest.raises(ValueError, match=r"needs 2 module\(s\) per stage"):
        pp.PipelineStage(torch.nn.Linear(2, 2), 0,
                         pp.PipelineConfig(MLP, 2, 4, "interleaved", virtual_stages=2))


def build(workload, frozen):
    """The workload's model; ``frozen``: its first two linears frozen (a frozen stage 0, a
    frozen chunk 0 when interleaved)."""
    model = workload.build_model()
    if frozen:
        for i in (0, 2):
            model[i].requires_grad_(False)
    return model


def train_schedules(workload, cases):
    """Runs on every rank: each (schedule, v, frozen) trained; per case, this rank's losses
    and its layers' final state, keyed by the layer's index in the unsplit model."""
    rank, p = dist.get_rank(), dist.get_world_size()
    out = []
    for schedule, v, frozen in cases:
        config = pp.PipelineConfig(workload, p, 4, schedule, virtual_stages=v)
        model = build(workload, frozen)
        stage = pp.PipelineStage(sc.stage_layers(model, p, rank, config.chunks), rank, config)
        params = [q for q in stage.layers.parameters() if q.requires_grad]
        optimizer = workload.optimizer(params) if params else None
        losses = []
        for X, y in workload.batches():
            losses.append(stage.train_step(X, y, workload.loss))
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()
        mine = [i for r in sc.partition(len(model), p * config.chunks)[rank::p] for i in r]
        out.append((losses, {f"{i}.{k}": t for i in mine
                             for k, t in model[i].state_dict().items()}))
    return out


def unsplit(workload, frozen):
    """The reference: the unsplit model's losses and final state."""
    model = build(workload, frozen)
    optimizer = workload.optimizer([q for q in model.parameters() if q.requires_grad])
    losses = []
    for X, y in workload.batches():
        loss = workload.loss(model(X), y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses, model.state_dict()


def assert_schedules_match_unsplit(workload, world_size, cases):
    results = distlab.launch(train_schedules, world_size, workload, cases, timeout=120)
    for n, (schedule, v, frozen) in enumerate(cases):
        want_losses, want_state = unsplit(workload, frozen)
        assert_close(results[-1][n][0], want_losses, rtol=1e-5, atol=1e-6,
                     msg=lambda msg: f"{schedule} frozen={frozen} losses: {msg}")
        assert all(r[n][0] == [None] * workload.num_steps for r in results[:-1])
        state = {k: t for r in results for k, t in r[n][1].items()}
        assert state.keys() == want_state.keys()
        for k, t in state.items():
            assert_close(t, want_state[k], rtol=1e-5, atol=1e-6,
                         msg=lambda msg: f"{schedule} frozen={frozen} {k}: {msg}")


def test_every_schedule_trains_like_the_unsplit_model_including_a_frozen_stage():
    cases = [(s, v, frozen) for s, v in EVERY for frozen in (False, True)]
    assert_schedules_match_unsplit(MLP.loaded(), 2, cases)


def test_interleaved_and_zero_bubble_on_four_stages_train_like_the_unsplit_model():
    deeper = Workload("mlp", hidden=16, depth=4, batch_size=16, num_steps=2, lr=0.5)  # 9 layers
    assert_schedules_match_unsplit(deeper.loaded(), 4,
                                   [("interleaved", 2, False), ("zb-h1", 1, False)])


@pytest.fixture(scope="module")
def measured():
    """Every schedule at p = 2, m = 2 (v = 2), one launch; compute_delay (F : B : W = 1 : 1 :
    1 of 40 ms a stage) makes the schedule, not the machine, set the timing."""
    wl = Workload("mlp", hidden=16, depth=3, batch_size=8, num_steps=2).loaded()
    configs = [pp.PipelineConfig(wl, 2, 2, s, compute_delay=0.04, virtual_stages=v)
               for s, v in EVERY]
    per_rank = distlab.launch(pp.sweep, 2, configs, timeout=120)
    table = sc.compare_schedules([[per_rank[r][k] for r in range(2)]
                                  for k in range(len(configs))])
    return table, [[per_rank[r][k] for r in range(2)] for k in range(len(configs))]


def test_measured_bubble_follows_each_formula_and_their_order(measured):
    table, _ = measured
    bubble = table.groupby("schedule")[["measured_bubble", "formula_bubble"]].first()
    print(bubble)                      # the closing note quotes these
    for name, row in bubble.iterrows():
        # Messages and Python only add idle time: at most 0.1 of the step on top.
        assert row.formula_bubble - 0.03 <= row.measured_bubble <= row.formula_bubble + 0.1, name
    assert bubble.measured_bubble["zb-h1"] < bubble.measured_bubble["1f1b"]
    assert bubble.measured_bubble["interleaved"] < bubble.measured_bubble["1f1b"]


def test_measured_peak_activations_are_the_orders_peaks(measured):
    table, _ = measured
    assert (table.peak_activations == table.predicted_peak_activations).all(), table
    peak = table.set_index(["schedule", "stage"]).peak_activations
    assert [peak["1f1b", s] for s in (0, 1)] == [2, 1]
    assert [peak["zb-h1", s] for s in (0, 1)] == [2, 2]
    assert [peak["interleaved", s] for s in (0, 1)] == [4, 3]


def test_timeline_names_each_pass_and_chunk(measured):
    _, runs = measured
    zb, interleaved = runs[3], runs[2]
    ops = {(e["op"], e["microbatch"]) for r in zb for e in r["events"] if "op" in e}
    assert ops == {(k, i) for k in "FBW" for i in range(2)}
    assert {e["chunk"] for r in interleaved for e in r["events"] if "op" in e} == {0, 1}
