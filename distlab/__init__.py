"""distlab: a hands-on lab for distributed optimization, on real torch.distributed groups.

Start here: :func:`launch` runs a function on N real processes and returns their results.
"""
from distlab.launcher import MAX_WORLD_SIZE, Run, WorkerError, launch, start, warm_up
from distlab.worker import device, init_from_env
from distlab.metrics import report
from distlab.forkserver import start_in_background as _start_forkserver

_start_forkserver()   # in a notebook: torch is imported there while the next cell is read

__all__ = ["launch", "start", "Run", "WorkerError", "report", "device", "init_from_env",
           "warm_up", "MAX_WORLD_SIZE"]
__version__ = "0.1.0"
