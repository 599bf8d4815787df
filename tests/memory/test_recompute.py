"""Activation checkpointing of the TinyTransformer: equal gradients, less kept, more FLOPs."""
import pytest
import torch

from distlab.memory.activations import tiny_transformer_activation_bytes
from distlab.memory.recompute import compare_recompute, with_recompute
from distlab.problems.transformer import TinyTransformer, lm_loss

V, C, HEADS, LAYERS, T, B = 20, 16, 2, 2, 8, 4
SB, SBH = T * B, T * B * C


def build():
    return TinyTransformer(V, C, HEADS, LAYERS, T)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


@pytest.fixture(scope="module")
def compared():
    return compare_recompute(build, data(), lm_loss, repeats=3)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputed_gradients_equal_the_plain_ones(recompute):
    X, y = data()
    plain, recomputed = build(), with_recompute(build(), recompute)
    lm_loss(plain(X), y).backward()
    lm_loss(recomputed(X), y).backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")


def test_no_recompute_keeps_what_the_models_formula_says(compared):
    assert compared["none"]["saved_activations"] == tiny_transformer_activation_bytes(
        seq_len=T, batch_size=B, hidden=C, num_heads=HEADS, num_layers=LAYERS, vocab_size=V)


def test_selective_recompute_drops_qkv_attention_output_and_log_sum_exp_per_block(compared):
    saved = compared["none"]["saved_activations"] - compared["selective"]["saved_activations"]
    assert saved == LAYERS * 4 * (4 * SBH + HEADS * SB)


def test_full_recompute_keeps_only_each_blocks_input(compared):
    outside = tiny_transformer_activation_bytes(seq_len=T, batch_size=B, hidden=C,
                                                num_heads=HEADS, num_layers=1,
                                                vocab_size=V) - 4 * (16 * SBH + (4 + HEADS) * SB)
    assert compared["full"]["saved_activations"] == LAYERS * 4 * SBH + outside


def test_recompute_pays_the_forward_again_up_to_the_last_saved_tensor(compared):
    # Per block: qkv (selective); qkv, proj and fc1 (full); fc2's output nobody saved.
    qkv, proj, fc = 2 * SB * C * 3 * C, 2 * SB * C * C, 2 * SB * C * 4 * C
    extra = {k: compared[k]["backward_flops"] - compared["none"]["backward_flops"]
             for k in ("selective", "full")}
    assert extra == {"selective": LAYERS * qkv, "full": LAYERS * (qkv + proj + fc)}
    assert len({r["forward_flops"] for r in compared.values()}) == 1


def test_compare_recompute_times_every_choice(compared):
    for r in compared.values():
        assert 0 < r["seconds_min"] <= r["seconds"] <= r["seconds_max"]


@pytest.mark.parametrize("bad, match", [(dict(recompute=("some",)), "recompute='some'"),
                                        (dict(repeats=0), "repeats=0")])
def test_compare_recompute_refuses_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        compare_recompute(build, data(), lm_loss, **bad)


def test_with_recompute_refuses_an_unknown_choice():
    with pytest.raises(ValueError, match="recompute='attention'"):
        with_recompute(build(), "attention")


def test_with_recompute_none_leaves_any_model_alone_and_others_need_blocks():
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert with_recompute(mlp, "none") is mlp
    with pytest.raises(TypeError, match="needs a model with blocks"):
        with_recompute(mlp, "full")
