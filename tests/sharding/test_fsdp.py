"""ZeRO stage 3 (fully sharded data parallel) against single-process training, 2 and 4 ranks.

The model mixes Embedding, LayerNorm, Linear, an activation, a custom layer class with its
own parameter, a parameter of the root module, a frozen layer and a tied output layer.
"""
import gc

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distlab
from distlab.sharding.fsdp import FullyShardedDataParallel

pytestmark = pytest.mark.timeout(240)
V, D = 11, 8


class Scale(nn.Module):
    """A custom layer: y = x * g."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.g


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc, self.scale = nn.LayerNorm(D), nn.Linear(D, D), Scale(D)

    def forward(self, h):
        return h + self.scale(torch.relu(self.fc(self.ln(h))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(0.1 * torch.randn(5, D))
        self.blocks = nn.Sequential(Block(), Block())
        self.frozen = nn.Linear(D, D)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.frozen(self.blocks(self.emb(idx) + self.pos)))


def data():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, V, (3, 8, 5), generator=g), torch.randint(0, V, (3, 8, 5), generator=g)


def loss_of(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def reference(steps=2, with_optimizer=False):
    net = Net()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.02,
                            weight_decay=0.1)
    X, Y = data()
    for s in range(steps):
        opt.zero_grad()
        loss_of(net(X[s]), Y[s]).backward()
        opt.step()
    return (net, opt) if with_optimizer else net


def scenarios(everything):
    rank, N = dist.get_rank(), dist.get_world_size()
    out, trained = {}, {}

    def check(name, fn):
        try:
            fn()
            out[name] = None
        except Exception as e:
            out[name] = f"rank {rank}: {type(e).__name__}: {e}"

    def train(unit_types=None, compute_dtype=None, groups=False):
        model = FullyShardedDataParallel(Net(), unit_types=unit_types,
                                         compute_dtype=compute_dtype)
        shards = model.shards_by_name()
        params = ([{"params": [s for n, s in shards.items() if "blocks" in n]},
                   {"params": [s for n, s in shards.items() if "blocks" not in n]}]
                  if groups else model.parameters())
        opt = torch.optim.AdamW(params, lr=0.02, weight_decay=0.1)
        X, Y = data()
        for s in range(2):
            logits = model(X[s].chunk(N)[rank])
            gc.collect()
            alive = [u for u in model.units.values() for w in u.last_gathered if w() is not None]
            assert not alive, f"full parameters of {len(alive)} unit(s) alive after forward"
            opt.zero_grad()
            loss_of(logits, Y[s].chunk(N)[rank]).backward()
            opt.step()
        trained["opt"] = opt
        return model

    def compare(model, within=None):
        """Equal to one process; or, with ``within``, nearer to it than ``within`` times the
        distance training moved it, over all parameters and over the output (so the
        untrained model, at 1, fails)."""
        ref, init = reference(), Net()
        full = model.full_state_dict()
        assert full.keys() == ref.state_dict().keys()
        X, _ = data()
        with torch.no_grad():                     # evaluation on the sharded model
            out, ref_out, init_out = model(X[0]), ref(X[0]), init(X[0])
        if within is None:
            for k, v in ref.state_dict().items():
                torch.testing.assert_close(full[k], v, msg=lambda m: f"{k}: {m}")
            torch.testing.assert_close(out, ref_out)
            return
        flat = lambda sd: torch.cat([sd[k].reshape(-1) for k in sorted(sd)])   # noqa: E731
        for what, got, want, untrained in (
                ("parameters", flat(full), flat(ref.state_dict()), flat(init.state_dict())),
                ("output", out, ref_out, init_out)):
            off, moved = (got - want).norm(), (want - untrained).norm()
            assert off <= within * moved, f"{what}: {off:.4f} off, training moved {moved:.4f}"

    def per_layer():
        trained["model"] = train()
        compare(trained["model"])
    check("per-layer", per_layer)

    def shard_sizes():
        model = FullyShardedDataParallel(Net())
        for name, shard in model.shards_by_name().items():
            full = dict(Net().named_parameters())[name]
            assert shard.numel() <= -(-full.numel() // N), name
        assert [p for p in model.module.parameters()] == []     # no full copy is kept
    check("shards", shard_sizes)

    def reload():
        model = trained["model"]
        other = FullyShardedDataParallel(Net())
        other.load_full_state_dict(model.full_state_dict())
        for a, b in zip(model.parameters(), other.parameters()):
            torch.testing.assert_close(a, b)
    check("load-full-state-dict", reload)

    def optimizer_state():
        # Unsharded: equal to the single-process optimizer's; reloaded on 2 of the ranks.
        model, opt = trained["model"], trained["opt"]
        full = model.full_optim_state_dict(opt)
        want = reference(with_optimizer=True)[1].state_dict()
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in want["param_groups"]]
        assert [{k: v for k, v in g.items() if k != "params"}
                for g in full["param_groups"]] == hyper
        assert full["state"].keys() == want["state"].keys()    # the frozen ones come last
        for k, st in want["state"].items():
            for key, v in st.items():
                torch.testing.assert_close(full["state"][k][key], v, msg=f"state {k} {key}")
        params = model.full_state_dict()        # collectives of the whole group: all ranks
        sub = dist.new_group([0, 1])
        if rank in (0, 1):
            other = FullyShardedDataParallel(Net(), sub)
            other.load_full_state_dict(params)
            opt2 = torch.optim.AdamW(other.parameters(), lr=0.02, weight_decay=0.1)
            other.load_full_optim_state_dict(opt2, full)
            again = other.full_optim_state_dict(opt2)
            for k, st in full["state"].items():
                for key, v in st.items():
                    torch.testing.assert_close(again["state"][k][key], v)
        distlab.comm.barrier()     # ranks 2, 3 wait: none may leave while 0, 1 still talk
    check("optimizer-state", optimizer_state)

    if everything:      # the rest on 2 ranks only, to keep the suite short on 2 cores
        check("param-groups", lambda: compare(train(groups=True)))
        check("block-units", lambda: compare(train(unit_types=(Block,))))

        def bf16():
            model = train(compute_dtype=torch.bfloat16)
            for p in model.parameters():
                _assert_fp32(p)
            # bf16 keeps 8 bits: within 15% of the way two steps moved the model (0.09 here).
            compare(model, within=0.15)
        check("bf16", bf16)
    return out


def _assert_fp32(p):
    assert p.dtype == torch.float32
    assert p.grad is None if not p.requires_grad else p.grad.dtype == torch.float32


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def results(request):
    per_rank = distlab.launch(scenarios, request.param, request.param == 2, timeout=200)
    return {name: [r[name] for r in per_rank if r[name]] for name in per_rank[0]}


def _passed(results, scenario):
    if scenario not in results:
        pytest.skip("checked on 2 ranks only")
    assert not results[scenario], results[scenario]


def test_one_unit_per_layer_equals_single_process_and_frees_after_forward(results):
    _passed(results, "per-layer")


def test_parameter_groups_of_shards_equal_single_process(results):
    _passed(results, "param-groups")


def test_each_rank_keeps_only_its_shards(results):
    _passed(results, "shards")


def test_full_state_dict_loads_into_a_new_wrapper(results):
    _passed(results, "load-full-state-dict")


def test_full_optimizer_state_equals_torch_and_reloads_on_fewer_ranks(results):
    _passed(results, "optimizer-state")


def test_block_units_equal_single_process(results):
    _passed(results, "block-units")


def test_bf16_compute_with_fp32_master_weights(results):
    if "bf16" not in results:
        pytest.skip("bf16 runs on 2 ranks only")
    assert not results["bf16"], results["bf16"]
