"""Plotly figures for the labs, including live ones that grow while a run goes on.

:class:`LiveFigure` wraps a ``plotly.graph_objects.FigureWidget``. Give
:meth:`LiveFigure.callback` to :func:`distlab.start` as ``on_metrics``: the workers'
records arrive on a background thread, are buffered, and are drawn at most a few times a
second, so the notebook stays responsive however fast the workers report.
"""
from __future__ import annotations

import threading
import time

import pandas as pd
import plotly.graph_objects as go

AXIS_TITLES = {
    "step": "step", "time": "wall time (s)", "loss": "training loss", "val_loss": "held-out loss",
    "accuracy": "accuracy", "bytes_sent": "bytes sent per rank", "comm_time": "time in communication (s)",
    "staleness": "staleness (versions)",
}


def axis_title(name: str) -> str:
    return AXIS_TITLES.get(name, name.replace("_", " "))


class LiveFigure:
    """A figure of ``y`` against ``x``, one line per run (or per run and rank).

    Args:
        x, y: metric names (columns of the run's records).
        title: the figure title.
        per_rank: one line per rank; otherwise ranks are averaged at each step when ``x``
            is ``"step"``, and for any other ``x`` (time, bytes) the lowest reporting rank
            is drawn, since ranks do not share those values.
        log_y: logarithmic y axis.
        min_interval: seconds between redraws while a run is live.
    """

    def __init__(self, x: str = "step", y: str = "loss", title: str | None = None,
                 per_rank: bool = False, log_y: bool = False, min_interval: float = 0.25,
                 height: int = 360):
        self.x, self.y, self.per_rank, self.min_interval = x, y, per_rank, min_interval
        self.figure = go.FigureWidget(layout=dict(
            title=title or f"{axis_title(y)} against {axis_title(x)}", height=height,
            xaxis_title=axis_title(x), yaxis_title=axis_title(y),
            yaxis_type="log" if log_y else "linear", margin=dict(l=60, r=20, t=50, b=50),
            template="plotly_white"))
        self._points: dict[str, dict[int, list]] = {}
        self._lock = threading.Lock()
        self._last_draw = 0.0

    def callback(self, run: str):
        """An ``on_metrics`` callback that adds the records of run ``run`` to this figure."""
        with self._lock:
            self._points[run] = {}

        def on_metrics(records):
            with self._lock:
                ranks = self._points[run]
                for r in records:
                    xv, yv = r.get(self.x), r.get(self.y)
                    if xv is not None and yv is not None and xv == xv and yv == yv:  # no NaN
                        ranks.setdefault(r["rank"], []).append((r[self.x], r[self.y]))
            if time.monotonic() - self._last_draw >= self.min_interval:
                self.draw()
        return on_metrics

    def add_frame(self, df: pd.DataFrame, run: str) -> None:
        """Add a finished run's metrics (a tidy frame) as one more line."""
        on_metrics = self.callback(run)
        on_metrics(df.to_dict("records"))
        self.draw()

    def lines(self) -> dict[str, tuple[list, list]]:
        """``{trace name: (xs, ys)}`` as drawn: what a test or an assertion cell can check."""
        out = {}
        with self._lock:
            for run, ranks in self._points.items():
                if self.per_rank:
                    for rank, pts in sorted(ranks.items()):
                        out[f"{run} · rank {rank}"] = ([p[0] for p in pts], [p[1] for p in pts])
                elif ranks and self.x == "step":   # ranks share steps: average them
                    df = pd.DataFrame([(x, y) for pts in ranks.values() for x, y in pts],
                                      columns=["x", "y"]).groupby("x", sort=True)["y"].mean()
                    out[run] = (df.index.tolist(), df.tolist())
                elif ranks:   # time, bytes...: each rank has its own x; draw the first rank
                    pts = ranks[min(ranks)]
                    out[run] = ([p[0] for p in pts], [p[1] for p in pts])
        return out

    def draw(self) -> None:
        """Redraw every line now (also called at the end of each run)."""
        self._last_draw = time.monotonic()
        lines = self.lines()
        fig = self.figure
        with fig.batch_update():
            existing = {t.name: t for t in fig.data}
            for name, (xs, ys) in lines.items():
                if name in existing:
                    existing[name].x, existing[name].y = xs, ys
                else:
                    fig.add_scatter(x=xs, y=ys, mode="lines", name=name)

    def clear(self) -> None:
        with self._lock:
            self._points.clear()
        self.figure.data = []

    def static(self) -> go.Figure:
        """A plain ``go.Figure`` copy, for HTML reports."""
        self.draw()
        return go.Figure(self.figure)


COMM_KINDS = ("all_reduce", "broadcast", "send", "recv", "all_gather", "reduce_scatter")
"""Event kinds drawn on a rank's communication row of :func:`timeline_figure`."""


def timeline_figure(events, title: str = "compute and communication per rank",
                    height: int | None = None) -> go.Figure:
    """A per-rank timeline: what each rank was doing when, in milliseconds.

    Args:
        events: dicts (or a DataFrame) with ``rank``, ``kind``, ``start`` and ``end``
            (seconds on one clock, e.g. ``time.time()``). Kinds in :data:`COMM_KINDS` go on
            the rank's communication row, the others on its compute row, so bars that
            overlap in time show communication hidden behind computation.
    """
    df = pd.DataFrame(events)
    t0 = df["start"].min()
    df = df.assign(start_ms=(df["start"] - t0) * 1e3, ms=(df["end"] - df["start"]) * 1e3,
                   row=[f"rank {r} · {'comm' if k in COMM_KINDS else 'compute'}"
                        for r, k in zip(df["rank"], df["kind"])])
    rows = sorted(df["row"].unique(), reverse=True)   # rank 0 at the top
    fig = go.Figure(layout=dict(
        title=title, barmode="overlay", height=height or 120 + 40 * len(rows),
        xaxis_title="time (ms)", template="plotly_white", margin=dict(l=110, r=20, t=50, b=50),
        yaxis=dict(categoryorder="array", categoryarray=rows)))
    for kind, part in df.groupby("kind", sort=False):
        fig.add_bar(y=part["row"], x=part["ms"], base=part["start_ms"], orientation="h",
                    name=kind, opacity=0.8 if kind in COMM_KINDS else 1.0,
                    customdata=part[["step"]] if "step" in part else None,
                    hovertemplate=f"{kind}<br>%{{base:.1f}} ms + %{{x:.2f}} ms<extra></extra>")
    return fig
