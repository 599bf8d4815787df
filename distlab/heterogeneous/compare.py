"""Plain sync, backup workers and asynchronous SGD under the same straggler, side by side.

The question of Chen et al. 2016 ("Revisiting Distributed Synchronous SGD", arXiv
1604.00981, section 4): with a straggler among N workers, which reaches a target loss first
in wall time: synchronous SGD (waits for the straggler every step), synchronous SGD with b
backup workers (:mod:`~distlab.heterogeneous.backup_workers`: drops the b last gradients)
or asynchronous SGD on a parameter server (:mod:`distlab.asynchronous.parameter_server`:
never waits, applies stale gradients)? :func:`compare` runs them one after the other on the
same workload and straggler and measures, for each, the wall time to the target and the
final loss. With one strong straggler, b = 1 reaches the target well before plain sync.

Each method's loss is measured on the same first ``eval_size`` training examples, and its
time counts from its first loss record (so process start-up is left out). The server of the
parameter server records the loss that workers measured on the parameters they pulled (one
gradient's compute later than the update), a backup-worker server that of each update.

Communication (alpha-beta, n gradient bytes, N workers): sync and backup, per step, about
``2(N-b)(alpha + n beta)`` through the server's link; async, per gradient,
``2(alpha + n beta)`` (see the two modules).
"""
from __future__ import annotations

import math
from dataclasses import replace

from distlab.asynchronous import parameter_server
from distlab.asynchronous.ps_config import ParameterServerConfig
from distlab.checks import is_int, is_number, require_arg
from distlab.heterogeneous import backup_workers
from distlab.heterogeneous.backup_workers import BackupConfig
from distlab.problems.workloads import Workload


def compare(workload: Workload, num_workers: int = 4, step_time: float = 0.02,
            slowdown: tuple = (), target_loss: float = 1.0, backups: tuple = (0, 1, 2),
            asynchronous: bool = True, eval_size: int = 512, **launch):
    """Run each method under the straggler ``slowdown``; one row per method.

    ``backups`` lists the b of the synchronous runs (0 = plain sync). Each synchronous run
    takes ``workload.num_steps`` steps; the asynchronous one ``num_steps * num_workers``
    updates (as many gradients as plain sync computes). ``launch`` goes to every launch.

    Returns:
        A pandas DataFrame with columns ``method``, ``backups`` (None for async),
        ``time_to_target`` (seconds; ``inf`` if never reached), ``final_loss``,
        ``updates`` and ``dropped`` (gradients computed and thrown away).
    """
    require_arg("num_workers", num_workers, is_int(num_workers) and 1 <= num_workers <= 32,
                "1..32")
    require_arg("backups", backups, isinstance(backups, tuple) and all(
        is_int(b) and 0 <= b < num_workers for b in backups),
                f"a tuple of ints in 0..{num_workers - 1}")
    require_arg("target_loss", target_loss, is_number(target_loss), "a number")
    require_arg("asynchronous", asynchronous, isinstance(asynchronous, bool), "True or False")
    workload = workload.loaded()
    configs = [BackupConfig(workload=workload, num_workers=num_workers, backups=b,
                            step_time=step_time, slowdown=slowdown, eval_size=eval_size)
               for b in backups]     # every config is checked before the first run starts
    ps_config = ParameterServerConfig(
        workload=replace(workload, num_steps=workload.num_steps * num_workers),
        num_workers=num_workers, staleness=None, step_time=step_time, slowdown=slowdown,
        eval_size=eval_size) if asynchronous else None
    rows = [_backup_row(config, target_loss, launch) for config in configs]
    if ps_config is not None:
        rows.append(_async_row(ps_config, target_loss, launch))
    import pandas as pd      # here: pandas is half a second of `import distlab`
    df = pd.DataFrame(rows)
    df["backups"] = df["backups"].astype("Int64")   # async has none
    return df


def time_to_target(times, losses, target_loss: float) -> float:
    """Seconds from the first record to the first loss at or below ``target_loss``; inf if none."""
    times, losses = list(times), list(losses)
    for t, loss in zip(times, losses):
        if loss <= target_loss:
            return t - times[0]
    return math.inf


def _backup_row(config: BackupConfig, target_loss: float, launch: dict) -> dict:
    handle = backup_workers.start(config, **launch)
    server = handle.result()[0]
    curve = _loss_curve(handle.metrics())
    return {"method": "sync" if config.backups == 0 else f"backup b={config.backups}",
            "backups": config.backups,
            "time_to_target": time_to_target(curve["time"], curve["loss"], target_loss),
            "final_loss": server["losses"][-1], "updates": len(server["kept"]),
            "dropped": server["dropped"]}


def _async_row(config: ParameterServerConfig, target_loss: float, launch: dict) -> dict:
    result = parameter_server.run(config, **launch)
    curve = _loss_curve(result.metrics)
    return {"method": "async", "backups": None,
            "time_to_target": time_to_target(curve["time"], curve["loss"], target_loss),
            "final_loss": result.loss, "updates": result.servers[0]["version"], "dropped": 0}


def _loss_curve(df):
    """The server's (rank 0) loss records, in time order."""
    rows = df[(df["rank"] == 0) & df["loss"].notna()] if "loss" in df else df.iloc[:0]
    return rows.sort_values("time")[["time", "loss"]]
