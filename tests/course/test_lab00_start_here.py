"""Lab 00's training run and exercise checker, against a single process, on 2 and 4 ranks."""
import dataclasses

import pytest
import torch

import distlab
from distlab.course import lab00_start_here as first_steps
from distlab.exercises import first_steps as exercise

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
    per_step = 2 * (world_size - 1) * 4 * (16 + 2) // world_size
    assert df["bytes_sent"].max() == CONFIG.num_steps * per_step


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("lr", 2.0), ("num_steps", 0),
                                          ("num_examples", 1.5), ("world_size", 0),
                                          ("world_size", True)])
def test_bad_config_names_the_field_before_any_process(field, value):
    with pytest.raises(ValueError, match=f"FirstRunConfig.{field}="):
        first_steps.FirstRunConfig(**{field: value})


def test_checker_accepts_the_solution_and_explains_mistakes():
    assert exercise.check_global_mean(exercise.global_mean).ok

    def no_division(x, group=None):
        distlab.comm.all_reduce(x, group=group)
        return x

    verdict = exercise.check_global_mean(no_division)
    assert not verdict.ok and "rank 0" in verdict.message and "divide" in verdict.message
    assert "no communication" in exercise.check_global_mean(lambda x, group=None: x).message
    failed = exercise.check_global_mean(lambda x, group=None: 1 / 0)
    assert not failed.ok and "ZeroDivisionError" in failed.message
    assert "not a torch.Tensor" in exercise.check_global_mean(lambda x, group=None: 3).message


def test_solution_hidden_unless_enabled(monkeypatch):
    monkeypatch.delenv("DISTLAB_SOLUTIONS", raising=False)
    assert "hidden" in distlab.exercises.solution("global_mean")
    monkeypatch.setenv("DISTLAB_SOLUTIONS", "1")
    assert "comm.all_reduce" in distlab.exercises.solution("global_mean")
