"""distlab.decentralized.hybrid: one group is synchronous SGD, one worker per group is an
asynchronous parameter server, and a straggler holds back synchronous training most."""
import re
from dataclasses import replace

import pytest
import torch

from distlab.data_parallel import sync_sgd
from distlab.decentralized import hybrid
from distlab.decentralized.dpsgd import time_to_target
from distlab.decentralized.hybrid import HybridConfig
from distlab.problems.workloads import Workload

pytestmark = pytest.mark.timeout(180)

LINEAR = Workload(model="linear", batch_size=32, lr=0.05, num_steps=12)
LINEAR_BYTES = 4 * 17   # 16 weights and a bias


def test_bad_configs_name_the_field_value_and_range():
    cases = {"world_size": 0, "group_size": 3, "step_time": -1.0, "slowdown": (0.5,),
             "eval_every": 0}
    for name, value in cases.items():
        with pytest.raises(ValueError, match=rf"HybridConfig\.{name}={re.escape(repr(value))}.*allowed"):
            HybridConfig(**{name: value})
    with pytest.raises(ValueError, match=r"HybridConfig\.slowdown=\[2\].*a tuple"):
        HybridConfig(slowdown=[2])


def test_one_group_is_synchronous_sgd():
    cfg = HybridConfig(LINEAR, world_size=2, group_size=2)
    *workers, server = hybrid.run(cfg, timeout=60)
    sync = sync_sgd.reference(sync_sgd.SyncSGDConfig(LINEAR, world_size=2))
    torch.testing.assert_close(server["params"], sync["params"])
    torch.testing.assert_close(hybrid.reference(cfg)["params"], sync["params"])
    assert server["staleness"] == [0] * 12
    # 12 updates and the closing exchange; every worker took part in every step.
    assert server["pushes"] == {0: 13} and [len(w["losses"]) for w in workers] == [13, 13]


@pytest.fixture(scope="module")
def straggler_runs():
    # Worker 2 computes 5 times as long as workers 0 and 1; 3 workers, group size 3 and 1.
    base = HybridConfig(replace(LINEAR, batch_size=30, num_steps=30), world_size=3,
                        group_size=3, step_time=0.02, slowdown=(1.0, 1.0, 5.0), eval_every=2)
    out = {}
    for gs in (3, 1):
        run = hybrid.start(replace(base, group_size=gs), timeout=60)
        results = run.result()
        metrics = run.metrics()
        out[gs] = results, metrics[metrics["rank"] == 3]
    return out


def test_one_worker_per_group_is_a_fully_asynchronous_parameter_server(straggler_runs):
    results, server_metrics = straggler_runs[1]
    server = results[-1]
    # Every worker is served as its pushes arrive: both fast ones often (none starved), the
    # straggler less; the fast ones' updates are stale by the others' in between.
    pushes = server["pushes"]
    assert min(pushes[0], pushes[1]) >= 30 // 4 and pushes[2] < min(pushes[0], pushes[1])
    assert max(server["staleness"]) >= 1
    assert server_metrics.staleness.max() == max(server["staleness"])
    # The server's link carries every group's reply: (2 + n) floats per push.
    assert server["bytes_sent"] == sum(pushes.values()) * 4 * (hybrid.REPLY_HEAD + 17)


def test_a_straggler_delays_synchronous_training_more_than_asynchronous(straggler_runs):
    target = 0.1
    times = {gs: time_to_target(m, target) for gs, (_, m) in straggler_runs.items()}
    assert times[1] < times[3] < float("inf"), times
