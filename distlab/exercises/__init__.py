"""Assignments: students write a piece of an algorithm; a checker runs it on real processes.

Each lab's checkers live in a module here (``distlab.exercises.collectives`` for lab 01, and
so on). A checker ``check_<what>(student_fn, *, points, <case parameters>)`` runs the
student's code on real processes and returns a :class:`Verdict`: whether it is right, the
points it earns out of ``points``, and a message that says exactly where it went wrong
(which rank, which chunk, which step, expected against got). No reference solution lives in
distlab: a checker computes what is right from torch's built-ins or from distlab's own
library, and wraps the student's call in :func:`forbid` so that the student cannot simply
call that library function.

Every checker stands on the same skeleton, :func:`launch_student`: refuse what is not a
function, launch the student's code on real processes with their output captured, and turn
a stub that is not implemented yet, a failing, crashing or deadlocked rank into a failing
:class:`Verdict` that names the rank; the lab-specific part of a checker only reads the
results and explains what is wrong.

In a notebook a check cell reads (nbgrader's partial-credit rule: the cell's value is its
score)::

    verdict = exercise.check_ring_all_reduce(my_ring_all_reduce, points=8)
    verdict &= exercise.check_ring_all_reduce(my_ring_all_reduce, points=8, world_size=3)
    verdict.report()
"""
from __future__ import annotations

import ast
import collections
import contextlib
import importlib
import inspect
import sys
import textwrap
import threading
from dataclasses import dataclass
from typing import Callable

from distlab.checks import is_int, is_number, require, require_arg
from distlab.errors import PEER_LOST_MARKERS
from distlab.launcher import WorkerError, launch, warm_up

OUTPUT_LINES = 12
"""How many of a failing rank's last output lines a verdict quotes."""

NOT_IMPLEMENTED = ("{name} is not implemented yet: replace `raise NotImplementedError()` "
                   "with your code")

TRACEBACK_LINES = 6
"""How many of a failing rank's last traceback lines a verdict quotes."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: ``ok``, a message for the student, and the points earned.

    ``points`` out of ``max_points`` (a failing check may still earn part of them, e.g. the
    reduce-scatter half right: half the points). ``a & b`` is the verdict of both checks
    of one part: ok if both are, the lower fraction of the points, both messages (a line
    already said is not repeated).
    """
    ok: bool
    message: str
    points: float = 0.0
    max_points: float = 0.0

    def __post_init__(self):
        require(self, "max_points", is_number(self.max_points) and self.max_points >= 0,
                "a number >= 0")
        require(self, "points", is_number(self.points)
                and 0 <= self.points <= self.max_points, f"a number in 0..{self.max_points}")

    def __bool__(self):
        return self.ok

    def __and__(self, other: Verdict) -> Verdict:
        if not isinstance(other, Verdict):
            return NotImplemented
        max_points = max(self.max_points, other.max_points)
        lines = self.message.split("\n")
        message = "\n".join(lines + [m for m in other.message.split("\n") if m not in lines])
        return Verdict(self.ok and other.ok, message,
                       max_points * min(self.fraction, other.fraction), max_points)

    @property
    def fraction(self) -> float:
        """The share of the points earned (1 or 0 for a check worth no points)."""
        if self.max_points == 0:
            return 1.0 if self.ok else 0.0
        return self.points / self.max_points

    def report(self) -> float:
        """Print the feedback (to stdout) and return the points: a check cell's value."""
        print(self)
        return float(self.points)

    def _repr_html_(self):
        color = "#070" if self.ok else "#b00"
        mark = "✔" if self.ok else "✘"
        text = self.message.replace("&", "&amp;").replace("<", "&lt;").replace("\n", "<br>")
        return f"<div style='color:{color}'><b>{mark}{self._score()}</b> {text}</div>"

    def __str__(self):
        return ("PASS" if self.ok else "NOT YET") + f"{self._score()}: {self.message}"

    def _score(self) -> str:
        return f" ({self.points:g}/{self.max_points:g} points)" if self.max_points else ""


def launch_student(name: str, student_fn, worker: Callable, world_size: int, *args,
                   timeout: float = 30, hang_hint: str = "", points: float = 0.0):
    """The checker skeleton: run ``worker(*args)`` on ``world_size`` real processes.

    Returns ``(results, None)`` when every rank finished, or ``(None, verdict)`` (test it
    with ``is not None``: a failing Verdict is falsy), a Verdict worth 0 of ``points``, when
    ``student_fn`` is not callable, is not implemented yet (it raised NotImplementedError),
    called a function :func:`forbid` put off limits, a rank raised or died (the verdict
    names the rank and why), or the run did not finish within ``timeout`` seconds
    (``hang_hint`` says what usually deadlocks in this exercise); the time limit starts
    once the process server is up, so a fresh kernel's first check is not cut short.

    The workers' output (prints, warnings) is captured, never forwarded to the cell's
    stderr, which would cost the cell its points in nbgrader; a failing verdict quotes
    its last lines.
    """
    def fail(message: str):
        return None, Verdict(False, message, 0.0, points)

    if not callable(student_fn):
        return fail(f"{name} must be a function, got {type(student_fn).__name__}")
    if is_stub(student_fn):          # the released stub, untouched: no process needed
        return fail(NOT_IMPLEMENTED.format(name=name))
    warm_up()          # the time limit is the student's: not the forkserver's start
    output = _OutputTail()
    try:
        return launch(worker, world_size, *args, timeout=timeout, on_output=output), None
    except WorkerError as e:
        reasons = [e.reason, *e.failures.values()]
        if any(r.startswith("raised NotImplementedError") for r in reasons):
            return fail(NOT_IMPLEMENTED.format(name=name))
        forbidden = [r for r in reasons if r.startswith(f"raised {ForbiddenCall.__name__}")]
        if forbidden:
            return fail(forbidden[0].split(": ", 1)[1])
        hint = f": {hang_hint}" if hang_hint else ""
        if e.reason.startswith("timed out"):
            return fail(f"it did not finish in {timeout:g} s{hint}" + output.tail(None))
        if any(marker in e.reason for marker in PEER_LOST_MARKERS):   # and none failed first
            return fail(f"rank {e.rank} was still waiting for a message when its peer had "
                        f"finished or died{hint}" + output.tail(e.rank))
        return fail(f"rank {e.rank} failed: {e.reason}" + _last_lines(e.worker_traceback)
                    + output.tail(e.rank))


class ForbiddenCall(RuntimeError):
    """The student's code called a function that this assignment puts off limits."""


@contextlib.contextmanager
def forbid(*dotted_names: str, why: str):
    """Inside the block, calling any of ``dotted_names`` raises :class:`ForbiddenCall`.

    Used in a checker's worker around the call of the student's function, so that the
    student writes e.g. the all-reduce instead of calling ``"torch.distributed.all_reduce"``
    or ``"distlab.communication.collectives.ring_all_reduce"``. The function is recognized
    by its code, so an alias (``from torch.distributed import all_reduce as ar``) is caught
    too; a forbidden call the student's code catches is raised again when the block ends.
    """
    if not dotted_names:
        raise ValueError("forbid needs at least one dotted name, e.g. "
                         "'torch.distributed.all_reduce'")
    codes, builtins = {}, {}
    for dotted in dotted_names:
        fn = inspect.unwrap(_resolve(dotted))
        if hasattr(fn, "__code__"):
            codes[fn.__code__] = dotted
        else:
            builtins[id(fn)] = dotted
    caught: list[str] = []

    def on_call(frame, event, arg):
        dotted = (codes.get(frame.f_code) if event == "call" else
                  builtins.get(id(arg)) if event == "c_call" else None)
        if dotted is not None:
            message = f"{dotted} is off limits in this assignment: {why}"
            caught.append(message)
            raise ForbiddenCall(message)   # (this also switches the profiler off)

    before, before_threads = sys.getprofile(), threading.getprofile()
    sys.setprofile(on_call)
    threading.setprofile(on_call)          # threads the student's code starts, too
    try:
        yield
    finally:
        sys.setprofile(before)
        threading.setprofile(before_threads)
    if caught:
        raise ForbiddenCall(caught[0])


def _resolve(dotted: str):
    """The object ``"package.module.attr.attr"`` names, importing the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        if callable(obj):
            return obj
        break
    raise ValueError(f"forbid: {dotted!r} names no function")


class _OutputTail:
    """``on_output`` for the launcher: keeps the last lines each rank wrote."""

    def __init__(self):
        self._lines: dict[int, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=OUTPUT_LINES))
        self._partial: dict[int, str] = collections.defaultdict(str)

    def __call__(self, rank: int, stream: str, text: str) -> None:
        *lines, self._partial[rank] = (self._partial[rank] + text).split("\n")
        self._lines[rank].extend(lines)

    def tail(self, rank: int | None) -> str:
        """The last lines of ``rank`` (every rank for None), as a message suffix."""
        ranks = sorted(self._lines.keys() | self._partial.keys()) if rank is None else [rank]
        parts = []
        for r in ranks:
            lines = [*self._lines.get(r, ()), self._partial.get(r, "")]
            lines = [line for line in lines if line.strip()][-OUTPUT_LINES:]
            if lines:
                parts.append(f"\nlast output of rank {r}:\n" + "\n".join(lines))
        return "".join(parts)


def is_stub(fn) -> bool:
    """True for a function whose body (its docstring aside) is ``raise NotImplementedError()``."""
    if not inspect.isfunction(fn):
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    body = tree.body[0].body if tree.body and hasattr(tree.body[0], "body") else []
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def _last_lines(traceback: str) -> str:
    lines = [line for line in traceback.strip().splitlines() if line.strip()]
    return ("\nwhere it happened:\n" + "\n".join(lines[-TRACEBACK_LINES:])) if lines else ""


def require_case(world_size, numel, dtype, points) -> None:
    """Refuse, by name, a checker case no checker can run: 1..8 ranks, at least one
    element, float32 or float64, points >= 0."""
    import torch
    require_arg("world_size", world_size, is_int(world_size) and 1 <= world_size <= 8,
                "an int in 1..8")
    require_arg("numel", numel, is_int(numel) and numel >= 1, "an int >= 1")
    require_arg("dtype", dtype, dtype in (torch.float32, torch.float64),
                "torch.float32 or torch.float64")
    require_arg("points", points, is_number(points) and points >= 0, "a number >= 0")
