"""The control panel every lab uses: controls, Run and Stop, a status line, live figures.

A :class:`RunPanel` never blocks the notebook: Run starts the workers with
:func:`distlab.start` and returns at once; the figures update from the run's records as
they arrive; Stop ends every worker. A failed run shows which rank failed and why.
Assertion cells (and nbval) drive the same panel with :meth:`RunPanel.run` and
:meth:`RunPanel.wait`, so what CI checks is what students click.
"""
from __future__ import annotations

import dataclasses
import html
import threading
import time
from typing import Any, Callable

import ipywidgets as W
import pandas as pd

from distlab.launcher import Run
from distlab.ui.figures import STATIC, LiveFigure


def configure(config: Any, values: dict) -> Any:
    """``config`` (a frozen dataclass) with the controls' ``values`` set, nested ones too.

    A value whose name is not a field of ``config`` goes to the one dataclass field of
    ``config`` that has it (an algorithm's ``workload.lr``, say). The new config validates
    itself, so a bad control value is refused before any process starts.
    """
    own = {f.name for f in dataclasses.fields(config)}
    top = {k: v for k, v in values.items() if k in own}
    nested: dict[str, dict] = {}
    for k, v in values.items():
        if k in own:
            continue
        homes = [f.name for f in dataclasses.fields(config)
                 if dataclasses.is_dataclass(getattr(config, f.name))
                 and k in {g.name for g in dataclasses.fields(getattr(config, f.name))}]
        if len(homes) != 1:
            raise ValueError(f"control {k!r} is not a setting of {type(config).__name__}")
        nested.setdefault(homes[0], {})[k] = v
    for name, vals in nested.items():
        top[name] = dataclasses.replace(getattr(config, name), **vals)
    return dataclasses.replace(config, **top)


def describe(values: dict) -> str:
    """A short run name from control values: ``"world_size=4 lr=0.1"``."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in values.items())


class RunPanel:
    """Controls, Run/Stop buttons, a status line, live figures and the workers' log.

    Any algorithm with a configuration dataclass and the verb ``start(config, **launch)``
    plugs in the same way: give its ``start`` and a base ``config``; each Run calls
    ``start(configure(config, values), on_metrics=..., on_output=...)``.

    Args:
        controls: ``{name: widget}``; each widget's value sets the config field of that name.
        start: the algorithm's ``start(config, **launch) -> distlab.Run``; it must not block.
            Without ``config``: ``start(on_metrics=..., on_output=..., **values)``.
        figures: the :class:`~distlab.ui.figures.LiveFigure` objects every run draws into.
        name: ``name(values) -> str``, the legend entry of a run (default: :func:`describe`).
        config: the base configuration the controls modify (see :func:`configure`).
    """

    def __init__(self, controls: dict[str, W.Widget], start: Callable[..., Run],
                 figures: list[LiveFigure], name: Callable[[dict], str] = describe,
                 config: Any = None):
        self.controls, self._start, self.figures, self._name = controls, start, figures, name
        self.config = config
        self.runs: dict[str, Run] = {}
        self.current: Run | None = None
        self.run_button = W.Button(description="Run", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop",
                                    disabled=True)
        self.clear_button = W.Button(description="Clear plots", icon="eraser")
        self.status = W.HTML(value="<i>ready</i>")
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto",
                                            border="1px solid #ddd"))
        self.run_button.on_click(lambda _: self._click_run())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.widget = W.VBox([
            W.HBox(list(controls.values()), layout=W.Layout(flex_flow="row wrap")),
            W.HBox([self.run_button, self.stop_button, self.clear_button, self.status]),
            *[f.figure for f in figures],
            W.Accordion(children=[self.log], titles=("worker output",)),
        ])

    def _ipython_display_(self):
        from IPython.display import display
        if STATIC:     # a page built without a kernel: the figures, redrawn as runs finish
            display(*self.figures)
            return
        display(self.widget)

    def values(self) -> dict:
        return {k: w.value for k, w in self.controls.items()}

    def _click_run(self):
        try:
            self.run()
        except Exception as e:  # bad input: say so in the panel, start nothing
            self._set_status(f"<b style='color:#b00'>{html.escape(str(e))}</b>")

    def run(self, **overrides) -> Run:
        """Start a run with the controls' values (``overrides`` set controls first)."""
        for k, v in overrides.items():
            self.controls[k].value = v
        if self.current is not None and not self.current.done:
            raise RuntimeError("a run is already going; press Stop first")
        values = self.values()
        name = self._name(values)
        callbacks = [f.callback(name) for f in self.figures]

        def on_metrics(records):
            for cb in callbacks:
                cb(records)

        def on_output(rank, stream, text):
            lines = "".join(f"[rank {rank}] {ln}\n" for ln in text.splitlines())
            (self.log.append_stderr if stream == "stderr" else self.log.append_stdout)(lines)

        if self.config is not None:
            run = self._start(configure(self.config, values), on_metrics=on_metrics,
                              on_output=on_output)
        else:
            run = self._start(on_metrics=on_metrics, on_output=on_output, **values)
        self.current = self.runs[name] = run
        self.run_button.disabled, self.stop_button.disabled = True, False
        self._set_status(f"running <b>{html.escape(name)}</b> on {run.world_size} processes…")
        threading.Thread(target=self._watch, args=(run, name), daemon=True).start()
        return run

    def _watch(self, run: Run, name: str):
        t0 = time.monotonic()
        run.wait()
        for f in self.figures:
            f.draw()
        if run.error is None:
            self._set_status(f"done: <b>{html.escape(name)}</b> in {time.monotonic() - t0:.1f} s")
        else:
            self._set_status(f"<b style='color:#b00'>{html.escape(str(run.error).splitlines()[0])}"
                             f"</b>")
        self.run_button.disabled, self.stop_button.disabled = False, True

    def _set_status(self, text: str):
        self.status.value = text

    def stop(self):
        """Stop the current run (every worker is terminated)."""
        if self.current is not None:
            self.current.stop()

    def wait(self, timeout: float | None = None) -> Run:
        """Wait for the current run and its final redraw; raise its error if it failed."""
        run = self.current
        run.result() if timeout is None else run.wait(timeout)
        for f in self.figures:
            f.draw()
        return run

    def clear(self):
        """Forget earlier runs and empty the figures."""
        self.runs.clear()
        for f in self.figures:
            f.clear()

    def metrics(self) -> pd.DataFrame:
        """All runs' records as one tidy frame, with a ``run`` column."""
        frames = [r.metrics().assign(run=n) for n, r in self.runs.items()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
