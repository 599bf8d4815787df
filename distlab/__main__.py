"""distlab's command line: a headless demo, and training jobs for torchrun.

``python -m distlab demo``
    Synchronous against asynchronous SGD on 4 real gloo workers (plus a parameter-server
    rank), one worker a 3x straggler; writes an HTML report with the plots.

``python -m distlab train --algo ddp --nproc 4``
    Runs one of distlab's training algorithms on N processes started by distlab.launch.
    Under ``torchrun`` the same command trains on the processes torchrun started (env://
    rendezvous, NCCL when each rank has a GPU)::

        torchrun --nproc-per-node=4 -m distlab train --algo ddp --task digits
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# --- demo ---------------------------------------------------------------------------------


def demo(out: str, num_steps: int, straggler: float) -> dict:
    """Run the sync-vs-async comparison and write the report to ``out``; return a summary."""
    import plotly.express as px

    from distlab.asynchronous import parameter_server as ps
    base = dict(num_workers=4, problem="linear_regression", lr=0.05, num_steps=num_steps,
                batch_size=32, step_time=0.02, slowdown=(straggler,), seed=0)
    runs = {"synchronous (BSP, staleness 0)": ps.ParameterServerConfig(staleness=0, **base),
            "asynchronous (no staleness bound)": ps.ParameterServerConfig(staleness=None,
                                                                          **base)}
    frames, summary = [], {}
    for name, config in runs.items():
        print(f"running {name} on {config.world_size} processes ...", flush=True)
        result = ps.train(config, on_output=lambda r, s, t: None)
        df = result.metrics.assign(run=name)
        # Measure from the first update, not from the launch: process start-up is the
        # same for both and is not what the comparison is about.
        df["time"] -= df.dropna(subset=["loss"])["time"].min()
        frames.append(df)
        losses = df.dropna(subset=["loss"])
        summary[name] = {"wall_time": round(float(losses["time"].max()), 2),
                         "updates": int(losses["step"].max()) + 1,
                         "final_loss": float(losses.sort_values("step")["loss"].iloc[-1])}
        print(f"  {summary[name]}", flush=True)
    import pandas as pd
    df = pd.concat(frames, ignore_index=True)
    losses = df.dropna(subset=["loss"]).sort_values(["run", "step"])
    figs = [
        px.line(losses, x="time", y="loss", color="run", log_y=True,
                title="Training loss against wall time (one worker is a "
                      f"{straggler:g}x straggler)",
                labels={"time": "wall time (s)", "loss": "training loss"}),
        px.line(losses, x="step", y="loss", color="run", log_y=True,
                title="Training loss against server updates",
                labels={"step": "server updates", "loss": "training loss"}),
    ]
    if "staleness" in df:
        stale = df.dropna(subset=["staleness"])
        figs.append(px.histogram(stale, x="staleness", color="run", barmode="group",
                                 title="Measured staleness of the applied gradients"))
    html = ["<html><head><meta charset='utf-8'><title>distlab demo</title></head><body>",
            "<h1>distlab demo: synchronous against asynchronous SGD</h1>",
            "<p>Every curve comes from real processes exchanging tensors through "
            "torch.distributed (gloo): one parameter-server rank and 4 workers.</p>",
            "<table border=1 cellpadding=4><tr><th>run</th><th>wall time (s)</th>"
            "<th>updates</th><th>final loss</th></tr>"]
    html += [f"<tr><td>{n}</td><td>{s['wall_time']}</td><td>{s['updates']}</td>"
             f"<td>{s['final_loss']:.4g}</td></tr>" for n, s in summary.items()]
    html.append("</table>")
    for i, fig in enumerate(figs):
        fig.update_layout(height=450, template="plotly_white")
        html.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    html.append("</body></html>")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(html))
    print(f"wrote {out}")
    return summary


# --- train --------------------------------------------------------------------------------

def _algorithms():
    """``{name: (description, worker(settings) -> dict)}``, imported lazily."""
    def ddp(s):
        from distlab.data_parallel import sync_sgd as train
        config = train.SyncSGDConfig(task=s.task, world_size=_world(), lr=s.lr,
                                     num_steps=s.steps, batch_size=s.batch_size,
                                     variant=s.variant)
        out = train.train_worker(config)
        return {"final": out["final"], "wall_time": out["wall_time"]}

    def ps(s):
        from distlab.asynchronous import parameter_server as psm
        config = psm.ParameterServerConfig(num_workers=_world() - 1, problem=_ps_task(s.task),
                                           lr=s.lr, num_steps=s.steps,
                                           staleness=s.staleness)
        out = psm.run(config)
        return {k: v for k, v in out.items() if k in ("role", "final_loss", "lost")}

    def local_sgd(s):
        from distlab.communication_efficient import local_sgd as lsgd
        config = lsgd.LocalSGDConfig(world_size=_world(), num_steps=s.steps, lr=s.lr)
        losses = lsgd.train(config)
        return {"final_loss": losses[-1] if losses else None}

    return {"ddp": ("synchronous data-parallel SGD (DDP from scratch)", ddp),
            "ps": ("parameter server, SSP staleness bound (--staleness)", ps),
            "local_sgd": ("local SGD / periodic model averaging", local_sgd)}


def _ps_task(task):
    return "linear_regression" if task == "linear" else task


def _world() -> int:
    import torch.distributed as dist
    return dist.get_world_size()


def _train_on_rank(algo: str, settings) -> dict:
    from distlab import metrics
    worker = _algorithms()[algo][1]
    result = worker(settings)
    result["records"] = len(metrics.local_records())
    return result


def train_command(args) -> int:
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)
    if under_torchrun:
        import torch.distributed as dist

        from distlab.worker import init_from_env
        init_from_env()
        try:
            result = _train_on_rank(args.algo, args)
            if dist.get_rank() == 0:
                print(json.dumps({"algo": args.algo, "world_size": dist.get_world_size(),
                                  "backend": dist.get_backend(), "rank0": result},
                                 default=str))
        finally:
            dist.destroy_process_group()
        return 0
    from distlab.launcher import launch
    t0 = time.time()
    results = launch(_train_on_rank, args.nproc, args.algo, args, timeout=args.timeout)
    print(json.dumps({"algo": args.algo, "world_size": args.nproc,
                      "seconds": round(time.time() - t0, 2), "rank0": results[0]},
                     default=str))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="sync vs async SGD on 4 real workers; writes an HTML report")
    d.add_argument("--out", default="distlab-demo.html", help="the report's path")
    d.add_argument("--steps", type=int, default=None, help="server updates per run")
    d.add_argument("--straggler", type=float, default=3.0, help="slowdown of worker 0")
    t = sub.add_parser("train", help="train with one algorithm (under torchrun or not)")
    t.add_argument("--algo", choices=sorted(_algorithms()), default="ddp")
    t.add_argument("--task", choices=("linear", "digits"), default="digits")
    t.add_argument("--nproc", type=int, default=4, help="processes, when not under torchrun")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--variant", default="bucketed", help="DDP variant (ddp only)")
    t.add_argument("--staleness", type=int, default=None, help="SSP bound (ps only)")
    t.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from distlab.course.settings import scale
        steps = args.steps or scale(200, 60)
        demo(args.out, steps, args.straggler)
        return 0
    return train_command(args)


if __name__ == "__main__":
    sys.exit(main())
