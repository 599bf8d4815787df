"""Releasing and grading assignments: a synthetic two-part lab, then every real lab.

The synthetic lab (``lab99``) has part A (2 points: return the world size) and part B
(8 points: the sum over 2 ranks from isend/irecv, ``dist.all_reduce`` forbidden). One batch
of submissions is graded once (jobs=2) and each test reads its own row: a solved, a partly
solved and an unsolved notebook, an infinite loop, a deadlocked rank, a killed kernel, a
tampered check cell and a file that is no notebook.
"""
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from distlab.course.grading import grade, release, release_notebook, solution_source
from distlab.course.grading import cells as nbcells

pytest.importorskip("nbgrader")

GRADE_TIMEOUT = 45          # seconds per notebook: the infinite loop costs this much
# (its file name sorts first, so that the other notebooks are graded meanwhile)

SETUP = '''\
import torch
import torch.distributed as dist
from distlab.exercises import Verdict, forbid, launch_student

def _worker(fn, scale):
    t = torch.tensor([(dist.get_rank() + 1.0) * scale])
    with forbid("torch.distributed.all_reduce", why="build the sum from isend and irecv"):
        return float(fn(t))

def check(fn, *, points, expected, scale=1.0):
    results, verdict = launch_student("fn", fn, _worker, 2, fn, scale, timeout=10,
                                      points=points, hang_hint="every irecv needs an isend")
    if verdict is not None:
        return verdict
    for rank, got in enumerate(results):
        if got != expected * scale:
            return Verdict(False, f"rank {rank}: expected {expected * scale:g}, got {got:g}",
                           0, points)
    return Verdict(True, f"both ranks returned {expected * scale:g}", points, points)
'''

PART_A = '''\
def my_world_size(t):
    """The number of ranks, as a float."""
    ### BEGIN SOLUTION
    return float(dist.get_world_size())
    ### END SOLUTION
'''

PART_B = '''\
def my_sum(t):
    """The sum of t over both ranks, from isend and irecv."""
    ### BEGIN SOLUTION
    peer = 1 - dist.get_rank()
    incoming = torch.empty_like(t)      # the unique solution text
    for req in [dist.isend(t, peer), dist.irecv(incoming, peer)]:
        req.wait()
    return t + incoming
    ### END SOLUTION
'''


def _check_source(fn, points, expected, hidden_scale):
    return (f"verdict = check({fn}, points={points}, expected={expected})\n"
            "### BEGIN HIDDEN TESTS\n"
            f"verdict &= check({fn}, points={points}, expected={expected}, "
            f"scale={hidden_scale})\n"
            "### END HIDDEN TESTS\n"
            "verdict.report()")


def _nbgrader(grade_id, points=None):
    if points is None:
        return {"grade": False, "solution": True, "locked": False, "grade_id": grade_id,
                "schema_version": 3}
    return {"grade": True, "solution": False, "locked": True, "points": points,
            "grade_id": grade_id, "schema_version": 3}


def synthetic_lab() -> nbformat.NotebookNode:
    """A tiny lab in the assignment format: an intro, then a two-part assignment."""
    tagged = {"tags": ["assignment"]}
    nb = new_notebook(cells=[
        new_markdown_cell("# 99 · A tiny lab"),
        new_code_cell("import distlab\nINTRO = 'runs before the assignment'"),
        new_markdown_cell("## 1 · Assignment: a sum (10 points)\nThe grader runs only this "
                          "section, from this heading to its last check, on real processes: "
                          "put everything your code needs in these cells.", metadata=tagged),
        new_code_cell(SETUP, metadata=tagged),
        new_markdown_cell("**Part A · warm-up (2 points)**"),
        new_code_cell(PART_A, metadata={"nbgrader": _nbgrader("lab99_a_code")}),
        new_code_cell(_check_source("my_world_size", 2, 2.0, hidden_scale=1.0),
                      metadata={"nbgrader": _nbgrader("lab99_a_check", 2)}),
        new_markdown_cell("**Part B · main (8 points)**"),
        new_code_cell(PART_B, metadata={"nbgrader": _nbgrader("lab99_b_code")}),
        new_code_cell(_check_source("my_sum", 8, 3.0, hidden_scale=7.25),
                      metadata={"nbgrader": _nbgrader("lab99_b_check", 8)}),
        new_markdown_cell("## What you have seen"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}
    return nb


def _text(nb) -> str:
    return "\n".join(c.source for c in nb.cells)


def _with_part_b(nb, body: str):
    """``nb`` with part B's solution cell replaced by ``body``."""
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        if nbcells.grade_id(cell) == "lab99_b_code":
            cell.source = body
    return nb


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    nbformat.write(synthetic_lab(), str(folder / "99_tiny.ipynb"))
    return folder


@pytest.fixture(scope="module")
def graded(sources, tmp_path_factory):
    """Grade one batch of submissions; ``{file name: row}`` and the CSV's path."""
    source = nbcells.read(sources / "99_tiny.ipynb")
    subs = tmp_path_factory.mktemp("submissions")
    unsolved = release_notebook(source, False)
    tampered = nbformat.from_dict(unsolved)
    for cell in tampered.cells:
        if nbcells.is_check(cell):
            cell.source = f"{cell.metadata.nbgrader['points']}.0"   # "full points, trust me"
            cell.metadata.nbgrader["points"] = 100
    solved = release_notebook(source, True)
    submissions = {
        "solved.ipynb": solved,
        "partly solved.ipynb": release_notebook(source, {"lab99_a_code"}),
        "unsolved.ipynb": unsolved,
        "0_infinite_loop.ipynb": _with_part_b(solved, "while True:\n    pass"),
        "deadlock.ipynb": _with_part_b(solved, PART_B.replace(
            "dist.isend(t, peer), ", "")),
        "killed_kernel.ipynb": _with_part_b(
            solved, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
        "tampered.ipynb": tampered,
    }
    for name, nb in submissions.items():
        nbformat.write(nb, str(subs / name))
    (subs / "not_a_notebook.ipynb").write_text("{ this is no JSON")
    out = subs / "grades.csv"
    t0 = time.monotonic()
    rows = grade(subs, out, timeout=GRADE_TIMEOUT, jobs=2, sources=sources)
    print(f"graded {len(rows)} synthetic submissions in {time.monotonic() - t0:.0f} s")
    return {r["submission"]: r for r in rows}, out


def test_release_replaces_solutions_by_stubs_and_removes_hidden_tests():
    student = _text(release_notebook(synthetic_lab(), False))
    assert "the unique solution text" not in student and "get_world_size()" not in student
    assert "BEGIN SOLUTION" not in student and "raise NotImplementedError()" in student
    assert "scale=7.25" not in student and "HIDDEN TESTS" not in student
    assert 'def my_sum(t):\n    """The sum' in student, "the def line and docstring stay"


def test_release_with_solutions_keeps_solutions_but_not_hidden_tests():
    solved = _text(release_notebook(synthetic_lab(), True))
    assert "the unique solution text" in solved
    assert "scale=7.25" not in solved


def test_release_locks_check_cells_and_clears_outputs():
    nb = synthetic_lab()
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="old")]
    released = release_notebook(nb, False)
    checks = [c for c in released.cells if nbcells.is_check(c)]
    assert all(c.metadata["editable"] is False for c in checks)
    assert all(not c.get("outputs") for c in released.cells if c.cell_type == "code")
    assert nb.cells[1].outputs, "the source notebook is left unchanged"


def test_release_writes_every_source_notebook(sources, tmp_path):
    written = release(tmp_path / "out", sources=sources)
    assert [p.name for p in written] == ["99_tiny.ipynb"]
    assert "the unique solution text" not in written[0].read_text()


def test_release_keeps_a_students_notebook_unless_told_to_overwrite(sources, tmp_path):
    (tmp_path / "out").mkdir()
    work = tmp_path / "out" / "99_tiny.ipynb"
    work.write_text("a student's answers")
    assert release(tmp_path / "out", sources=sources) == []
    assert work.read_text() == "a student's answers"
    assert release(tmp_path / "out", sources=sources, overwrite=True) == [work]
    assert "the unique solution text" not in work.read_text()


def test_release_refuses_a_folder_without_notebooks(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.ipynb"):
        release(tmp_path / "out", sources=tmp_path)


def test_solution_source_is_the_solved_cell_without_markers(sources):
    code = solution_source(sources / "99_tiny.ipynb", "lab99_b_code")
    assert "BEGIN SOLUTION" not in code and "the unique solution text" in code
    compile(code, "lab99_b_code", "exec")


def test_a_student_notebook_runs_top_to_bottom_without_an_error(tmp_path):
    from nbclient import NotebookClient
    nb = release_notebook(synthetic_lab(), False)
    NotebookClient(nb, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"], "stderr costs points"
    scores = [o.data["text/plain"] for o in outputs if o.output_type == "execute_result"]
    assert scores == ["0.0", "0.0"]


def test_a_solved_submission_earns_every_point(graded):
    rows, _ = graded
    assert (rows["solved.ipynb"]["points"], rows["solved.ipynb"]["max_points"]) == (10, 10)


def test_a_partly_solved_submission_earns_part_a_only(graded):
    row = graded[0]["partly solved.ipynb"]
    assert row["points"] == 2
    assert "lab99_b_check 0/8: NOT YET (0/8 points): fn is not implemented yet" in row["feedback"]


def test_an_unsolved_submission_earns_zero(graded):
    assert graded[0]["unsolved.ipynb"]["points"] == 0


def test_an_infinite_loop_costs_the_parts_it_did_not_reach(graded):
    row = graded[0]["0_infinite_loop.ipynb"]
    assert row["points"] == 2
    assert f"time limit of {GRADE_TIMEOUT} s" in row["feedback"]


def test_a_deadlocked_rank_costs_its_part(graded):
    row = graded[0]["deadlock.ipynb"]
    assert row["points"] == 2
    assert "did not finish in 10 s: every irecv needs an isend" in row["feedback"]


def test_a_killed_kernel_costs_the_parts_it_did_not_reach(graded):
    row = graded[0]["killed_kernel.ipynb"]
    assert row["points"] == 2
    assert "the kernel died" in row["feedback"]


def test_a_tampered_check_cell_is_restored_from_the_source(graded):
    row = graded[0]["tampered.ipynb"]
    assert (row["points"], row["max_points"]) == (0, 10)


def test_a_file_that_is_no_notebook_gets_a_row_with_zero_points(graded):
    row = graded[0]["not_a_notebook.ipynb"]
    assert row["points"] == 0 and "unreadable notebook" in row["feedback"]


def test_the_csv_has_one_row_per_notebook_with_the_five_columns(graded):
    rows, out = graded
    with open(out, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["submission", "lab", "points", "max_points", "feedback"]
    assert sorted(r["submission"] for r in read) == sorted(rows)
    assert {r["lab"] for r in read if r["submission"] == "solved.ipynb"} == {"99_tiny"}


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "jobs"),
    (["--timeout", "-1"], "timeout"),
])
def test_the_grade_command_refuses_bad_arguments_before_any_kernel_starts(
        tmp_path, args, message):
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "distlab", "course", "grade", str(tmp_path),
                           "--out", str(tmp_path / "g.csv"), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "g.csv").exists() and time.monotonic() - t0 < 60


# -- every real lab: release solved, partly solved (part A) and unsolved, grade them ------

LABS = sorted((Path(__file__).resolve().parents[2] / "labs").glob("*.ipynb"))


def test_the_release_command_writes_every_lab_without_solutions_or_hidden_tests(tmp_path):
    subprocess.run([sys.executable, "-m", "distlab", "course", "release", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == [p.name for p in LABS]
    for path in tmp_path.glob("*.ipynb"):
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text, path.name


@pytest.fixture(scope="module")
def real_grades(tmp_path_factory):
    subs = tmp_path_factory.mktemp("real_submissions")
    for path in LABS:
        if not nbcells.check_cells(nbcells.read(path)):
            continue
        source = nbcells.read(path)
        # Solved and unsolved; a partly solved submission is graded in the synthetic lab.
        for version, solutions in [("solved", True), ("unsolved", False)]:
            nbformat.write(release_notebook(source, solutions),
                           str(subs / f"{path.stem}.{version}.ipynb"))
    t0 = time.monotonic()
    rows = grade(subs, subs / "grades.csv", jobs=2)
    took = time.monotonic() - t0
    print(f"graded {len(rows)} real-lab submissions in {took:.0f} s")
    (Path(os.environ.get("DISTLAB_GRADING_TIMES", subs)) / "grading_time.txt").write_text(
        f"{len(rows)} notebooks in {took:.0f} s\n")
    return {r["submission"]: r for r in rows}


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("lab", LABS, ids=[p.stem[:2] for p in LABS])
def test_every_lab_grades_solved_and_unsolved_submissions(lab, real_grades):
    source = nbcells.read(lab)
    checks = nbcells.check_cells(source)
    if not checks:
        pytest.skip(f"{lab.name} has no check cells yet (not in the assignment format)")
    max_points = sum(float(nbcells.meta(c)["points"]) for c in checks.values())
    got = {v: real_grades[f"{lab.stem}.{v}.ipynb"] for v in ("solved", "unsolved")}
    assert got["solved"]["points"] == max_points == 10, got["solved"]["feedback"]
    assert got["unsolved"]["points"] == 0, got["unsolved"]["feedback"]
