"""Korthikanti et al. 2022, Table 2, as activation_bytes computes it."""
import pytest

from distlab.memory.activations import activation_bytes

GPT3 = dict(seq_len=2048, batch_size=1, hidden=12288, num_heads=96)   # the paper's 175B layer
SBH = 2048 * 12288


def test_no_parallelism_is_34_sbh_plus_5_a_s_squared_b():
    assert activation_bytes(**GPT3) == SBH * 34 + 5 * 96 * 2048 ** 2


def test_tensor_parallel_shards_24_of_the_34_and_the_attention_term():
    assert activation_bytes(**GPT3, tensor_parallel=8) == SBH * (10 + 24 // 8) + 5 * 96 * 2048 ** 2 // 8


def test_sequence_parallel_shards_all_of_it():
    assert activation_bytes(**GPT3, tensor_parallel=8, sequence_parallel=True) == \
        activation_bytes(**GPT3) // 8


def test_selective_recompute_drops_the_attention_term():
    assert activation_bytes(**GPT3, recompute="selective") == SBH * 34
    assert activation_bytes(**GPT3, tensor_parallel=8, sequence_parallel=True,
                            recompute="selective") == SBH * 34 // 8


def test_full_recompute_keeps_the_layer_input_only():
    assert activation_bytes(**GPT3, num_layers=96, recompute="full") == 2 * SBH * 96


def test_bytes_per_value_scales_the_16_bit_count():
    assert activation_bytes(**GPT3, bytes_per_value=4, num_layers=3) == 6 * activation_bytes(**GPT3)


@pytest.mark.parametrize("bad, match", [
    (dict(seq_len=0), "seq_len=0"), (dict(batch_size=True), "batch_size=True"),
    (dict(hidden=1.5), "hidden=1.5"), (dict(num_heads=-1), "num_heads=-1"),
    (dict(num_layers=0), "num_layers=0"), (dict(tensor_parallel=0), "tensor_parallel=0"),
    (dict(bytes_per_value=0), "bytes_per_value=0"),
    (dict(sequence_parallel=1), "sequence_parallel=1"), (dict(recompute="some"), "recompute='some'")])
def test_activation_bytes_refuses_bad_arguments_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        activation_bytes(**{**GPT3, **bad})
