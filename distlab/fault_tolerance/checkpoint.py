"""Distributed checkpoints that a crash can never corrupt, and that resume exactly.

What a checkpoint must hold
---------------------------
To continue a run *exactly* where it stopped, everything that decides the next step must be
saved, not just the weights:

* the model's parameters and the optimizer's state (momentum, Adam moments; for a sharded
  optimizer its consolidated state, so it can be resharded over another number of ranks);
* the data position (epoch and batch), so no example is skipped or seen twice;
* every random number generator (torch, Python's ``random``, NumPy), per rank;
* the step, and the metrics so far, so the resumed curve continues the same plot.

The model and optimizer are the same on every rank in data-parallel training, so rank 0
writes them once (``state``); what differs per rank, such as the RNGs, each rank writes
itself (``rank_state``).

Why "write, then rename"
------------------------
Writing over the only checkpoint is the classic mistake: a crash halfway through (the
fault this module is built for) leaves a file that cannot be read, and the run has lost
everything. Instead every file is written to a temporary name, flushed to disk with
``fsync``, and renamed over the final name with ``os.replace``, which POSIX makes atomic:
a reader sees the old file or the new one, never half of one. A distributed checkpoint has
one file per rank, so the ranks write into a *staging* folder, meet at a barrier, and rank
0 commits all of them with a single rename of the folder (the two-phase commit in
miniature; ``torch.distributed.checkpoint`` likewise writes its metadata last). The
previous ``keep - 1`` checkpoints are kept, so even a bad new one leaves an older one.

A restarted run saves again the step it resumed from plus ``checkpoint_every``, which may
already be committed (the attempt that died had saved it). The committed folder is then
not deleted before the new one is in: it is first renamed aside to ``step_N.old``, which
still counts as the checkpoint of step ``N`` until the new ``step_N`` is renamed in, and is
deleted only after that. At every instant one whole checkpoint of the step is committed.

Cost (alpha-beta model): two barriers, ``2·alpha·log p``, plus the disk write of the state
(``bytes / disk bandwidth``); no tensor crosses the network.
"""
from __future__ import annotations

import io
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, require_arg

_NAME = re.compile(r"^step_(\d{8})(\.old)?$")   # step_N, or step_N.old (set aside)


# ----------------------------------------------------------------------------------------
# One file, atomically.
# ----------------------------------------------------------------------------------------

def write_atomic(obj: Any, path: str, on_half_written: Callable[[], None] | None = None) -> None:
    """``torch.save(obj, path)`` such that ``path`` is always either the old or the new file.

    The bytes go to ``path + ".tmp"`` in the same folder (``os.replace`` is atomic only within
    one file system), are forced to disk with ``fsync``, and only then replace ``path``.

    Args:
        obj: anything ``torch.save`` accepts.
        path: the final file name.
        on_half_written: called after half of the bytes are written (fault injection uses it
            to kill a rank in the middle of a write).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        if on_half_written is not None:
            f.flush()
            on_half_written()
        f.write(data[len(data) // 2:])
        f.flush()
        os.fsync(f.fileno())     # the rename must not reach the disk before the data
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path: str) -> None:
    # Make the rename itself durable (a power cut right after os.replace could undo it).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str) -> Any:
    """Load a file written by :func:`write_atomic` (on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------------
# Random number generators.
# ----------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """The state of this process's torch, Python and NumPy generators."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back generators captured by :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------
# A distributed checkpoint: one folder per step, committed by one rename.
# ----------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded checkpoint, as seen by one rank."""
    path: str
    step: int
    world_size: int
    """The number of ranks that saved it (resuming on another number is allowed)."""
    state: dict
    """What rank 0 saved for everyone: model, optimizer, sampler position, metrics."""
    rank_state: dict | None = field(default=None)
    """What this rank saved (RNGs); None when the checkpoint had no such rank."""


def path_for(directory: str, step: int) -> str:
    """The folder of the checkpoint of ``step`` inside ``directory``."""
    require_arg("step", step, is_int(step) and 0 <= step < 10 ** 8, "an int in 0..99999999")
    return os.path.join(directory, f"step_{step:08d}")


def save(directory: str, step: int, state: dict, rank_state: dict | None = None, *,
         group=None, keep: int = 2,
         on_half_written: Callable[[], None] | None = None) -> str:
    """Save a checkpoint of ``step``; every rank of ``group`` calls it (it is collective).

    Args:
        directory: the run's checkpoint folder (created if needed), shared by the ranks.
        step: the number of steps completed; a resume continues with step ``step``.
        state: rank 0's ``state`` is written once (model, optimizer, ...); other ranks may
            pass anything (it is ignored), e.g. None.
        rank_state: this rank's own state (its RNGs, ...), written per rank.
        group: the process group (default: the world); None outside torch.distributed.
        keep: how many committed checkpoints to keep (>= 1); older ones are deleted.
        on_half_written: fault-injection hook, see :func:`write_atomic`.

    Returns:
        The committed folder.
    """
    final = path_for(directory, step)    # checks step
    require_arg("keep", keep, is_int(keep) and keep >= 1, "an int >= 1")
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world_size = dist.get_world_size(group) if distributed else 1
    staging = os.path.join(directory, f".staging_{os.path.basename(final)}")

    if rank == 0:   # a staging folder left by an earlier crash is garbage: start clean
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    if distributed:
        comm.barrier(group)              # phase 1: the staging folder exists
    if rank_state is not None:
        write_atomic(rank_state, os.path.join(staging, f"rank_{rank:04d}.pt"), on_half_written)
    if rank == 0:
        meta = {"step": step, "world_size": world_size, "state": state}
        write_atomic(meta, os.path.join(staging, "state.pt"),
                     None if rank_state is not None else on_half_written)
    if distributed:
        comm.barrier(group)              # phase 2: every rank's file is on disk
    if rank == 0:
        _commit(staging, final)
        for path in committed(directory)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(_aside(path), ignore_errors=True)   # a leftover of a crashed commit
    return final


def _commit(staging: str, final: str) -> None:
    """Rename ``staging`` to ``final`` such that some whole checkpoint of the step is always
    committed, even when ``final`` exists already (the same step saved again after a restart)."""
    aside = _aside(final)
    if os.path.exists(final):
        shutil.rmtree(aside, ignore_errors=True)   # final is committed: aside is garbage
        os.replace(final, aside)    # atomic; the old version still counts, as step_N.old
    os.replace(staging, final)      # the commit: one atomic rename
    _fsync_dir(os.path.dirname(os.path.abspath(final)))   # durable before the old one goes
    shutil.rmtree(aside, ignore_errors=True)


def _aside(path: str) -> str:
    # Where a committed checkpoint waits while its step is committed again.
    return path if path.endswith(".old") else f"{path}.old"


def committed(directory: str) -> list[str]:
    """The committed checkpoint folders in ``directory``, one per step, oldest first.

    Staging folders are ignored; ``step_N.old`` stands for step ``N`` only while there is
    no ``step_N`` (a crash in the middle of committing step ``N`` again).
    """
    if not os.path.isdir(directory):
        return []
    by_step: dict[int, str] = {}
    for name in sorted(os.listdir(directory)):    # "step_N" sorts before "step_N.old"
        match = _NAME.match(name)
        if match:
            by_step.setdefault(int(match.group(1)), os.path.join(directory, name))
    return [by_step[step] for step in sorted(by_step)]


def latest(directory: str) -> str | None:
    """The newest committed checkpoint folder, or None if there is none."""
    found = committed(directory)
    return found[-1] if found else None


def load(path: str, rank: int = 0) -> Checkpoint:
    """Load the checkpoint folder ``path`` as ``rank`` sees it."""
    require_arg("rank", rank, is_int(rank) and rank >= 0, "an int >= 0")
    meta = read(os.path.join(path, "state.pt"))
    rank_file = os.path.join(path, f"rank_{rank:04d}.pt")
    rank_state = read(rank_file) if os.path.exists(rank_file) else None
    return Checkpoint(path, meta["step"], meta["world_size"], meta["state"], rank_state)


def load_latest(directory: str, rank: int = 0) -> Checkpoint | None:
    """The newest checkpoint that loads, falling back to older ones; None if none does.

    With atomic saves the newest always loads; the fallback guards against what atomicity
    cannot (a disk that returns bad bytes), at the price of more lost work.
    """
    # Before the loop, which takes errors for bad files.
    require_arg("rank", rank, is_int(rank) and rank >= 0, "an int >= 0")
    for path in reversed(committed(directory)):
        try:
            return load(path, rank)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: try the previous
            print(f"distlab.fault_tolerance.checkpoint: {path} does not load ({type(e).__name__}: {e}); "
                  "trying the previous one")
    return None
