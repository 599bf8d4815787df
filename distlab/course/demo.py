"""The headless demo (``python -m distlab demo``): synchronous against asynchronous SGD.

4 real gloo workers and a parameter-server rank, one worker a straggler; the report is one
HTML file with the plots (plotly), for a browser-less first look at the course.
"""
from __future__ import annotations


def demo(out: str, num_steps: int, straggler: float) -> dict:
    """Run the sync-vs-async comparison and write the report to ``out``; return a summary."""
    import plotly.express as px

    from dataclasses import replace

    from distlab.asynchronous import parameter_server as ps
    from distlab.problems.convex import WORKLOAD
    workload = replace(WORKLOAD, lr=0.05, num_steps=num_steps, batch_size=32, seed=0)
    base = dict(workload=workload, num_workers=4, step_time=0.02, slowdown=(straggler,))
    runs = {"synchronous (BSP, staleness 0)": ps.ParameterServerConfig(staleness=0, **base),
            "asynchronous (no staleness bound)": ps.ParameterServerConfig(staleness=None,
                                                                          **base)}
    frames, summary = [], {}
    for name, config in runs.items():
        print(f"running {name} on {config.world_size} processes ...", flush=True)
        result = ps.run(config, on_output=lambda r, s, t: None)
        df = result.metrics.assign(run=name)
        # Measure from the first update, not from the launch: process start-up is the
        # same for both and is not what the comparison is about.
        df["time"] -= df.dropna(subset=["loss"])["time"].min()
        frames.append(df)
        losses = df.dropna(subset=["loss"])
        summary[name] = {"wall_time": round(float(losses["time"].max()), 2),
                         "updates": int(losses["step"].max()),   # the final loss: at num_steps
                         "final_loss": float(result.loss)}
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
