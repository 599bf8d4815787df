"""torchft's DiLoCo against distlab's on the same problem (CPU, gloo, 2 replicas).

Run with torchft importable (installed in a scratch folder, never in the project's venv):
    pip install --target /tmp/tft/pkgs torchft==0.2.0     (a scratch folder)
    PYTHONPATH=/tmp/tft/pkgs .venv/bin/python benchmarks/torchft_diloco.py
Each replica is a thread with its own replica group of one rank (as torchft's own
integration tests run them), a Lighthouse on loopback, the same shards, minibatches, inner
AdamW and outer Nesterov SGD as distlab.communication_efficient.diloco.

Environment: OUTER_LR, OUTER_MOMENTUM (default the paper's 0.7, 0.9); INIT_SYNC=1 keeps
torchft's default init_sync=True (replica 1 then heals from replica 0's checkpoint at the
first quorum and sits that first outer step out), INIT_SYNC=0 (default here) starts every
replica from the same seed, as distlab does.
"""
import json
import os
import sys
import threading
import time
from datetime import timedelta

import torch
from torch.distributed import TCPStore

from distlab.communication_efficient import diloco
from distlab.communication_efficient.local_training import (evaluate, flat, problem,
                                                            sample_batches, with_data)
from torchft._torchft import LighthouseServer
from torchft.local_sgd import DiLoCo
from torchft.manager import Manager
from torchft.process_group import ProcessGroupGloo

H, STEPS, P = 10, 40, 2
config = with_data(diloco.DiLoCoConfig(
    workload=diloco.WORKLOAD.__class__(**{**diloco.WORKLOAD.__dict__, "num_steps": STEPS}),
    world_size=P, inner_steps=H, outer_lr=float(os.environ.get("OUTER_LR", 0.7)),
    outer_momentum=float(os.environ.get("OUTER_MOMENTUM", 0.9))))


def replica(r, lighthouse, out):
    torch.set_num_threads(1)
    workload = config.workload
    data, shards, model = problem(config, P, config.classes_per_rank)
    inner = workload.optimizer(model.parameters())
    outer = diloco.outer_optimizer(config, list(model.parameters()))   # distlab's: the same
    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=30)),
                      min_replica_size=P, use_async_quorum=False,
                      load_state_dict=lambda sd: model.load_state_dict(sd["model"]),
                      state_dict=lambda: {"model": model.state_dict()},
                      replica_id=f"replica{r}", store_addr="localhost",
                      store_port=store.port, rank=0, world_size=1,
                      lighthouse_addr=lighthouse.address(),
                      timeout=timedelta(seconds=30), quorum_timeout=timedelta(seconds=30),
                      connect_timeout=timedelta(seconds=30),
                      init_sync=os.environ.get("INIT_SYNC", "0") == "1")
    batches = sample_batches(shards[r], workload.batch_size // P,
                             seed=workload.seed * 1000 + r + 1)
    history = [evaluate(model, data, workload.loss)["loss"]]
    t0 = time.perf_counter()
    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=H, backup_device=None,
                    pin_memory=False):
            for step in range(1, STEPS + 1):
                idx = next(batches)
                inner.zero_grad()
                workload.loss(model(data.X[idx]), data.y[idx]).backward()
                inner.step()                     # DiLoCo syncs in this step's hook
                if step % H == 0:
                    history.append(evaluate(model, data, workload.loss)["loss"])
        out[r] = {"history": history, "params": flat(model.parameters()),
                  "seconds": time.perf_counter() - t0, "steps": manager.current_step()}
    except Exception as e:   # noqa: BLE001 - reported below
        import traceback
        out[r] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
    finally:
        manager.shutdown(wait=False)


def main():
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=P)
    out = {}
    threads = [threading.Thread(target=replica, args=(r, lighthouse, out)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    lighthouse.shutdown()
    errors = {r: o for r, o in out.items() if "error" in o}
    if errors or len(out) < P:
        print(json.dumps({str(k): v for k, v in errors.items()}, indent=1))
        sys.exit(1)
    ref = diloco.reference(config)
    ours = [row["loss"] for row in ref["history"]]
    theirs = out[0]["history"]
    diff = (out[0]["params"] - torch.tensor(ref["params"])).abs().max().item()
    same = (out[0]["params"] - out[1]["params"]).abs().max().item()
    print(json.dumps({"distlab_loss_per_outer_step": ours, "torchft_loss_per_outer_step": theirs,
                      "max_abs_param_diff_torchft_vs_distlab": diff,
                      "max_abs_param_diff_between_torchft_replicas": same,
                      "torchft_seconds": [out[r]["seconds"] for r in range(P)],
                      "torchft_manager_steps": [out[r]["steps"] for r in range(P)]}, indent=1))


if __name__ == "__main__":
    main()
