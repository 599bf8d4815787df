"""LAMB against a straightforward reference; 1-bit Adam against updates worked out by hand
from Tang et al. 2021 (algorithm 1), and on 2 and 4 real ranks against a single-process
simulation, with its compressed bytes counted exactly; bad hyperparameters refused."""
import math
import re

import pytest
import torch
from torch import nn

import distlab
from distlab import comm
from distlab.communication_efficient.compression import Sign
from distlab.communication_efficient.optimizers import LAMB, OneBitAdam


def lamb_reference(ws, grads_per_step, lr, b1, b2, eps, wd):
    """LAMB written out for a list of tensors, straight from You et al. 2019, algorithm 2."""
    ws = [w.clone() for w in ws]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            m_hat, v_hat = ms[i] / (1 - b1 ** t), vs[i] / (1 - b2 ** t)
            r = m_hat / (torch.sqrt(v_hat) + eps) + wd * ws[i]
            wn, rn = torch.linalg.norm(ws[i]), torch.linalg.norm(r)
            ratio = wn / rn if (wn > 0 and rn > 0) else 1.0
            ws[i] = ws[i] - lr * ratio * r
    return ws


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_matches_the_reference(wd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    nn.init.zeros_(model[2].bias)                 # a zero-norm layer: trust ratio 1
    start = [p.detach().clone() for p in model.parameters()]
    opt = LAMB(model.parameters(), lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    X, y = torch.randn(16, 5), torch.randn(16, 2)
    grads_seen = []
    for _ in range(6):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        grads_seen.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    # replay the same gradients through the reference
    want = lamb_reference(start, grads_seen, 0.05, 0.8, 0.99, 1e-6, wd)
    for got, w in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), w)


def test_lamb_moves_each_layer_by_lr_times_its_norm():
    w = nn.Parameter(torch.full((10,), 3.0))
    opt = LAMB([w], lr=0.1)
    w.grad = torch.randn(10)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close((w.detach() - before).norm(), 0.1 * before.norm())


@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("lr", True), ("lr", float("nan")), ("betas", (1.0, 0.9)), ("betas", (0.9,)),
    ("eps", -1e-8), ("weight_decay", -1.0)])
def test_lamb_refuses_bad_hyperparameters(field, value):
    with pytest.raises(ValueError, match=re.escape(f"LAMB.{field}={value!r} is out of range")):
        LAMB([nn.Parameter(torch.zeros(1))], **{field: value})


@pytest.mark.parametrize("field, value", [
    ("warmup_steps", 0), ("warmup_steps", 2.5), ("lr", True), ("betas", (0.9, 1.5)),
    ("eps", -1.0), ("compressor", "sign")])
def test_onebit_adam_refuses_bad_hyperparameters(field, value):
    with pytest.raises(ValueError,
                       match=re.escape(f"OneBitAdam.{field}={value!r} is out of range")):
        OneBitAdam([nn.Parameter(torch.zeros(1))], **{field: value})


def test_onebit_adam_refuses_parameters_that_are_not_float32():
    with pytest.raises(ValueError, match="float64 parameter: cast the model to float32"):
        OneBitAdam([nn.Parameter(torch.zeros(1, dtype=torch.float64))])


# -- 1-bit Adam, worked out by hand ----------------------------------------------------------
# Tang et al. 2021, algorithm 1, with lr = 0.1, b1 = b2 = 0.5, eps = 0, one warm-up step and
# w = [0, 0]. Warm-up (plain Adam on the mean gradient g = [2, 4]): m = [1, 2],
# v_hat = g^2 = [4, 16] (frozen: denominator sqrt(v_hat) = [2, 4]), step m_hat/sqrt(v_hat)
# = [1, 1], so w = [-0.1, -0.1]. Afterwards each rank r: m_r = 0.5 m + 0.5 g_r; the ranks
# average m_r / [2, 4] compressed with error feedback (what the sign compressor sends is
# mean|c| · sign(c)); m = that average · [2, 4]; w -= 0.1 · m / [2, 4], no bias correction.

HAND_LR, HAND_BETAS = 0.1, (0.5, 0.5)


def _hand_worker(grads_per_rank):
    import torch.distributed as dist
    w = nn.Parameter(torch.zeros(2))
    opt = OneBitAdam([w], lr=HAND_LR, betas=HAND_BETAS, eps=0.0, warmup_steps=1)
    out = []
    for g in grads_per_rank[dist.get_rank()]:
        w.grad = torch.tensor(g)
        opt.step()
        out.append(w.detach().clone())
    return out, opt.m.clone(), opt.residual.clone()


def test_onebit_adam_takes_the_papers_steps_when_compression_is_exact():
    # Step 2: m_0 = [3.5, 7] -> [1.75, 1.75], m_1 = [-0.5, -1] -> [-0.25, -0.25] (equal
    # magnitudes: the sign compressor is exact); mean [0.75, 0.75], w = -0.1 - 0.075.
    # Step 3: m = [1.5, 3]; m_0 = [1.25, 2.5] -> [0.625, 0.625], m_1 = [-0.75, -1.5] ->
    # [-0.375, -0.375]; mean [0.125, 0.125], w = -0.175 - 0.0125.
    grads = [[[2.0, 4.0], [6.0, 12.0], [1.0, 2.0]],
             [[2.0, 4.0], [-2.0, -4.0], [-3.0, -6.0]]]
    want = [[-0.1, -0.1], [-0.175, -0.175], [-0.1875, -0.1875]]
    for rank, (ws, m, residual) in enumerate(distlab.launch(_hand_worker, 2, grads, timeout=60)):
        for t, (got, expected) in enumerate(zip(ws, want), start=1):
            torch.testing.assert_close(got, torch.tensor(expected), msg=f"rank {rank} step {t}")
        torch.testing.assert_close(m, torch.tensor([0.25, 0.5]))     # [0.125, 0.125] · [2, 4]
        torch.testing.assert_close(residual, torch.zeros(2))


def test_onebit_adam_carries_what_the_sign_did_not_send_to_the_next_step():
    # One rank. Step 2: m_r = [7.5, 3] -> c = [3.75, 0.75]; sent 2.25 · [1, 1], residual
    # [1.5, -1.5]; m = [4.5, 9]; w = -0.1 - 0.225. Step 3: m_r = [-2.25, -4.5] ->
    # [-1.125, -1.125], plus the residual c = [0.375, -2.625]; sent 1.5 · [1, -1], residual
    # [-1.125, -1.125]; m = [3, -6]; w = -0.325 - 0.1 · [1.5, -1.5].
    grads = [[[2.0, 4.0], [14.0, 4.0], [-9.0, -18.0]]]
    want = [[-0.1, -0.1], [-0.325, -0.325], [-0.475, -0.175]]
    [(ws, m, residual)] = distlab.launch(_hand_worker, 1, grads, timeout=60)
    for t, (got, expected) in enumerate(zip(ws, want), start=1):
        torch.testing.assert_close(got, torch.tensor(expected), msg=f"step {t}")
    torch.testing.assert_close(m, torch.tensor([3.0, -6.0]))
    torch.testing.assert_close(residual, torch.tensor([-1.125, -1.125]))


# -- 1-bit Adam on a model, against one process playing every rank --------------------------

STEPS, WARMUP, LR = 8, 3, 0.05


def _data(rank):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def _worker():
    import torch.distributed as dist
    X, y = _data(dist.get_rank())
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=LR, warmup_steps=WARMUP)
    params, sent = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        before = comm.ledger().totals()["bytes_sent"]
        opt.step()
        sent.append(comm.ledger().totals()["bytes_sent"] - before)
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return params, sent


def _simulate(world_size, b1=0.9, b2=0.999, eps=1e-3):
    """1-bit Adam with every rank played in one process."""
    model = _model()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    m, v = torch.zeros(n), torch.zeros(n)
    residuals = [torch.zeros(n) for _ in range(world_size)]
    out = []
    for t in range(1, STEPS + 1):
        grads = []
        for r in range(world_size):
            X, y = _data(r)
            g = torch.autograd.grad(((model(X) - y) ** 2).mean(), params)
            grads.append(torch.cat([x.reshape(-1) for x in g]))
        if t <= WARMUP:
            g = torch.stack(grads).mean(0)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            v_hat = v / (1 - b2 ** t)
            if t == WARMUP:
                v = v_hat                                   # frozen from now on
        else:
            sent, denom = [], v.sqrt() + eps
            for r in range(world_size):
                c = (b1 * m + (1 - b1) * grads[r]) / denom + residuals[r]
                s = Sign().decompress(Sign().compress(c), n)
                residuals[r] = c - s
                sent.append(s)
            m, v_hat = torch.stack(sent).mean(0) * denom, v
        # Adam's bias corrections in the warm-up only (Tang et al. 2021, algorithm 1)
        m_hat = m / (1 - b1 ** t) if t <= WARMUP else m
        update = m_hat / (v_hat.sqrt() + eps)
        with torch.no_grad():
            flat = torch.cat([p.reshape(-1) for p in params]) - LR * update
            offset = 0
            for p in params:
                p.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        out.append(flat.clone())
    return out, n


@pytest.mark.parametrize("world_size", [2, 4])
def test_onebit_adam_matches_simulation_and_sends_one_bit_per_coordinate(world_size):
    results = distlab.launch(_worker, world_size, timeout=60)
    want, n = _simulate(world_size)
    for rank, (params, sent) in enumerate(results):
        for t in range(STEPS):
            torch.testing.assert_close(params[t], want[t], msg=f"rank {rank} step {t + 1}")
        full = 2 * (world_size - 1) * 4 * n // world_size
        one_bit = (world_size - 1) * (math.ceil(n / 8) + 4)
        assert sent == [full] * WARMUP + [one_bit] * (STEPS - WARMUP)
