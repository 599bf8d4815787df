"""Grade submissions: each notebook's assignment section, run on real processes.

For every ``*.ipynb`` in a folder (one per student, any file name): find its lab from its
grade ids (``labNN_``), put the source's check cells back in place of the submission's
(hidden tests restored: editing a check cell gains nothing), run the cells from the
``assignment`` heading to the last check cell in a fresh kernel, in a process group of its
own killed at the time limit, and score each check cell with nbgrader's rule
(:func:`nbgrader.utils.determine_grade`: the cell's value is its points; an error or any
output to stderr earns 0). A check cell that was never reached (time limit, dead kernel,
deleted) earns 0. An infinite loop, crash or deadlock costs that student only.
"""
from __future__ import annotations

import concurrent.futures
import copy
import csv
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from distlab.checks import is_int, is_number, require_arg
from distlab.course.grading import cells
from distlab.course.grading.run_section import KERNEL_DIED

COLUMNS = ("submission", "lab", "points", "max_points", "feedback")
FEEDBACK_CHARS = 1500
"""How much of one check cell's output goes into the feedback column."""

RUNNER = Path(__file__).with_name("run_section.py")
"""Run as a script, so that it imports nbclient only, not distlab and torch."""

PROLOGUE = ("import warnings\n"
            "warnings.filterwarnings('ignore')  # a library's warning on stderr must not "
            "cost points\n")


def grade(submissions, out_csv, timeout: float = 300, jobs: int = 2,
          sources=None) -> list[dict]:
    """Grade every ``*.ipynb`` in the folder ``submissions``; write and return the rows.

    Args:
        submissions: a folder of notebooks, one per student, any file names.
        out_csv: the CSV to write, columns ``submission, lab, points, max_points,
            feedback``, one row per notebook (an unreadable one gets 0 and says why).
        timeout: seconds per notebook, kernel start included.
        jobs: notebooks graded at once (each starts a kernel and its ranks' processes).
        sources: the folder of instructor notebooks; default: the checkout's ``labs/``.
    """
    cells.require_nbgrader()
    folder = Path(submissions)
    require_arg("submissions", submissions, folder.is_dir(), "an existing folder")
    require_arg("timeout", timeout, is_number(timeout) and timeout > 0, "seconds > 0")
    require_arg("jobs", jobs, is_int(jobs) and jobs >= 1, "an int >= 1")
    out = Path(out_csv)
    require_arg("out_csv", out_csv, out.parent.is_dir() and not out.is_dir(),
                "a file path in an existing folder")
    source_nbs = cells.sources(Path(sources) if sources is not None else cells.labs_dir())
    paths = sorted(folder.glob("*.ipynb"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(lambda p: grade_notebook(p, source_nbs, timeout), paths))
    for row, path in zip(rows, paths):
        row["submission"] = str(path.relative_to(folder))
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def grade_notebook(path, sources: dict[str, Path], timeout: float = 300) -> dict:
    """One CSV row for the submission at ``path``; ``sources`` maps ``"labNN"`` to a source."""
    row = {"submission": Path(path).name, "lab": "", "points": 0.0, "max_points": 0.0}
    try:
        nb = cells.read(path)
        lab = cells.lab_of(nb)
    except Exception as e:  # noqa: BLE001 - any unreadable file is that student's 0
        return {**row, "feedback": f"unreadable notebook: {type(e).__name__}: {e}"}
    if lab not in sources:
        why = ("no assignment cells (no labNN_ grade ids)" if lab is None
               else f"no source notebook has {lab}'s assignment")
        return {**row, "lab": lab or "", "feedback": why}
    source = cells.read(sources[lab])
    expected = cells.check_cells(source)
    row.update(lab=sources[lab].stem,
               max_points=sum(float(cells.meta(c)["points"]) for c in expected.values()))
    section = _restore_checks(nb, expected)
    if section is None:
        return {**row, "feedback": "no check cell left in the notebook"}
    with tempfile.TemporaryDirectory(prefix="distlab-grade-") as tmp:
        ran, status = _execute(section, Path(tmp), timeout)
    scores, feedback = _score(ran, expected, status)
    return {**row, "points": sum(scores.values()), "feedback": "\n".join(feedback)}


def _restore_checks(nb, expected: dict):
    """The section to run: the submission's cells with the source's check cells put back."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        gid = cells.grade_id(cell)
        if gid in expected or cells.is_check(cell):
            if gid not in expected:          # a check cell the source does not have
                cell.metadata.pop("nbgrader", None)
                continue
            nb.cells[i] = copy.deepcopy(expected[gid])
    bounds = cells.section(nb)
    if bounds is None:
        return None
    first, last = bounds
    prologue = nbformat.v4.new_code_cell(PROLOGUE)
    nb.cells = [prologue, *nb.cells[first:last + 1]]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return cells.without_cell_ids(nb)    # the prologue has an id, the sources' cells may not


def _execute(section, tmp: Path, timeout: float):
    """Run ``section`` in a fresh kernel; return (the notebook as far as it got, status)."""
    source, out, pgid_file = tmp / "section.ipynb", tmp / "ran.ipynb", tmp / "kernel.pgid"
    nbformat.write(section, str(source))
    nbformat.write(section, str(out))
    with open(tmp / "runner.log", "wb") as log:
        runner = subprocess.Popen(
            [sys.executable, str(RUNNER), str(source), str(out), str(pgid_file)], cwd=tmp,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            code = runner.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        _kill_group(runner.pid)
        runner.wait()
    # The kernel's own group holds the distlab forkserver and the workers, and whatever the
    # student's code started: nothing of one submission outlives its grading (a worker left
    # anyway dies with its launcher's lifeline).
    if pgid_file.exists():
        _kill_group(int(pgid_file.read_text() or 0))
    status = ("ok" if code == 0 else "timeout" if code is None else
              "died" if code == KERNEL_DIED else
              f"the grader's runner failed (exit {code}): "
              + (tmp / "runner.log").read_text(errors="replace")[-FEEDBACK_CHARS:])
    return cells.read(out), (status, timeout)


def _kill_group(pgid: int) -> None:
    if pgid > 1:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _score(ran, expected: dict, status) -> tuple[dict[str, float], list[str]]:
    """Points per check cell (nbgrader's rule; 0 when not reached) and the feedback lines."""
    from nbgrader.utils import determine_grade

    status, timeout = status
    ran_checks = cells.check_cells(ran)
    scores, feedback = {}, []
    for cell in ran.cells:                       # a student cell that raised, said first
        if cell.cell_type == "code" and not cells.is_check(cell):
            for o in cell.outputs:
                if o.output_type == "error":
                    feedback.append(f"a cell of yours raised {o.ename}: {o.evalue}"[:300])
    reached_end = True
    for gid, source_cell in expected.items():
        max_points = float(cells.meta(source_cell)["points"])
        cell = ran_checks.get(gid)
        reached = cell is not None and cell.execution_count is not None and any(
            o.output_type in ("execute_result", "error") for o in cell.outputs)
        if reached:
            points, _ = determine_grade(cell)
            text = _text(cell)
        else:
            points = 0.0
            text = ("the check cell is missing from the notebook" if cell is None else
                    _why_not_reached(status, timeout) if reached_end else "not reached")
            reached_end = reached_end and cell is None
        scores[gid] = float(points or 0.0)
        feedback.append(f"{gid} {scores[gid]:g}/{max_points:g}: {text}")
    return scores, feedback


def _why_not_reached(status: str, timeout: float) -> str:
    if status == "timeout":
        return f"stopped at the time limit of {timeout:g} s (an infinite loop or a deadlock?)"
    if status == "died":
        return "the kernel died (it crashed or was killed) before this check finished"
    return f"not run: {status}" if status != "ok" else "not run"


def _text(cell) -> str:
    """What a check cell printed (the verdict's feedback), or its error."""
    parts = []
    for o in cell.outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type == "error":
            parts.append(f"{o.ename}: {o.evalue}")
    text = "".join(parts).strip() or "(no feedback printed)"
    return text if len(text) <= FEEDBACK_CHARS else text[:FEEDBACK_CHARS] + " ..."
