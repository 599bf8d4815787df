"""Student notebooks from the instructor's sources, with nbgrader's own preprocessors.

``ClearSolutions`` turns every region between ``### BEGIN SOLUTION`` and ``### END
SOLUTION`` into ``# YOUR CODE HERE`` + ``raise NotImplementedError()``; ``ClearHiddenTests``
removes every region between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``;
``ClearOutput`` empties outputs and execution counts; ``LockCells`` makes check cells
read-only in Jupyter. Cells keep their nbgrader metadata, so an instructor who runs
nbgrader's formgrader can collect and grade the same notebooks.
"""
from __future__ import annotations

import copy
from pathlib import Path

import nbformat

from distlab.course.grading.cells import (grade_id, labs_dir, read, require_nbgrader,
                                          without_cell_ids)


def release(out_dir, solutions: bool = False, sources=None,
            overwrite: bool = False) -> list[Path]:
    """Write every ``labs/*.ipynb`` as handed out to students; return the written paths.

    A notebook already in ``out_dir`` is kept (it may hold a student's work) unless
    ``overwrite``: running the README's start command again never loses an answer.

    Args:
        out_dir: the folder to write to (created if needed); file names are the sources'.
        solutions: True writes the solved notebooks (still without hidden tests).
        sources: the folder of instructor notebooks; default: the checkout's ``labs/``.
        overwrite: replace notebooks that already exist in ``out_dir``.
    """
    require_nbgrader()
    src = Path(sources) if sources is not None else labs_dir()
    if not isinstance(solutions, bool):
        raise TypeError(f"solutions must be True or False, got {solutions!r}")
    paths = sorted(src.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no *.ipynb in {src}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        target = out / path.name
        if target.exists() and not overwrite:
            continue
        nbformat.write(release_notebook(read(path), solutions), str(target))
        written.append(target)
    return written


def release_notebook(nb, solutions: bool | set[str]):
    """A released copy of the source notebook ``nb`` (the source is left unchanged).

    ``solutions`` is False for the student version, True for the solved one, or a set of
    grade ids whose solutions stay (a partly solved submission, for tests).
    """
    require_nbgrader()
    from nbgrader.preprocessors import ClearHiddenTests, ClearOutput, ClearSolutions, LockCells

    if not (isinstance(solutions, bool) or isinstance(solutions, (set, frozenset))):
        raise TypeError(f"solutions must be True, False or a set of grade ids, "
                        f"got {solutions!r}")
    solved = copy.deepcopy(nb)
    if solutions is True:
        out = solved
    else:
        keep = set() if solutions is False else set(solutions)
        out, _ = ClearSolutions().preprocess(copy.deepcopy(nb), {})
        for i, cell in enumerate(out.cells):
            if grade_id(cell) in keep:
                out.cells[i] = solved.cells[i]
    for step in (ClearHiddenTests(), ClearOutput(), LockCells()):
        out, _ = step.preprocess(out, {})
    if any("id" not in cell for cell in out.cells):
        out = without_cell_ids(out)          # nbformat 4.5 requires ids on every cell
    return out
