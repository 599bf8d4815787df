"""Lab 07's checkers (distlab.exercises.fault_tolerance): they pass the lab's own solutions,
explain each unsafe save and each incomplete resume, and give the points they promise."""
import os
from pathlib import Path

import pytest
import torch

from distlab.course.grading import lab_solutions
from distlab.exercises import fault_tolerance as exercise

pytestmark = pytest.mark.timeout(300)
LAB = Path(__file__).resolve().parents[2] / "labs" / "07_fault_tolerance.ipynb"



SOLVED = lab_solutions(LAB)
atomic_save, resume = SOLVED["atomic_save"], SOLVED["resume"]


# -- part A -------------------------------------------------------------------------------

@pytest.mark.parametrize("crash_in", exercise.CRASHES)
def test_save_checker_accepts_the_labs_solution(crash_in):
    verdict = exercise.check_atomic_save(atomic_save, points=3, crash_in=crash_in)
    assert verdict.ok and verdict.points == 3, verdict


def in_place(obj, path):
    torch.save(obj, path)


def buffered_in_place(obj, path):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def no_fsync(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def fsync_after_the_rename(obj, path):
    with open(path + ".tmp", "wb") as f:
        torch.save(obj, f)
    os.replace(path + ".tmp", path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def tmp_elsewhere(obj, path):
    import shutil
    import tempfile
    tmp = os.path.join(tempfile.mkdtemp(), "checkpoint.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.move(tmp, path)          # a rename when the folders share a file system


@pytest.mark.parametrize("mistake, crash_in, explanation", [
    (in_place, "pickle", "checkpoint 1 is lost"),
    (buffered_in_place, "pickle", "rewritten in place"),
    (in_place, "replace", "the save of checkpoint 2 finished although"),
])
def test_save_checker_explains_each_unsafe_save_with_no_points(mistake, crash_in, explanation):
    verdict = exercise.check_atomic_save(mistake, points=3, crash_in=crash_in)
    assert not verdict.ok and verdict.points == 0 and explanation in verdict.message, verdict


@pytest.mark.parametrize("mistake, explanation", [
    (no_fsync, "os.fsync(f.fileno()) before os.replace"),
    (fsync_after_the_rename, "os.fsync(f.fileno()) before os.replace"),
    (tmp_elsewhere, "is not in path's folder")])
def test_save_checker_gives_two_of_three_points_to_a_crash_safe_save_that_is_not_durable(
        mistake, explanation):
    verdict = exercise.check_atomic_save(mistake, points=3)
    assert not verdict.ok and verdict.points == 2 and explanation in verdict.message, verdict


def test_save_checker_refuses_what_is_not_a_function():
    verdict = exercise.check_atomic_save("torch.save", points=3)
    assert not verdict.ok and "atomic_save must be a function, got str" in verdict.message


def test_save_checker_names_a_save_that_raises():
    def raises(obj, path):
        raise OSError("disk full")
    verdict = exercise.check_atomic_save(raises, points=3)
    assert not verdict.ok and "saving checkpoint 1: rank 0 failed" in verdict.message
    assert "disk full" in verdict.message


# -- part B -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}])
def test_resume_checker_accepts_the_labs_solution(kwargs):
    verdict = exercise.check_resume(resume, points=7, **kwargs)
    assert verdict.ok and verdict.points == 7, verdict


def sorted_as_text(directory, model, optimizer):
    for name in sorted(os.listdir(directory), reverse=True):
        try:
            checkpoint = torch.load(os.path.join(directory, name))
        except Exception:
            continue
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        return checkpoint["step"]
    return 0


def newest_even_if_torn(directory, model, optimizer):
    steps = sorted(int(n[5:-3]) for n in os.listdir(directory) if n.endswith(".pt"))
    checkpoint = torch.load(os.path.join(directory, f"step_{steps[-1]}.pt"))
    model.load_state_dict(checkpoint["model"])
    return steps[-1]


def forgets(part):
    def resume_without(directory, model, optimizer):
        checkpoint = torch.load(os.path.join(directory, "step_12.pt"))
        if part != "model":
            model.load_state_dict(checkpoint["model"])
        if part != "optimizer":
            optimizer.load_state_dict(checkpoint["optimizer"])
        if part != "rng":
            torch.set_rng_state(checkpoint["rng"])
        return 12
    return resume_without


def test_resume_checker_says_the_files_sort_as_text():
    verdict = exercise.check_resume(sorted_as_text, points=7)
    assert not verdict.ok and verdict.points == 0, verdict
    assert ("resume returned step 8, but the newest checkpoint that loads is step 12"
            in verdict.message)
    assert "sort as text" in verdict.message


def test_resume_checker_says_a_torn_file_must_be_skipped():
    verdict = exercise.check_resume(newest_even_if_torn, points=7)
    assert not verdict.ok and verdict.points == 0, verdict
    assert "step_16.pt is torn" in verdict.message


@pytest.mark.parametrize("part, explanation", [
    ("optimizer", "its momentum) was not restored"),
    ("rng", "the random generator was not restored"),
    ("model", "the model's weights were not restored")])
def test_resume_checker_names_the_part_of_the_state_that_was_forgotten(part, explanation):
    verdict = exercise.check_resume(forgets(part), points=7)
    assert not verdict.ok and verdict.points == 3, verdict
    assert "resumed at the right step 12, but at step" in verdict.message
    assert explanation in verdict.message, verdict


def test_resume_checker_wants_step_zero_and_the_fresh_model_without_a_checkpoint():
    verdict = exercise.check_resume(lambda d, m, o: 4, points=7, every=5, crash_step=3,
                                    torn="none")
    assert not verdict.ok
    assert "no checkpoint loads, so the job starts over at step 0" in verdict.message


@pytest.mark.parametrize("kwargs, match", [
    (dict(torn="half"), "torn='half'"), (dict(every=0), "every=0"),
    (dict(crash_step=15), "crash_step=15"), (dict(crash_step=20), "crash_step=20")])
def test_resume_checker_refuses_a_bad_case_before_any_process_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        exercise.check_resume(resume, points=7, **kwargs)
