"""Release and grade the labs' assignments, in nbgrader's notebook format.

The notebooks in ``labs/`` are the instructor's sources: every assignment's solution cells
hold the solution between ``### BEGIN SOLUTION`` and ``### END SOLUTION``, and every check
cell its hidden tests between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``
(cell metadata as nbgrader writes it: ``grade_id``, ``points``, ``solution``, ``grade``).
Two commands turn them into a course, using nbgrader's own preprocessors as a library (no
nbgrader database, no course directory, no docker)::

    python -m distlab course release OUT [--solutions]
    python -m distlab course grade DIR --out grades.csv [--timeout 300] [--jobs 2]

:func:`release` writes the student notebooks (solutions replaced by
``raise NotImplementedError()``, hidden tests removed, outputs cleared, check cells
locked); :func:`grade` runs every submission's assignment section in a fresh kernel, with
the source's check cells put back, and writes one CSV row per notebook.
"""
from distlab.course.grading.cells import lab_solutions, labs_dir, solution_source
from distlab.course.grading.grade import grade, grade_notebook
from distlab.course.grading.release import release, release_notebook

__all__ = ["release", "release_notebook", "solution_source", "lab_solutions", "grade",
           "grade_notebook", "labs_dir"]
