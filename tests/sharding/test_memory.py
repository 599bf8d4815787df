"""Memory accounting: ZeRO's formulas, and what each rank really holds at each stage."""
import pytest
import torch

from distlab.sharding import memory

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


@pytest.mark.parametrize("call, match", [
    (lambda: memory.predicted_bytes(1000, 1, 0), r"world_size=0 is out of range; allowed an int >= 1"),
    (lambda: memory.predicted_bytes(-1, 1, 2), r"num_params=-1 is out of range"),
    (lambda: memory.predicted_bytes(1000, True, 2), r"stage=True is out of range"),
    (lambda: memory.predicted_bytes(1000, 1, 2, param_bytes=0), r"param_bytes=0 is out of range"),
    (lambda: memory.paper_bytes(7.5e9, 1, 0), r"world_size=0 is out of range"),
    (lambda: memory.paper_bytes(7.5e9, 1, 64, k=-2), r"k=-2 is out of range"),
])
def test_memory_formulas_refuse_bad_numbers_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()
