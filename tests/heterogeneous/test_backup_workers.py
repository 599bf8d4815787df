"""distlab.heterogeneous.backup_workers: keep the first N - b gradients, equal to the replay."""
import math

import pytest
import torch

from distlab.asynchronous import parameter_server
from distlab.asynchronous.ps_config import ParameterServerConfig
from distlab.heterogeneous import backup_workers
from distlab.heterogeneous.backup_workers import (BackupConfig, compute_time, reference,
                                                  straggler_of)
from distlab.heterogeneous.compare import compare, time_to_target
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(180)

MLP = Workload(model="mlp", hidden=8, depth=1, batch_size=16, lr=0.3, num_steps=8)


def _assert_equals_replay(server, config):
    ref = reference(config, server["kept"])
    torch.testing.assert_close(server["params"], ref["params"])
    torch.testing.assert_close(torch.tensor(server["losses"]), torch.tensor(ref["losses"]))


def test_without_backups_every_gradient_is_kept_and_it_is_the_bsp_parameter_server():
    config = BackupConfig(workload=MLP, num_workers=2, backups=0, step_time=0.0)
    server = backup_workers.run(config)[0]
    assert server["kept"] == [[0, 1]] * MLP.num_steps and server["dropped"] == 0
    _assert_equals_replay(server, config)
    bsp = parameter_server.reference(ParameterServerConfig(workload=MLP, num_workers=2,
                                                           staleness=0))
    torch.testing.assert_close(server["params"], bsp)


def test_with_backups_the_run_equals_the_replay_of_the_gradients_it_kept():
    # A random straggler each step (10x slower), one backup: it is usually dropped.
    config = BackupConfig(workload=MLP, num_workers=3, backups=1, step_time=0.01,
                          straggler=10.0)
    results = backup_workers.run(config)
    server = results[0]
    assert all(len(k) == 2 for k in server["kept"]) and len(server["kept"]) == MLP.num_steps
    assert server["dropped"] >= 1
    assert sum(w["gradients"] for w in results[1:]) == 2 * MLP.num_steps + server["dropped"]
    _assert_equals_replay(server, config)


def test_backup_workers_reach_the_target_before_plain_sync_under_a_strong_straggler():
    fast = Workload(model="mlp", hidden=16, depth=1, batch_size=16, lr=0.5, num_steps=30)
    table = compare(fast, num_workers=3, step_time=0.01, slowdown=(5.0,), target_loss=1.6,
                    backups=(0, 1)).set_index("method")
    assert list(table.index) == ["sync", "backup b=1", "async"]
    sync, backup = table.loc["sync", "time_to_target"], table.loc["backup b=1", "time_to_target"]
    assert math.isfinite(sync) and backup < sync, table
    assert table.loc["backup b=1", "dropped"] > 0
    assert math.isfinite(table.loc["async", "final_loss"])


def test_the_straggler_rule_is_the_parameter_servers_and_the_draw_is_seeded():
    config = BackupConfig(workload=MLP, num_workers=3, step_time=0.1, slowdown=(4.0,))
    assert compute_time(config, 0, 0, 0.0) == pytest.approx(0.4)
    assert compute_time(config, 1, 0, 0.02) == pytest.approx(0.12)
    drawn = BackupConfig(workload=MLP, num_workers=3, step_time=0.1, straggler=5.0)
    stragglers = [straggler_of(drawn, v) for v in range(20)]
    assert stragglers == [straggler_of(drawn, v) for v in range(20)]
    assert len(set(stragglers)) == 3
    v = 7
    assert compute_time(drawn, straggler_of(drawn, v), v, 0.0) == pytest.approx(0.5)


def test_time_to_target_counts_from_the_first_record():
    assert time_to_target([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2.0) == 1.0
    assert time_to_target([1.0, 2.0], [3.0, 2.5], 1.0) == math.inf


@pytest.mark.parametrize("field, value", [("num_workers", 0), ("backups", 2), ("backups", -1),
                                          ("step_time", -0.1), ("slowdown", (0.5,)),
                                          ("slowdown", [2.0]), ("straggler", 0.5),
                                          ("eval_size", 0), ("target_loss", "low")])
def test_bad_configs_are_refused_before_any_process_starts(field, value):
    with pytest.raises(ValueError, match=rf"BackupConfig\.{field}="):
        BackupConfig(**{"workload": MLP, "num_workers": 2, field: value})


def test_bad_comparisons_and_replays_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match=r"backups=\(0, 3\)"):
        compare(MLP, num_workers=3, backups=(0, 3))
    with pytest.raises(ValueError, match="BackupConfig.slowdown"):
        compare(MLP, num_workers=2, backups=(0, 1), slowdown=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="kept="):
        reference(BackupConfig(workload=MLP, num_workers=2), [[0, 2]])
