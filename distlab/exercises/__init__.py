"""Exercises: students write a piece of an algorithm; a checker runs it on real processes.

Each lab's exercises live in a module here (``distlab.exercises.collectives`` for lab 01,
and so on) with three things per exercise:

* a ``check_<name>(student_fn, ...)`` function that runs the student's code on real
  processes and returns a :class:`Verdict` whose text says what is right or exactly where
  it went wrong (which rank, which chunk, which step);
* the reference solution, a plain function;
* its registration with :func:`register`, so :func:`solution` can reveal it.

Every checker stands on the same skeleton, :func:`launch_student`: refuse what is not a
function, launch the student's code on real processes, and turn a failing, crashing or
deadlocked rank into a :class:`Verdict` that names the rank; the lab-specific part of a
checker only reads the results and explains what is wrong.

Solutions are hidden unless the instructor enables them: ``DISTLAB_SOLUTIONS=1`` in the
environment (or ``distlab.exercises.solution(name, reveal=True)``), so the same labs can be
handed out with or without them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from distlab.course.settings import solutions_enabled
from distlab.launcher import WorkerError, launch

_SOLUTIONS: dict[str, Callable] = {}


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: ``ok`` and a message meant for the student."""
    ok: bool
    message: str

    def __bool__(self):
        return self.ok

    def _repr_html_(self):
        color = "#070" if self.ok else "#b00"
        mark = "✔" if self.ok else "✘"
        return f"<div style='color:{color}'><b>{mark}</b> {self.message}</div>"

    def __str__(self):
        return ("PASS: " if self.ok else "NOT YET: ") + self.message


def launch_student(name: str, student_fn, worker: Callable, world_size: int, *args,
                   timeout: float = 30, hang_hint: str = ""):
    """The checker skeleton: run ``worker(*args)`` on ``world_size`` real processes.

    Returns ``(results, None)`` when every rank finished, or ``(None, verdict)`` (test it
    with ``is not None``: a failing Verdict is falsy) when
    ``student_fn`` is not callable, a rank raised or died (the verdict names the rank and
    why), or the run did not finish within ``timeout`` seconds (``hang_hint`` says what
    usually deadlocks in this exercise).
    """
    if not callable(student_fn):
        return None, Verdict(False, f"{name} must be a function, got "
                                    f"{type(student_fn).__name__}")
    try:
        return launch(worker, world_size, *args, timeout=timeout), None
    except WorkerError as e:
        if "timed out" in e.reason:
            hint = f": {hang_hint}" if hang_hint else ""
            return None, Verdict(False, f"it did not finish in {timeout:g} s{hint}")
        return None, Verdict(False, f"rank {e.rank} failed: {e.reason}")


def register(name: str):
    """Decorator: register a reference solution under ``name``."""
    def deco(fn):
        _SOLUTIONS[name] = fn
        return fn
    return deco


def solution(name: str, reveal: bool | None = None) -> str:
    """The source of the reference solution ``name``, if solutions are enabled."""
    _load_all()
    if name not in _SOLUTIONS:
        raise KeyError(f"no exercise named {name!r}; known: {sorted(_SOLUTIONS)}")
    if not (solutions_enabled() if reveal is None else reveal):
        return (f"The solution to {name!r} is hidden. Your instructor can reveal it with "
                "DISTLAB_SOLUTIONS=1.")
    return inspect.getsource(_SOLUTIONS[name])


def names() -> list[str]:
    """Every registered exercise."""
    _load_all()
    return sorted(_SOLUTIONS)


def _load_all():
    import importlib
    import pkgutil
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
