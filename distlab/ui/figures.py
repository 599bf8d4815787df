"""Plotly figures for the labs, including live ones that grow while a run goes on.

:class:`LiveFigure` wraps a ``plotly.graph_objects.FigureWidget``. Give
:meth:`LiveFigure.callback` to :func:`distlab.start` as ``on_metrics``: the workers'
records arrive on a background thread, are buffered, and are drawn at most a few times a
second, so the notebook stays responsive however fast the workers report.

A page built without a live kernel (the course website, ``docs/``) cannot show a
``FigureWidget``. The docs build sets ``DISTLAB_STATIC_FIGURES=1`` (:data:`STATIC`); then every
figure is shown as plotly HTML that needs only plotly.js, which the site serves from the
plotly package, and a :class:`LiveFigure` redraws its copy in place as runs finish. In
JupyterLab nothing changes.
"""
from __future__ import annotations

import os
import threading
import time

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer

STATIC = os.environ.get("DISTLAB_STATIC_FIGURES", "0") not in ("", "0", "false", "False")
"""True under ``DISTLAB_STATIC_FIGURES=1``: figures are drawn for a static page (see above)."""

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
        self.figure = (PageFigureWidget if STATIC else go.FigureWidget)(layout=dict(
            title=title or f"{axis_title(y)} against {axis_title(x)}", height=height,
            xaxis_title=axis_title(x), yaxis_title=axis_title(y),
            yaxis_type="log" if log_y else "linear", margin=dict(l=60, r=20, t=50, b=50),
            template="plotly_white"))
        self._points: dict[str, dict[int, list]] = {}
        self._lock = threading.Lock()
        self._last_draw = 0.0

    def _ipython_display_(self):
        from IPython.display import display
        display(self.figure)

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
        if STATIC:
            fig.redraw_page()

    def clear(self) -> None:
        with self._lock:
            self._points.clear()
        self.figure.data = []
        if STATIC:
            self.figure.redraw_page()

    def static(self) -> go.Figure:
        """A plain ``go.Figure`` copy, for HTML reports."""
        self.draw()
        return go.Figure(self.figure)


class PageFigureWidget(go.FigureWidget):
    """A ``FigureWidget`` that shows itself as a static figure, redrawn in place.

    What :class:`LiveFigure` draws into under :data:`STATIC`: it still is a widget (a panel
    lays it out among its controls), but displaying it shows :func:`page_html` of it, and
    :meth:`redraw_page` replaces every copy shown so far, so a page built by executing a lab
    shows each figure as the lab left it rather than as it was when first displayed.
    """

    _esm = "export default {}"   # never drawn as a widget: not plotly's 5 MB bundle as state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._page_copies = []   # one IPython DisplayHandle per time this figure was shown

    def _ipython_display_(self):
        from IPython.display import display
        self._page_copies.append(display(page_html(self), raw=True, display_id=True))

    def redraw_page(self) -> None:
        """Replace every copy shown so far by the figure as it is now."""
        for copy in self._page_copies:
            copy.update(page_html(self), raw=True)


def page_html(fig: go.Figure) -> dict:
    """``fig`` as a ``text/html`` bundle for a static page: a plotly div and its script.

    Neither plotly.js nor MathJax comes with it (nothing from a CDN either): the page loads
    plotly.js once, from the copy in the plotly package (``docs/conf.py`` serves it).
    """
    return {"text/html": pio.to_html(fig, full_html=False, include_plotlyjs=False,
                                     include_mathjax=False)}


class _PageRenderer(MimetypeRenderer):
    """Plotly's renderer under :data:`STATIC`: every ``go.Figure`` a lab shows is drawn by
    :func:`page_html` (plotly's own notebook renderers embed plotly.js or fetch it)."""

    def to_mimebundle(self, fig_dict):
        return page_html(fig_dict)


if STATIC:
    pio.renderers["distlab_page"] = _PageRenderer()
    pio.renderers.default = "distlab_page"


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
