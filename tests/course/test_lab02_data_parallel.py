"""Lab 02's glue: the panel's start function, the timeline runs, the scaling sweep (headless)."""
import pytest

from distlab.course import lab02_data_parallel as lab
from distlab.data_parallel.sync_sgd import SyncSGDConfig

pytestmark = pytest.mark.timeout(180)

TINY = SyncSGDConfig(task="linear", world_size=1, num_steps=4, eval_every=2)


def test_start_run_changes_fields_of_the_config_and_validates_them_first():
    out = lab.start_run(TINY, world_size=2, variant="flat", timeout=60).result()
    assert len(out) == 2 and len(out[0]["losses"]) == TINY.num_steps
    with pytest.raises(ValueError, match=r"SyncSGDConfig\.world_size=0"):
        lab.start_run(TINY, world_size=0)


def test_the_bucketed_timeline_starts_all_reduces_during_backward_and_flat_does_not():
    base = SyncSGDConfig(task="digits", world_size=2, num_steps=4, bucket_size_mb=0.01)
    flat = lab.timeline(base, steps=2, variant="flat")
    bucketed = lab.timeline(base, steps=2, variant="bucketed")
    assert {e["step"] for e in flat} == {1, 2} and {e["rank"] for e in flat} == {0, 1}
    assert lab.all_reduces_during_backward(flat) == 0
    assert lab.all_reduces_during_backward(bucketed) > 0


def test_the_scaling_sweep_has_one_row_per_run_and_the_one_node_efficiency_is_1():
    sweep = lab.scaling_sweep(TINY, nodes=(1, 2))
    assert sweep[["nodes", "lr_scaling"]].values.tolist() == [[1, False], [2, False], [2, True]]
    assert sweep.loc[0, "efficiency"] == 1.0 and (sweep["bytes_per_step"][1:] > 0).all()
    assert len(lab.efficiency_figure(sweep).data) == 1


@pytest.mark.parametrize("call,match", [
    (lambda: lab.timeline(TINY, steps=0), r"timeline: steps=0"),
    (lambda: lab.scaling_sweep(TINY, nodes=()), r"nodes=\(\)"),
    (lambda: lab.scaling_sweep(TINY, nodes=(1, 0)), r"nodes=\(1, 0\)")])
def test_bad_numbers_are_refused_by_their_own_names(call, match):
    with pytest.raises(ValueError, match=match):
        call()
