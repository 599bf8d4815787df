"""Exercises: students write a piece of an algorithm; a checker runs it on real processes.

Each lab's exercises live in a module here (``distlab.exercises.collectives`` for lab 01,
and so on) with three things per exercise:

* a ``check_<name>(student_fn, ...)`` function that runs the student's code on real
  processes and returns a :class:`Verdict` whose text says what is right or exactly where
  it went wrong (which rank, which chunk, which step);
* the reference solution, a plain function;
* its registration with :func:`register`, so :func:`solution` can reveal it.

Solutions are hidden unless the instructor enables them: ``DISTLAB_SOLUTIONS=1`` in the
environment (or ``distlab.exercises.solution(name, reveal=True)``), so the same labs can be
handed out with or without them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from distlab.course.settings import solutions_enabled

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
