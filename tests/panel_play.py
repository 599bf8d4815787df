"""Execute a lab as a student goes through it: every cell in turn, and right after each cell
that shows a :class:`~distlab.ui.panel.RunPanel`, a play with that panel: every control moved
to another allowed value, Run, wait, Run again and Stop. Then the cells below run, so an
assertion cell that read the panel's history fails here.

Two halves. :func:`execute` runs in the test process: it drives a kernel through nbclient,
one cell at a time, and after each cell executes a play cell that is never written into the
notebook. :func:`record_shown_panels` and :func:`play_shown` run inside that kernel, on the
panel objects themselves (the widgets' ``click()`` calls the handlers a browser click would).
"""
from __future__ import annotations

import html
import math
import re
import time
from pathlib import Path

PLAY_TIMEOUT = 300
"""Seconds one played run (or a stop) may take at the small setting before the play fails."""
TESTS = Path(__file__).resolve().parent

SETUP = f"""\
import sys
sys.path.insert(0, {str(TESTS)!r})
import panel_play
panel_play.record_shown_panels()
"""
PLAY = f"panel_play.play_shown(timeout={PLAY_TIMEOUT})"


class LabFailed(Exception):
    """A cell of the lab, or the play with the panel a cell showed, failed."""


def execute(nb, *, cwd, env: dict, timeout: int = 600) -> None:
    """Execute ``nb`` in place in a fresh kernel (environment ``env``, working folder
    ``cwd``), playing with each panel right after the cell that shows it.

    Raises:
        LabFailed: naming the cell (its number and first line) that failed or whose panel
            did not play; the cells before it keep their outputs.
    """
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    with client.setup_kernel(env=env):
        _execute_hidden(client, SETUP, 0)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except Exception as e:   # an error in the cell, a timeout, a dead kernel...
                raise LabFailed(f"cell {index} ({_first_line(cell)}) failed:\n{_why(e)}") from e
            try:
                _execute_hidden(client, PLAY, index)
            except Exception as e:
                raise LabFailed(f"playing the panel that cell {index} ({_first_line(cell)}) "
                                f"shows failed:\n{_why(e)}") from e


def _why(error: Exception) -> str:
    """A cell's error as nbclient tells it (the traceback), or any other error's type and text."""
    from nbclient.exceptions import CellExecutionError
    return str(error) if isinstance(error, CellExecutionError) else f"{type(error).__name__}: {error}"


def _execute_hidden(client, source: str, index: int) -> None:
    """Execute ``source`` in the kernel as if it were cell ``index`` (so the figures it
    redraws update that cell's outputs), without writing it into the notebook."""
    import nbformat
    cell = client.nb.cells[index]
    try:
        client.execute_cell(nbformat.v4.new_code_cell(source), index, store_history=False)
    finally:
        client.nb.cells[index] = cell      # nbclient writes the executed cell back there


def _first_line(cell) -> str:
    lines = [ln for ln in cell.source.splitlines() if ln.strip()]
    return repr(lines[0][:80]) if lines else "empty"


# --- inside the kernel -------------------------------------------------------------------

SHOWN: list = []
"""The panels displayed since the last :func:`play_shown`, in display order."""


class PanelPlayError(AssertionError):
    """The panel did not behave as a student expects."""


def record_shown_panels() -> None:
    """From now on, every RunPanel displayed in this kernel is noted in :data:`SHOWN`."""
    from distlab.ui.panel import RunPanel
    show = RunPanel._ipython_display_

    def noted(panel):
        if panel not in SHOWN:
            SHOWN.append(panel)
        return show(panel)
    RunPanel._ipython_display_ = noted


def play_shown(timeout: float = PLAY_TIMEOUT) -> None:
    """Play with every panel shown since the last call (see :func:`play`)."""
    while SHOWN:
        play(SHOWN.pop(0), timeout)


def play(panel, timeout: float = PLAY_TIMEOUT) -> None:
    """Move every control to another allowed value, press Run and wait for the run, then
    press Run and Stop; each time the panel must come back ready (Run enabled).

    The run must succeed, except on a panel that injects failures on purpose (a control
    named ``fault...`` or ``fail...``, as lab 07's): there a failed run must say why in the
    status line, as the panel promises.
    """
    moved = move_controls(panel)
    run = _press_run(panel, timeout)
    if not run.wait(timeout):
        raise PanelPlayError(f"the run with {moved} did not finish in {timeout} s")
    _until_ready(panel, timeout)
    if run.error is not None:
        injects = any(name.startswith(("fault", "fail")) for name in panel.controls)
        why = str(run.error).splitlines()[0]
        if not injects:
            raise PanelPlayError(f"the run with {moved} failed: {run.error}")
        if why not in _status(panel):
            raise PanelPlayError(f"the failed run's status reads {_status(panel)!r}, not {why!r}")
    run = _press_run(panel, timeout)
    if panel.stop_button.disabled:
        raise PanelPlayError("Stop is disabled while a run is going")
    panel.stop_button.click()
    if not run.wait(timeout):
        raise PanelPlayError(f"the run with {moved} did not stop in {timeout} s")
    _until_ready(panel, timeout)
    status = _status(panel)
    if run.error is not None and "stopped" not in status:
        raise PanelPlayError(f"after Stop the status reads {status!r}: the run was not stopped")


def move_controls(panel) -> dict:
    """Set every control to a neighbouring allowed value (one notch down where it can,
    else up; the other choice of a checkbox): ``{name: (old, new)}``. A value is allowed
    when the panel's config takes it (:func:`~distlab.ui.panel.configure` raises nothing);
    a panel without a config takes what its start function takes, checked by Run."""
    from distlab.ui.panel import configure
    moved = {}
    for name, widget in panel.controls.items():
        old, restore = widget.value, _setter(widget)
        for move in _moves(widget):
            move()
            if panel.config is None or _accepted(configure, panel):
                moved[name] = (old, widget.value)
                break
            restore()
        else:
            raise PanelPlayError(f"control {name!r} ({type(widget).__name__} at {old!r}) has no "
                                 f"other value the config accepts")
    return moved


def _accepted(configure, panel) -> bool:
    try:
        configure(panel.config, panel.values())
    except (ValueError, TypeError):
        return False
    return True


def _setter(widget):
    """A function that puts ``widget`` back where it is now."""
    if hasattr(widget, "options"):
        index = widget.index
        return lambda: setattr(widget, "index", index)
    value = widget.value
    return lambda: setattr(widget, "value", value)


def _moves(widget) -> list:
    """The neighbouring values of a control, nearest first, as functions that set one."""
    def put(attr, value):
        return lambda: setattr(widget, attr, value)
    if hasattr(widget, "options"):           # Dropdown, SelectionSlider, ToggleButtons...
        i, n = widget.index, len(widget.options)
        if i is None:   # ipywidgets gives no index for an option whose value is None
            values = [o[1] if isinstance(o, tuple) else o for o in widget.options]
            i = values.index(widget.value) if widget.value in values else 0
        return [put("index", j) for j in sorted(set(range(n)) - {i}, key=lambda j: (abs(j - i), j))]
    if isinstance(widget.value, bool):       # Checkbox, ToggleButton
        return [put("value", not widget.value)]
    if hasattr(widget, "base"):              # FloatLogSlider: min, max and step are exponents
        e = math.log(widget.value, widget.base)
        return [put("value", widget.base ** x) for x in (e - widget.step, e + widget.step)
                if widget.min - 1e-9 <= x <= widget.max + 1e-9]
    if hasattr(widget, "step") and hasattr(widget, "min"):   # IntSlider, FloatSlider
        return [put("value", x) for x in (widget.value - widget.step, widget.value + widget.step)
                if widget.min <= x <= widget.max]
    raise PanelPlayError(f"no student move is known for a {type(widget).__name__}")


def _press_run(panel, timeout: float):
    _until_ready(panel, timeout)
    before = panel.current
    panel.run_button.click()
    if panel.current is before:
        raise PanelPlayError(f"Run started nothing; the status reads {_status(panel)!r}")
    return panel.current


def _until_ready(panel, timeout: float) -> None:
    """Wait for the Run button to be enabled again (the panel's watcher has drawn)."""
    deadline = time.monotonic() + timeout
    while panel.run_button.disabled:
        if time.monotonic() > deadline:
            raise PanelPlayError(f"Run stayed disabled for {timeout} s; status {_status(panel)!r}")
        time.sleep(0.05)


def _status(panel) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", panel.status.value))
