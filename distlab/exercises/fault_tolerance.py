"""Lab 07 exercise: a checkpoint save that a crash cannot corrupt.

The student writes ``atomic_save(obj, path)``: afterwards ``torch.load(path)`` gives ``obj``,
and if the process dies at any moment during the call, ``path`` still holds the previous
checkpoint, whole. The checker really kills a process in the middle of the student's save
(with SIGKILL, while ``torch.save`` is halfway through the object) and then loads ``path``.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from typing import Callable

import torch

from distlab.exercises import Verdict, launch_student, register


@register("atomic_save")
def atomic_save(obj, path: str) -> None:
    """Reference solution: write a temporary file in the same folder, fsync, then rename."""
    import os

    import torch
    tmp = path + ".tmp"                 # same folder: os.replace is atomic within a file system
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())            # the data must be on disk before the rename is
    os.replace(tmp, path)               # atomic: readers see the old file or the new one


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


def _save_on_a_worker(student_fn: Callable, path: str, version: int, crash: bool) -> int:
    """Run the student's save in a real process; return how many times it called fsync."""
    calls = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        calls.append(fd)
        return real_fsync(fd)

    os.fsync = counting_fsync    # this worker process only
    try:
        student_fn(_payload(version, crash), path)
    finally:
        os.fsync = real_fsync
    return len(calls)


def _save(student_fn: Callable, path: str, version: int, crash: bool = False):
    """``(fsync calls, None)`` after the student's save of checkpoint ``version`` in a real
    process, or ``(None, verdict)`` when it was not a function, failed or was killed."""
    results, verdict = launch_student(
        "atomic_save", student_fn, _save_on_a_worker, 1, student_fn, path, version, crash,
        timeout=60, hang_hint="a save must not wait for anything")
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


def check_atomic_save(student_fn: Callable) -> Verdict:
    """Save, crash in the middle of the next save, and save again; say what went wrong."""
    folder = tempfile.mkdtemp(prefix="distlab-atomic-")
    path = os.path.join(folder, "checkpoint.pt")
    try:
        # 1. A plain save must work.
        fsyncs, failed = _save(student_fn, path, 1)
        if failed is not None:
            return Verdict(False, f"saving checkpoint 1: {failed.message}")
        wrong = _loads_as(path, 1)
        if wrong:
            return Verdict(False, f"after atomic_save(checkpoint 1, path), {wrong}.")
        inode = os.stat(path).st_ino

        # 2. A crash halfway through the next save must leave checkpoint 1 intact.
        _, failed = _save(student_fn, path, 2, crash=True)
        if failed is None:
            return Verdict(False, "the save of checkpoint 2 finished although pickling it kills "
                                  "the process: atomic_save must torch.save(obj, ...) the object")
        if "SIGKILL" not in failed.message:
            return Verdict(False, f"saving checkpoint 2 failed before the crash: {failed.message}")
        wrong = _loads_as(path, 1)
        if wrong:
            return Verdict(False, f"the process was killed halfway through saving checkpoint 2, "
                                  f"and now {wrong}: checkpoint 1 is lost. You wrote into path "
                                  "itself. Write to a temporary file in the same folder, then "
                                  "os.replace(tmp, path).")

        # 3. The next save must replace the file (a new inode), not rewrite it in place.
        more, failed = _save(student_fn, path, 3)
        if failed is not None:
            return Verdict(False, f"after a crashed save, the next atomic_save failed: "
                                  f"{failed.message} (a temporary file left by the crash must "
                                  "not stop it)")
        fsyncs += more
        wrong = _loads_as(path, 3)
        if wrong:
            return Verdict(False, f"after saving checkpoint 3 (following a crash), {wrong}.")
        if os.stat(path).st_ino == inode:
            return Verdict(False, "path was rewritten in place (it is the same file as before): "
                                  "a crash during that write leaves half a checkpoint. Write a "
                                  "temporary file and os.replace it over path.")
        if fsyncs == 0:
            return Verdict(False, "a crash no longer corrupts the checkpoint, but a power cut "
                                  "could: the rename can reach the disk before the data. Call "
                                  "f.flush() and os.fsync(f.fileno()) before os.replace.")
        return Verdict(True, "a SIGKILL halfway through a save left the previous checkpoint "
                             "whole, and each new one replaced it with one atomic rename after "
                             "an fsync")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
