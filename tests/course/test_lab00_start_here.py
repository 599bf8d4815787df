"""Lab 00's training run, against a single process, on 2 and 4 ranks."""
import dataclasses

import pytest
import torch

from distlab.course import lab00_start_here as first_steps

CONFIG = first_steps.FirstRunConfig(num_steps=8, lr=0.2, num_examples=103)  # uneven shards


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_gradient_descent_equals_one_process(world_size):
    run = first_steps.start(dataclasses.replace(CONFIG, world_size=world_size))
    params = run.result()
    losses, reference_params = first_steps.reference(CONFIG)
    df = run.metrics()
    for rank in range(world_size):
        torch.testing.assert_close(torch.tensor(params[rank]), torch.tensor(reference_params))
        mine = df[df["rank"] == rank].sort_values("step")
        torch.testing.assert_close(torch.tensor(mine["loss"].tolist()), torch.tensor(losses))
    # Counted from the ring's real sends: each of the 72 bytes' p chunks goes around the ring
    # p-1 times in each of its two phases (chunks of unequal size: ranks differ by a few bytes).
    last = df[df.step == CONFIG.num_steps - 1]
    assert last["bytes_sent"].sum() == CONFIG.num_steps * 2 * (world_size - 1) * 4 * (16 + 2)
    assert "model_bytes" not in df


def test_gloo_all_reduce_reports_model_bytes_not_bytes_sent():
    config = dataclasses.replace(CONFIG, world_size=2, all_reduce="gloo")
    run = first_steps.start(config)
    params, df = run.result(), run.metrics()
    losses, reference_params = first_steps.reference(CONFIG)
    torch.testing.assert_close(torch.tensor(params[0]), torch.tensor(reference_params))
    assert "bytes_sent" not in df
    assert df["model_bytes"].max() == CONFIG.num_steps * 4 * (16 + 2)   # booked: 2(p-1)/p·n


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("lr", 2.0), ("num_steps", 0),
                                          ("num_examples", 1.5), ("world_size", 0),
                                          ("world_size", True), ("all_reduce", "tree")])
def test_bad_config_names_the_field_before_any_process(field, value):
    with pytest.raises(ValueError, match=f"FirstRunConfig.{field}="):
        first_steps.FirstRunConfig(**{field: value})
