import pytest

import distlab
from distlab.memory.activations import activation_bytes
from distlab.model_parallel import three_d
from distlab.model_parallel.three_d import ThreeDConfig
from distlab.planning.cluster import Cluster, Device, ModelSpec
from distlab.planning.planner import (HEADER_BYTES, Plan, enumerate_plans, pipeline_messages,
                                      predict, rank_plans, tensor_parallel_all_reduces)
from distlab.problems.workloads import Workload
from distlab.sharding.memory import predicted_bytes

MODEL = ModelSpec(num_layers=4, hidden=256, num_heads=8, seq_len=128, vocab=1000,
                  global_batch=16)


def cluster(n=8, per_node=8, memory=80e9, flops=1e14, **kw):
    return Cluster((n, Device(memory, flops)), devices_per_node=per_node, **kw)


def test_enumerate_plans_gives_every_factorisation_stage_and_microbatch_count():
    plans = enumerate_plans(MODEL, cluster(8))
    grids = {(p.dp, p.tp, p.pp) for p in plans}
    assert grids == {(dp, tp, pp) for dp in (1, 2, 4, 8) for tp in (1, 2, 4, 8)
                     for pp in (1, 2, 4) if dp * tp * pp == 8}
    assert {p.zero_stage for p in plans if p.dp == 1} == {0}
    assert {p.zero_stage for p in plans if p.dp == 8} == {0, 1, 2, 3}
    assert {p.microbatches for p in plans if p.dp == 4 and p.zero_stage == 0} == {1, 2, 4}
    assert len(plans) == len(set(plans))


def test_memory_is_zero_model_states_of_the_rank_shard_plus_activations_in_flight():
    plan = Plan(dp=2, tp=2, pp=2, zero_stage=2, microbatches=4)
    got = predict(plan, MODEL, cluster(8)).memory_per_rank
    states = predicted_bytes(MODEL.num_params / 4, 2, 2, "adam")
    for part in ("params", "grads", "optimizer_state"):
        assert got[part] == pytest.approx(states[part])
    one = activation_bytes(seq_len=128, batch_size=2, hidden=256, num_heads=8, num_layers=2,
                           bytes_per_value=4, tensor_parallel=2)
    assert got["activations"] == pytest.approx(2 * one)        # 1F1B: min(m, pp) in flight


def test_pipeline_bubble_is_the_fraction_p_minus_1_over_m_plus_p_minus_1():
    t = predict(Plan(dp=2, pp=4, microbatches=8), MODEL, cluster(8)).step_time
    assert t["bubble"] / (t["compute"] + t["bubble"]) == pytest.approx(3 / 11)


def test_tensor_parallel_across_nodes_pays_the_slower_link():
    links = dict(intra=(1e-6, 1e-12), inter=(1e-5, 1e-10))
    inside = predict(Plan(tp=8), MODEL, cluster(8, per_node=8, **links)).step_time
    across = predict(Plan(tp=8), MODEL, cluster(8, per_node=4, **links)).step_time
    assert across["tensor_parallel"] > 10 * inside["tensor_parallel"]


def test_zero_3_moves_one_and_a_half_times_the_gradient_bytes_of_plain_data_parallel():
    bandwidth_only = cluster(8, intra=(0.0, 1e-9), inter=(0.0, 1e-9))
    t = [predict(Plan(dp=8, zero_stage=s), MODEL, bandwidth_only).step_time["data_parallel"]
         for s in (0, 2, 3)]
    assert t[1] == pytest.approx(t[0]) and t[2] == pytest.approx(1.5 * t[0])


def test_compute_is_six_n_tokens_over_flops_split_by_the_plan():
    t = predict(Plan(dp=2, tp=4), MODEL, cluster(8, flops=1e12)).step_time["compute"]
    assert t == pytest.approx(6 * MODEL.num_params * 16 * 128 / (2 * 4 * 1e12))


def test_rank_plans_keeps_fitting_plans_fastest_first_and_says_why_others_drop():
    big = ModelSpec(num_layers=32, hidden=4096, num_heads=32, seq_len=2048, vocab=32000,
                    global_batch=64, mixed_precision=True)
    ranking = rank_plans(big, cluster(16, memory=40e9, flops=300e12))
    seconds = [p.seconds for p in ranking.fit]
    assert ranking.fit and seconds == sorted(seconds)
    assert all(p.memory_bytes <= 40e9 for p in ranking.fit)
    assert ranking.dropped and all(not p.fits and "GB per rank" in p.why for p in ranking.dropped)
    assert Plan(dp=16, zero_stage=0, microbatches=1) in {p.plan for p in ranking.dropped}


def test_heterogeneous_mode_gives_fast_replicas_more_and_takes_the_slowest_replica():
    mixed = Cluster([Device(80e9, 3e14)] * 2 + [Device(80e9, 1e14)] * 2)
    equal = predict(Plan(dp=4), MODEL, mixed)
    by_speed = predict(Plan(dp=4), MODEL, mixed, heterogeneous=True)
    assert equal.batch_shares == (4, 4, 4, 4) and by_speed.batch_shares == (6, 6, 2, 2)
    # the equal split waits for a slow replica: its 4 sequences at 1e14 FLOP/s
    assert equal.step_time["compute"] == pytest.approx(6 * MODEL.num_params * 4 * 128 / 1e14)
    assert by_speed.seconds < equal.seconds


def test_ranking_by_speed_skips_plans_with_more_microbatches_than_a_slow_replicas_share():
    mixed = Cluster([Device(80e9, 3e14)] * 2 + [Device(80e9, 1e14)] * 2)
    ranking = rank_plans(MODEL, mixed, heterogeneous=True)     # shares (6, 6, 2, 2) at dp=4
    plans = [p.plan for p in ranking.fit + ranking.dropped]
    assert plans and all(not (p.dp == 4 and p.microbatches > 2) for p in plans)
    assert any(p.dp == 4 and p.microbatches == 2 for p in plans)


def test_predict_refuses_a_plan_for_another_number_of_devices():
    with pytest.raises(ValueError, match="plan"):
        predict(Plan(dp=2), MODEL, cluster(8))
    with pytest.raises(ValueError, match="plan.tp"):
        predict(Plan(tp=16), MODEL, cluster(16))         # 8 heads


def test_plan_refuses_zero_stage_4():
    with pytest.raises(ValueError, match="zero_stage"):
        Plan(zero_stage=4)


def test_a_pipeline_transfer_costs_a_header_and_the_tensor_each_way():
    latency_only = cluster(8, intra=(1e-3, 0.0), inter=(1e-3, 0.0))
    t = predict(Plan(dp=2, pp=4, microbatches=4), MODEL, latency_only).step_time
    assert t["pipeline"] == pytest.approx(2 * 4 * 2 * 1e-3)    # 2m transfers, 2 messages each


def test_pipeline_and_tensor_parallel_messages_are_those_a_real_run_sends():
    lm = Workload("transformer", hidden=16, num_heads=4, depth=2, block_size=8, batch_size=8,
                  num_steps=1).loaded()
    pipe, tensor = ThreeDConfig(lm, 1, 1, 2, 2), ThreeDConfig(lm, 1, 2, 1, 2)
    results = distlab.launch(three_d.sweep, 2, [pipe, tensor], timeout=120)
    spec = ModelSpec.from_workload(lm)
    plan = Plan(pp=2, microbatches=2)
    sent = [r[0]["by_op"]["send"] for r in results]
    assert sum(s["calls"] for s in sent) == pipeline_messages(plan) == 8
    assert sum(r[0]["by_op"]["recv"]["calls"] for r in results) == pipeline_messages(plan)
    activation = 8 // 2 * 8 * 16 * 4            # one microbatch's (b, T, C) in fp32
    assert sum(s["bytes_sent"] for s in sent) == 2 * 2 * (HEADER_BYTES + activation)
    expected = tensor_parallel_all_reduces(Plan(tp=2, microbatches=2), spec)
    calls = [r[1]["by_op"]["all_reduce"]["calls"] for r in results]
    assert calls == [expected] * 2 == [16] * 2


def test_a_fixed_overhead_is_paid_per_microbatch_on_each_stages_share_of_the_layers():
    plain = predict(Plan(dp=2, pp=4, microbatches=4), MODEL, cluster(8)).step_time
    slow = Cluster((8, Device(80e9, 1e14, overhead=1e-3)))
    t = predict(Plan(dp=2, pp=4, microbatches=4), MODEL, slow).step_time
    assert t["compute"] == pytest.approx(plain["compute"] + 4 / 4 * 1e-3)


def test_the_bubble_stretches_the_tensor_parallel_all_reduces_with_the_compute():
    t = predict(Plan(tp=2, pp=4, microbatches=8), MODEL, cluster(8)).step_time
    assert t["tensor_parallel"] > 0
    assert t["bubble"] / (t["compute"] + t["tensor_parallel"]) == pytest.approx(3 / 8)
