"""The student's play with a panel (tests/panel_play.py), on panels whose runs are stand-ins:
it moves every control to a value the config takes, and it fails a panel whose Stop does
not stop or whose run fails."""
import threading
from dataclasses import dataclass, field

import ipywidgets as W
import pytest

import panel_play
from distlab.ui.panel import RunPanel


@dataclass(frozen=True)
class Workload:
    lr: float = 0.1


@dataclass(frozen=True)
class Config:
    world_size: int = 2
    variant: str = "b"
    lock: bool = False
    workload: Workload = field(default_factory=Workload)

    def __post_init__(self):
        if self.world_size < 2:
            raise ValueError(f"world_size={self.world_size} is not allowed; use 2..4")


class StandInRun:
    """What a RunPanel needs of a distlab.Run: it ends by itself after ``seconds`` (with
    ``error``, if given), or when stopped, unless it ignores Stop."""

    def __init__(self, seconds=0.05, error=None, ignores_stop=False):
        self.world_size, self.error, self._ignores_stop = 2, None, ignores_stop
        self._done = threading.Event()
        self._timer = threading.Timer(seconds, self._end, args=(error,))
        self._timer.start()

    def _end(self, error):
        if not self._done.is_set():
            self.error = error
            self._done.set()

    @property
    def done(self):
        return self._done.is_set()

    def wait(self, timeout=None):
        return self._done.wait(timeout)

    def stop(self):
        if not self._ignores_stop:
            self._end(RuntimeError("stopped by the user"))


def panel_with(controls=None, config=None, **run):
    controls = controls or {"world_size": W.IntSlider(value=2, min=1, max=4)}
    return RunPanel(controls, lambda *args, **kwargs: StandInRun(**run), figures=[],
                    config=config)


def test_every_control_moves_to_a_neighbouring_value_the_config_takes():
    panel = panel_with({
        "world_size": W.IntSlider(value=2, min=1, max=4),      # 1 is refused by the config
        "variant": W.Dropdown(options=["a", "b", "c"], value="b"),
        "lock": W.Checkbox(value=False),
        "lr": W.FloatLogSlider(value=0.1, base=10, min=-2, max=0),  # the workload's field
    }, config=Config())
    moved = panel_play.move_controls(panel)
    assert moved["world_size"] == (2, 3)
    assert moved["variant"] == ("b", "a") and moved["lock"] == (False, True)
    assert moved["lr"][1] == pytest.approx(10 ** -1.1)


def test_a_control_with_no_other_allowed_value_fails_the_play():
    panel = panel_with({"world_size": W.IntSlider(value=2, min=1, max=2)}, config=Config())
    with pytest.raises(panel_play.PanelPlayError, match="no other value the config accepts"):
        panel_play.move_controls(panel)


def test_a_panel_that_runs_and_stops_passes_the_play():
    panel = panel_with(seconds=0.2)
    panel_play.play(panel, timeout=10)
    assert "stopped" in panel_play._status(panel)


def test_a_run_that_fails_fails_the_play():
    panel = panel_with(error=RuntimeError("rank 1 failed: boom"))
    with pytest.raises(panel_play.PanelPlayError, match="rank 1 failed: boom"):
        panel_play.play(panel, timeout=10)


def test_a_stop_that_does_not_stop_fails_the_play():
    panel = panel_with({"fail_rank": W.IntSlider(value=1, min=0, max=3)}, seconds=0.3,
                       error=RuntimeError("rank 1 failed: injected fault"), ignores_stop=True)
    with pytest.raises(panel_play.PanelPlayError, match="the run was not stopped"):
        panel_play.play(panel, timeout=10)


def test_a_dropdown_whose_value_is_none_moves_to_its_other_options():
    menu = W.Dropdown(options=[("none", None), ("one", 1), ("two", 2)], value=None)
    assert menu.index is None          # ipywidgets' own answer for a None value
    values = []
    for move in panel_play._moves(menu):
        move()
        values.append(menu.value)
    assert values == [1, 2]
