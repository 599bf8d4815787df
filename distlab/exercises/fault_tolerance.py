"""Lab 07's assignment: a save a crash cannot corrupt (part A), and the resume (part B).

Part A, ``atomic_save(obj, path)``: afterwards ``torch.load(path)`` gives ``obj``, and if the
process dies at any moment during the call, ``path`` still holds the previous checkpoint,
whole. The checker really kills a process in the middle of the student's save (SIGKILL while
``torch.save`` is halfway through the object, or when the rename or the fsync is called) and
then loads ``path``; it also watches the order of the calls: the data must be fsynced before
the rename, and the temporary file must lie in ``path``'s folder.

Part B, ``resume(directory, model, optimizer) -> int``: a job saved ``step_<N>.pt`` files
(``{"step", "model", "optimizer", "rng"}``: the state dicts and ``torch.get_rng_state()``
after N steps) and then died, possibly in the middle of writing the newest one. In a fresh
process the student's function must find the newest checkpoint that loads (numbers, not
text, decide which is newest; a torn file is skipped), restore the model, the optimizer and
the random generator from it, and return its step (0 when there is none). The checker
continues the job from there and compares it, step by step, with the same job run without
interruption.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from typing import Callable

import torch

from distlab.checks import is_int, is_number, require_arg
from distlab.exercises import Verdict, launch_student, resume_job

CRASHES = ("pickle", "fsync", "replace")
"""Where part A's checker kills the save: halfway through pickling, in fsync, in the rename."""
TORN = ("file", "tmp", "none")
"""Part B: the newest checkpoint is a torn ``step_N.pt``, a torn ``step_N.pt.tmp``, or absent."""
DURABLE_SHARE = 1 / 3
"""Part A: the share of the points for durability (fsync before the rename, same folder)."""
FOUND_SHARE = 3 / 7
"""Part B: the share of the points for finding the right checkpoint."""


# ----------------------------------------------------------------------------------------
# Part A: atomic_save.
# ----------------------------------------------------------------------------------------

def check_atomic_save(student_fn: Callable, *, points: float, crash_in: str = "pickle") -> Verdict:
    """Save, crash in the middle of the next save (``crash_in`` one of :data:`CRASHES`), and
    save again; say what went wrong. Crash-safe earns 2/3 of the points; fsync of the data
    before the rename, with the temporary file in ``path``'s folder, the rest."""
    require_arg("crash_in", crash_in, crash_in in CRASHES, f"one of {CRASHES}")
    require_arg("points", points, is_number(points) and points >= 0, "a number >= 0")
    folder = tempfile.mkdtemp(prefix="distlab-atomic-")
    path = os.path.join(folder, "checkpoint.pt")

    def fail(message, earned=0.0):
        return Verdict(False, f"crash in {crash_in}: {message}", earned, points)

    try:
        # 1. A plain save must work.
        calls, failed = _save(student_fn, path, 1, None, points)
        if failed is not None:
            return fail(f"saving checkpoint 1: {failed.message}")
        wrong = _loads_as(path, 1)
        if wrong:
            return fail(f"after atomic_save(checkpoint 1, path), {wrong}.")
        inode = os.stat(path).st_ino

        # 2. A crash in the middle of the next save must leave checkpoint 1 intact.
        _, failed = _save(student_fn, path, 2, crash_in, points)
        if failed is None:
            return fail(f"the save of checkpoint 2 finished although the checker kills the "
                        f"process {_WHERE[crash_in]}: atomic_save must torch.save the object, "
                        "then os.fsync the file and os.replace it over path")
        if "SIGKILL" not in failed.message:
            return fail(f"saving checkpoint 2 failed before the crash: {failed.message}")
        wrong = _loads_as(path, 1)
        if wrong:
            return fail(f"the process was killed {_WHERE[crash_in]} of checkpoint 2, and now "
                        f"{wrong}: checkpoint 1 is lost. You wrote into path itself. Write to "
                        "a temporary file in the same folder, then os.replace(tmp, path).")

        # 3. The next save must replace the file (a new inode), not rewrite it in place.
        more, failed = _save(student_fn, path, 3, None, points)
        if failed is not None:
            return fail(f"after a crashed save, the next atomic_save failed: {failed.message} "
                        "(a temporary file left by the crash must not stop it)")
        calls += more
        wrong = _loads_as(path, 3)
        if wrong:
            return fail(f"after saving checkpoint 3 (following a crash), {wrong}.")
        if os.stat(path).st_ino == inode:
            return fail("path was rewritten in place (it is the same file as before): a crash "
                        "during that write leaves half a checkpoint. Write a temporary file "
                        "and os.replace it over path.")
        durable = points * (1 - DURABLE_SHARE)
        problem = _durability_problem(calls, path)
        if problem:
            return fail(problem, durable)
        return Verdict(True, f"crash in {crash_in}: a SIGKILL {_WHERE[crash_in]} left the "
                             "previous checkpoint whole, and each new one replaced it with one "
                             "atomic rename in its folder, after an fsync", points, points)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_WHERE = {"pickle": "halfway through torch.save", "fsync": "in os.fsync",
          "replace": "in the rename (os.replace / os.rename)"}


class _KillWhenPickled:
    """Pickling this object SIGKILLs the process: a crash in the middle of a save."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def _payload(version: int, crash: bool = False) -> dict:
    obj = {"step": version, "weights": torch.full((50_000,), float(version))}
    if crash:   # dicts pickle in order: "weights" is written, then the crash
        obj["crash"] = _KillWhenPickled()
        obj["momentum"] = torch.zeros(50_000)
    return obj


def _save_on_a_worker(student_fn: Callable, path: str, version: int, crash_in) -> list:
    """Run the student's save in a real process; return its fsync and rename calls, in order.

    ``crash_in`` ("fsync", "replace") kills the process at that call instead.
    """
    calls = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "rename")}

    def watched(name):
        def call(*args):
            if crash_in == name or (crash_in == "replace" and name == "rename"):
                os.kill(os.getpid(), signal.SIGKILL)
            if name == "fsync":
                calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{args[0]}")))
            else:
                calls.append(("rename", os.fspath(args[0]), os.fspath(args[1])))
            return real[name](*args)
        return call

    for name in real:   # this worker process only
        setattr(os, name, watched(name))
    try:
        student_fn(_payload(version, crash_in == "pickle"), path)
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
    return calls


def _save(student_fn: Callable, path: str, version: int, crash_in, points: float):
    """``(calls, None)`` after the student's save of checkpoint ``version`` in a real
    process, or ``(None, verdict)`` when it was not a function, failed or was killed."""
    results, verdict = launch_student(
        "atomic_save", student_fn, _save_on_a_worker, 1, student_fn, path, version, crash_in,
        timeout=60, hang_hint="a save must not wait for anything", points=points)
    return (None, verdict) if verdict is not None else (results[0], None)


def _loads_as(path: str, version: int) -> str | None:
    """None if ``path`` holds checkpoint ``version``; otherwise what is wrong with it."""
    if not os.path.exists(path):
        return "there is no file at path"
    try:
        got = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to load is the student's finding
        return f"torch.load(path) fails ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    if not (isinstance(got, dict) and got.get("step") == version
            and torch.equal(got.get("weights"), _payload(version)["weights"])):
        step = got.get("step") if isinstance(got, dict) else type(got).__name__
        return f"path holds checkpoint {step!r}, not checkpoint {version}"
    return None


def _durability_problem(calls: list, path: str) -> str | None:
    """What makes the (crash-safe) saves not durable, or None."""
    renames = [c for c in calls if c[0] == "rename" and os.path.abspath(c[2]) == path]
    if not renames:
        return "path was replaced, but not by os.replace or os.rename: use os.replace(tmp, path)"
    folder = os.path.dirname(path)
    for _, src, _ in renames:
        if os.path.dirname(os.path.abspath(src)) != folder:
            return (f"the temporary file {src} is not in path's folder: os.replace is atomic "
                    "only within one file system, so write it next to path (path + '.tmp')")
    fsynced = False
    for call in calls:
        if call[0] == "fsync" and not call[1]:
            fsynced = True
        elif call[0] == "rename" and not fsynced:
            return ("a crash no longer corrupts the checkpoint, but a power cut could: the "
                    "rename can reach the disk before the data. Call f.flush() and "
                    "os.fsync(f.fileno()) before os.replace.")
        elif call[0] == "rename":
            fsynced = False            # every save fsyncs its own data
    return None


# ----------------------------------------------------------------------------------------
# Part B: resume.
# ----------------------------------------------------------------------------------------

def check_resume(student_fn: Callable, *, points: float, every: int = 4, crash_step: int = 16,
                 torn: str = "file", num_steps: int = 20, seed: int = 0) -> Verdict:
    """The job checkpoints every ``every`` steps and dies after ``crash_step`` steps (``torn``,
    one of :data:`TORN`: while writing the checkpoint of ``crash_step``, which needs it to be a
    multiple of ``every``); the student's ``resume`` then runs in a fresh process and the job
    continues to ``num_steps``. Finding the right checkpoint earns 3/7 of the points; a
    continuation equal to the uninterrupted job, step by step, the rest."""
    require_arg("points", points, is_number(points) and points >= 0, "a number >= 0")
    require_arg("torn", torn, torn in TORN, f"one of {TORN}")
    for name, value in (("every", every), ("crash_step", crash_step), ("num_steps", num_steps)):
        require_arg(name, value, is_int(value) and value >= 1, "an int >= 1")
    require_arg("crash_step", crash_step, crash_step < num_steps and (
        torn == "none" or crash_step % every == 0),
        f"an int < num_steps={num_steps}, a multiple of every={every} when torn != 'none'")
    directory = tempfile.mkdtemp(prefix="distlab-resume-")
    try:
        saved = resume_job.crash(directory, every, crash_step, torn, seed)
        case = (f"checkpoints every {every} steps, a crash after step {crash_step}"
                + {"file": f" while writing step_{crash_step}.pt (torn)",
                   "tmp": f" while writing step_{crash_step}.pt.tmp (torn)", "none": ""}[torn])
        results, failed = launch_student(
            "resume", student_fn, _resume_on_a_worker, 1, student_fn, directory, num_steps,
            seed, timeout=60, points=points, hang_hint="resume must not wait for anything")
        if failed is not None:
            hint = (f" (step_{crash_step}.pt is torn: torch.load fails on it; skip a file that "
                    "does not load and take the newest one that does)") if torn == "file" else ""
            return Verdict(False, f"{case}: {failed.message}{hint}", 0.0, points)
        start, losses, params = results[0]
        return _judge_resume(case, start, losses, params, saved, num_steps, seed, points)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _resume_on_a_worker(student_fn: Callable, directory: str, num_steps: int, seed: int):
    """A fresh process: build the job, call the student's resume, and continue the job."""
    model, optimizer, X, y = resume_job.build(seed)
    start = student_fn(directory, model, optimizer)
    if not (is_int(start) and 0 <= start <= num_steps):
        return repr(start)[:60], None, None
    losses = resume_job.train(model, optimizer, X, y, range(start, num_steps))
    return start, losses, resume_job.flat(model)


def _judge_resume(case, start, losses, params, saved, num_steps, seed, points) -> Verdict:
    want = saved[-1] if saved else 0
    if not is_int(start):
        return Verdict(False, f"{case}: resume returned {start}, not the step as an int "
                              f"(expected {want})", 0.0, points)
    if start != want:
        if saved and start == max(saved, key=str):
            hint = (f" The file names sort as text ('step_{start}.pt' > 'step_{want}.pt'): "
                    "compare the step numbers.")
        elif start == 0:
            hint = " It found no checkpoint: look for files named step_<N>.pt in directory."
        elif start not in saved:
            hint = f" No whole checkpoint of step {start} exists: a torn file must be skipped."
        else:
            hint = ""
        newest = f"the newest checkpoint that loads is step {want}" if saved else \
            "no checkpoint loads, so the job starts over at step 0"
        return Verdict(False, f"{case}: resume returned step {start}, but {newest}.{hint}",
                       0.0, points)
    reference = resume_job.uninterrupted(num_steps, seed)
    found = points * FOUND_SHARE
    for step, (got, expected) in enumerate(zip(losses, reference["losses"][start:]), start):
        if abs(got - expected) > 1e-5 * abs(expected) + 1e-7:
            hint = _what_was_not_restored(start, losses, num_steps, seed)
            return Verdict(False, f"{case}: resumed at the right step {start}, but at step "
                                  f"{step} the loss is {got:.6g}; the uninterrupted job's is "
                                  f"{expected:.6g}.{hint}", found, points)
    if not torch.allclose(params, reference["params"], rtol=1e-5, atol=1e-7):
        return Verdict(False, f"{case}: the losses match but the final parameters do not",
                       found, points)
    where = (f"resumed at step {start} (the newest whole checkpoint)" if saved else
             "started over at step 0 (no whole checkpoint)")
    return Verdict(True, f"{case}: {where} and continued exactly as the uninterrupted job, "
                         f"to step {num_steps}", points, points)


def _what_was_not_restored(start: int, losses: list[float], num_steps: int, seed: int) -> str:
    """Replay the resume with one part of the state left out; name the part that matches."""
    for part, advice in (
            ("optimizer", "the optimizer's state (its momentum) was not restored: "
                          "optimizer.load_state_dict(checkpoint['optimizer'])"),
            ("rng", "the random generator was not restored, so the noise after the resume "
                    "differs: torch.set_rng_state(checkpoint['rng'])"),
            ("model", "the model's weights were not restored: "
                      "model.load_state_dict(checkpoint['model'])")):
        replay = resume_job.resumed_without(part, start, num_steps, seed)
        if all(abs(a - b) <= 1e-5 * abs(b) + 1e-7 for a, b in zip(losses, replay)):
            return f" It looks as if {advice}."
    return ""
