"""The assignment format, read from a notebook's cells (nbgrader's metadata, distlab's tag).

A cell belongs to nbgrader when its metadata has an ``nbgrader`` entry: a *solution cell*
(``"solution": true``, the student writes between the solution markers) or a *check cell*
(``"grade": true, "solution": false``, worth ``points``). Grade ids start with the lab,
``labNN_``; the assignment section starts at the first cell tagged ``assignment``.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import nbformat

ASSIGNMENT_TAG = "assignment"
GRADE_ID = re.compile(r"^(lab\d\d)_")
BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"


def labs_dir() -> Path:
    """The instructor's sources: ``labs/`` beside the package in a source checkout."""
    here = Path(__file__).resolve().parents[3] / "labs"
    if not here.is_dir() or not any(here.glob("*.ipynb")):
        raise FileNotFoundError(
            f"no labs/*.ipynb next to the distlab package (looked in {here}): releasing and "
            "grading need the instructor's sources, i.e. a source checkout of distlab "
            "installed with `pip install -e .`")
    return here


def require_nbgrader() -> None:
    """Refuse clearly when nbgrader (the ``course`` extra) is not installed."""
    try:
        import nbgrader  # noqa: F401
    except ImportError as e:
        raise ImportError("releasing and grading use nbgrader's preprocessors: "
                          "pip install -e '.[course]'") from e


def read(path) -> nbformat.NotebookNode:
    """The notebook at ``path`` (nbformat 4); cells without ids are fine here."""
    from nbformat.warnings import MissingIDFieldWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingIDFieldWarning)
        return nbformat.read(str(path), as_version=4)


def without_cell_ids(nb):
    """``nb`` as nbformat 4.4, without cell ids: valid whether its cells had ids or not."""
    for cell in nb.cells:
        cell.pop("id", None)
    nb.nbformat_minor = min(nb.nbformat_minor, 4)
    return nb


def meta(cell) -> dict:
    """The cell's nbgrader metadata ({} for a cell that is not nbgrader's)."""
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def grade_id(cell) -> str | None:
    return meta(cell).get("grade_id")


def is_check(cell) -> bool:
    """A check cell: graded from its output (``grade`` without ``solution``)."""
    m = meta(cell)
    return cell.get("cell_type") == "code" and bool(m.get("grade")) and not m.get("solution")


def is_solution(cell) -> bool:
    return bool(meta(cell).get("solution"))


def lab_of(nb) -> str | None:
    """``"labNN"`` from the notebook's grade ids; None when it has none."""
    labs = {m.group(1) for cell in nb.cells if (m := GRADE_ID.match(grade_id(cell) or ""))}
    if len(labs) > 1:
        raise ValueError(f"grade ids of several labs in one notebook: {sorted(labs)}")
    return labs.pop() if labs else None


def check_cells(nb) -> dict[str, object]:
    """``{grade_id: cell}`` for every check cell, in notebook order."""
    return {grade_id(c): c for c in nb.cells if is_check(c)}


def section(nb) -> tuple[int, int] | None:
    """``(first, last)`` cell indices of the assignment section, or None if it has no check.

    It runs from the first cell tagged ``assignment`` (else the first nbgrader cell) to the
    last check cell.
    """
    checks = [i for i, c in enumerate(nb.cells) if is_check(c)]
    if not checks:
        return None
    tagged = [i for i, c in enumerate(nb.cells)
              if ASSIGNMENT_TAG in c.get("metadata", {}).get("tags", [])]
    graded = [i for i, c in enumerate(nb.cells) if meta(c)]
    first = min(tagged[:1] + graded[:1])
    return first, checks[-1]


def sources(labs: Path) -> dict[str, Path]:
    """``{"labNN": path}`` for every source notebook in ``labs`` that has an assignment."""
    found = {}
    for path in sorted(Path(labs).glob("*.ipynb")):
        lab = lab_of(read(path))
        if lab is not None:
            found[lab] = path
    return found


def solution_source(path, grade_id_: str) -> str:
    """The solved code of the solution cell ``grade_id_`` in the source notebook ``path``.

    The cell's source without the solution markers, ready to ``exec``: how tests of a
    checker get the correct solution without the package holding one.
    """
    nb = read(path)
    for cell in nb.cells:
        if grade_id(cell) == grade_id_ and is_solution(cell):
            return _solved(cell)
    raise KeyError(f"{path} has no solution cell with grade_id {grade_id_!r}; it has "
                   f"{[grade_id(c) for c in nb.cells if is_solution(c)]}")


def lab_solutions(path) -> dict:
    """The assignment's setup cell and every solved cell of the source notebook ``path``,
    executed in one namespace: the solved functions, by name, for a checker's tests.

    Defined in a namespace named after the lab (``lab04_solutions``), not in an importable
    module, so the functions travel to worker processes by value.
    """
    nb = read(path)
    namespace = {"__name__": f"{lab_of(nb)}_solutions"}
    setup = next((c for c in nb.cells if c.cell_type == "code"
                  and ASSIGNMENT_TAG in c.metadata.get("tags", ())), None)
    if setup is not None:
        exec(setup.source, namespace)
    for cell in nb.cells:
        if is_solution(cell):
            exec(_solved(cell), namespace)
    return namespace


def _solved(cell) -> str:
    """A solution cell's source without the solution markers."""
    return "\n".join(line for line in cell.source.split("\n")
                     if line.strip() not in (BEGIN_SOLUTION, END_SOLUTION))
