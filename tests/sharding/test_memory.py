"""Memory accounting: ZeRO's formulas, and what each rank really holds at each stage."""
import pytest
import torch

from distlab.sharding import memory
from distlab.course import lab04_sharding as zero_lab

pytestmark = pytest.mark.timeout(180)


def test_paper_figure_1():
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N = 64, K = 12."""
    gb = [memory.paper_bytes(7.5e9, stage, 64) / 1e9 for stage in range(4)]
    assert [round(g, 1) for g in gb] == [120.0, 31.4, 16.6, 1.9]


def test_fp32_formula():
    psi, n = 1000, 4
    assert memory.predicted_bytes(psi, 0, n, "adam") == dict(
        params=4000, grads=4000, optimizer_state=8000)
    assert memory.predicted_bytes(psi, 1, n, "sgd") == dict(
        params=4000, grads=4000, optimizer_state=1000)
    assert memory.predicted_bytes(psi, 2, n, "adamw") == dict(
        params=4000, grads=1000, optimizer_state=2000)
    assert memory.predicted_bytes(psi, 3, n, "adam") == dict(
        params=1000, grads=1000, optimizer_state=2000)
    with pytest.raises(ValueError, match="stage=4"):
        memory.predicted_bytes(psi, 4, n)


def test_measure_counts_each_storage_once():
    net = torch.nn.Linear(10, 10)                # 110 params
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 10)).sum().backward()
    opt.step()
    m = memory.measure(net, opt)
    assert m["params"] == m["grads"] == 440
    assert m["optimizer_state"] == 880 + 2 * 4   # m, v and a 4-byte step per tensor


def test_config_is_validated_before_any_process_starts():
    with pytest.raises(ValueError, match=r"ZeroConfig.stage=5 .* allowed 0, 1, 2 or 3"):
        zero_lab.ZeroConfig(stage=5)
    with pytest.raises(ValueError, match="ZeroConfig.optimizer='lamb'"):
        zero_lab.start_training(2, optimizer="lamb")
    with pytest.raises(ValueError, match="batch_size=63 must be divisible by world_size=2"):
        zero_lab.start_training(2, batch_size=63)


@pytest.fixture(scope="module")
def sweep():
    return zero_lab.sweep(world_sizes=(4,), hidden=32)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_measured_memory_matches_formula(sweep, stage):
    """Every rank, every category: within padding (< N elements per tensor) of the formula."""
    rows = sweep[(sweep.stage == stage) & sweep.category.isin(memory.CATEGORIES)]
    assert len(rows) == 4 * 3
    for r in rows.itertuples():
        slack = 6 * 4 * 4 + (6 * 4 if r.category == "optimizer_state" else 0)  # pads, steps
        assert r.measured <= r.predicted + slack, r
        assert r.measured >= r.predicted * 0.95, r


def test_optimizer_state_per_rank_falls_as_one_over_n(sweep):
    opt = sweep[sweep.category == "optimizer_state"].groupby("stage").measured.max()
    full = opt[0]
    for stage in (1, 2, 3):
        assert opt[stage] <= 1.05 * full / 4, (stage, opt[stage], full)


def test_communication_per_step(sweep):
    """Stages 0-2 move 2Ψ·(N-1)/N bytes per rank; stage 3 at most 3Ψ·(N-1)/N (backward
    gathers again only the parameters autograd saved)."""
    sent = sweep[sweep.category == "bytes_sent"].groupby("stage")[["measured", "predicted"]].max()
    for stage in (0, 1, 2):
        assert sent.measured[stage] == pytest.approx(sent.predicted[stage], rel=0.01)
    assert sent.predicted[1] < sent.measured[3] <= sent.predicted[3] * 1.01


def test_figures(sweep):
    fig = zero_lab.memory_figure(sweep)
    assert len(fig.data) == 6                    # 3 categories, measured and predicted
    assert len(zero_lab.comm_figure(sweep).data) == 2
