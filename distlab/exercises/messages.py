"""Watching a student's point-to-point messages: every ``dist.isend/irecv/send/recv`` inside
:func:`watched` is recorded (to whom, what) and waits at most a time limit, so a message that
never comes is named (which rank waited for which neighbour) instead of hanging the check."""
from __future__ import annotations

import contextlib
import datetime
import time

import torch.distributed as dist


class MissingMessage(RuntimeError):
    """A rank waited its time limit for a message that never came (``kind``
    "recv") or that its neighbour never received ("send"); ``peer`` is the other rank."""

    def __init__(self, message, kind, peer):
        super().__init__(message)
        self.kind, self.peer = kind, peer


@contextlib.contextmanager
def watched(log: dict, wait: float):
    """Inside the block, ``dist.isend/irecv/send/recv`` record each message in ``log`` and
    wait for it at most until ``wait`` seconds after the block began."""
    saved = {name: getattr(dist, name) for name in ("isend", "irecv", "send", "recv")}
    deadline = time.monotonic() + wait

    def isend(tensor, dst=None, group=None, tag=0, **kw):
        log["sent"].append((dst, tensor.detach().clone()))
        return _Waited(saved["isend"](tensor, dst, group=group, tag=tag, **kw), deadline,
                       wait, "send", dst)

    def irecv(tensor, src=None, group=None, tag=0, **kw):
        request = _Waited(saved["irecv"](tensor, src, group=group, tag=tag, **kw), deadline,
                          wait, "recv", src)
        log["received"].append(request)
        return request

    dist.isend, dist.irecv = isend, irecv
    dist.send = lambda tensor, dst=None, group=None, tag=0, **kw: isend(
        tensor, dst, group, tag, **kw).wait()
    dist.recv = lambda tensor, src=None, group=None, tag=0, **kw: irecv(
        tensor, src, group, tag, **kw).wait() and src
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        log["received"] = [(r.peer, r.waited) for r in log["received"]]


class _Waited:
    """A request whose ``wait()`` gives up at the deadline and says which message is missing."""

    def __init__(self, work, deadline, seconds, kind, peer):
        self.work, self.deadline, self.seconds = work, deadline, seconds
        self.kind, self.peer, self.waited = kind, peer, False

    def wait(self, timeout=None):
        self.waited = True
        try:
            self.work.wait(datetime.timedelta(seconds=max(0.01, self.deadline - time.monotonic())))
        except RuntimeError:          # gloo's timeout, or the peer's connection closed
            rank = dist.get_rank()
            if self.kind == "recv":
                raise MissingMessage(f"rank {rank} waited {self.seconds:g} s for the message from rank "
                                     f"{self.peer}, which never came", "recv", self.peer) from None
            raise MissingMessage(f"rank {rank}'s message to rank {self.peer} was never "
                                 f"received: rank {self.peer} did not irecv from rank {rank}",
                                 "send", self.peer) from None
        return True
