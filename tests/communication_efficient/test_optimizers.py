"""LAMB against a straightforward reference; 1-bit Adam on 2 and 4 real ranks against a
single-process simulation, with its compressed bytes counted exactly."""
import math

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


@pytest.mark.parametrize("kwargs, field", [({"lr": 0.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"),
                                           ({"weight_decay": -1.0}, "weight_decay")])
def test_lamb_refuses_bad_hyperparameters(kwargs, field):
    with pytest.raises(ValueError, match=f"LAMB.{field}"):
        LAMB([nn.Parameter(torch.zeros(1))], **kwargs)


def test_onebit_adam_refuses_bad_warmup():
    with pytest.raises(ValueError, match="OneBitAdam.warmup_steps=0"):
        OneBitAdam([nn.Parameter(torch.zeros(1))], warmup_steps=0)


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
        update = (m / (1 - b1 ** t)) / (v_hat.sqrt() + eps)
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
