"""Hogwild!: shared parameters really shared, one worker equals serial SGD."""
import math

import pytest
import torch

from distlab.asynchronous import hogwild as hw
from distlab.problems.convex import log_loss

pytestmark = pytest.mark.timeout(120)


def test_one_worker_equals_serial_sgd():
    cfg = hw.HogwildConfig(num_workers=1, num_steps=1500)
    w, stats = hw.run(cfg, timeout=60)
    torch.testing.assert_close(w, hw.reference(cfg))
    assert stats[0]["updates_per_s"] > 0


@pytest.mark.parametrize("num_workers,lock", [(2, False), (4, False), (2, True)])
def test_workers_share_one_parameter_vector(num_workers, lock):
    cfg = hw.HogwildConfig(num_workers=num_workers, num_steps=2000, lock=lock)
    w, _ = hw.run(cfg, timeout=60)
    ds, cols = hw.problem(cfg)
    # The file the caller reads back holds every worker's updates (MAP_SHARED pages), and
    # nothing else: touched coordinates moved, the others are still 0.
    touched = set(cols[torch.cat([hw.example_order(cfg, r, len(ds.y))
                                  for r in range(num_workers)])].flatten().tolist())
    moved = set(w.nonzero().flatten().tolist())
    assert moved == touched
    ref = hw.reference(cfg)   # the same updates, applied serially: nearly the same model
    assert abs(log_loss(w, ds.X_val, ds.y_val) - log_loss(ref, ds.X_val, ds.y_val)) < 0.01
    assert log_loss(w, ds.X_val, ds.y_val) < math.log(2) - 0.03   # it learned


def test_a_config_with_no_nonzero_features_is_refused():
    with pytest.raises(ValueError, match="nnz=0"):
        hw.HogwildConfig(nnz=0)


def test_more_workers_than_allowed_are_refused():
    with pytest.raises(ValueError, match="num_workers=17"):
        hw.HogwildConfig(num_workers=17)


def test_start_refuses_what_is_not_a_hogwild_config():
    with pytest.raises(TypeError, match="HogwildConfig"):
        hw.start({"num_workers": 2})
