import pytest

from distlab.heterogeneous.speeds import compute_delay, equal_batches, proportional_batches


def test_proportional_batches_follow_the_speeds_and_sum_to_the_batch():
    assert proportional_batches((1, 1, 2), 8) == (2, 2, 4)
    assert proportional_batches((1.0, 3.0), 5) == (1, 4)
    assert proportional_batches((1, 3), 32) == (8, 24)
    for speeds, batch in [((1, 2, 3, 4), 17), ((0.5, 7.0), 9), ((1,), 1)]:
        shares = proportional_batches(speeds, batch)
        assert sum(shares) == batch and min(shares) >= 1


def test_every_rank_gets_at_least_one_example_however_slow():
    assert proportional_batches((1, 100), 4) == (1, 3)


def test_equal_speeds_give_the_most_even_split():
    assert equal_batches(3, 10) == (4, 3, 3) == proportional_batches((2, 2, 2), 10)


@pytest.mark.parametrize("speeds, batch", [((), 4), ((1, 0), 4), ((1, -2), 4), ((1, True), 4),
                                           ((1, float("nan")), 4), (3, 4), ((1, 1, 1), 2),
                                           ((1, 1), 4.0)])
def test_bad_speeds_or_batch_sizes_are_refused(speeds, batch):
    with pytest.raises(ValueError):
        proportional_batches(speeds, batch)


def test_compute_delay_grows_with_examples_and_shrinks_with_speed():
    assert compute_delay(1.0, 4, 0.1, 4) == pytest.approx(0.1)
    assert compute_delay(2.0, 4, 0.1, 4) == pytest.approx(0.05)
    assert compute_delay(1.0, 8, 0.1, 4) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        compute_delay(0.0, 4, 0.1, 4)
