"""What a failed launch raises: :class:`WorkerError`, naming the rank and why."""
from __future__ import annotations

import signal


class WorkerError(RuntimeError):
    """A worker process failed: it raised, exited without a result, was killed, or hung.

    Attributes:
        rank: the rank that failed first (the likely root cause).
        reason: one line: what happened to that rank.
        worker_traceback: the worker's own Python traceback, when it raised.
        failures: ``{rank: reason}`` for every rank seen failing.
    """

    def __init__(self, rank: int | None, reason: str, worker_traceback: str = "",
                 failures: dict[int, str] | None = None):
        self.rank = rank
        self.reason = reason
        self.worker_traceback = worker_traceback
        self.failures = dict(failures or {})
        if rank is None and reason.startswith("stopped"):
            msg = reason                  # the user pressed Stop: nothing failed
        else:
            who = "distlab launch" if rank is None else f"rank {rank}"
            msg = f"{who} failed: {reason}"
        others = {r: why for r, why in self.failures.items() if r != rank}
        if others:
            msg += "".join(f"\n  then rank {r}: {_first_line(why)}" for r, why in sorted(others.items()))
        if worker_traceback:
            msg += f"\n\n--- traceback from rank {rank} ---\n{worker_traceback.rstrip()}"
        super().__init__(msg)

    def __reduce__(self):
        return (WorkerError, (self.rank, self.reason, self.worker_traceback, self.failures))


def _first_line(text: str, width: int = 110) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


# Words in a rank's error that say it only lost a peer (the peer is the root cause).
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "DistBackendError", "Socket Timeout", "timed out", "Timed out",
                      "terminated by SIGTERM")


def describe_exit(code: int | None) -> str:
    """A worker's exit code in words: a signal by name, or the code."""
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code} without a result"
