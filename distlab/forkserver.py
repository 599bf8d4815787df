"""The forkserver every distlab worker is forked from, with torch already imported.

Starting a Python process and importing torch costs about a second of CPU; forking from a
server that did it once costs milliseconds and shares torch's pages between the workers.
``spawn`` would re-import everything in every worker and cannot run a function defined in
a notebook; a plain ``fork`` of a threaded Jupyter kernel can deadlock. The forkserver is
started once per session, single-threaded, before any worker is needed: in a notebook by
``import distlab`` itself (:func:`start_in_background`), so that it imports torch while
the student reads the next cell, elsewhere by the first launch or :func:`warm_up`.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import threading
from multiprocessing import forkserver, popen_forkserver, spawn

# torch._dynamo: torch.optim imports it on the first step; preloading it once in the
# forkserver saves every worker about 2 s of CPU.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "cloudpickle", "distlab.worker"]


def context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


_prep_lock = threading.Lock()


class _Popen(popen_forkserver.Popen):
    """Forkserver start without re-running the caller's ``__main__`` in the worker.

    multiprocessing normally re-imports the main script in every child, which runs a script
    with no ``if __name__ == "__main__"`` guard a second time. distlab sends the function by
    value instead (cloudpickle), so the main module is not needed in the worker.
    """

    def _launch(self, process_obj):
        original = spawn.get_preparation_data

        def without_main(name):
            data = original(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        with _prep_lock:
            spawn.get_preparation_data = without_main
            try:
                super()._launch(process_obj)
            finally:
                spawn.get_preparation_data = original


class WorkerProcess(mp.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


def start_in_background() -> None:
    """Start the forkserver without waiting for it, in an interactive session only.

    Its imports (torch, ``torch._dynamo``: about a second of CPU on an idle core, the bulk of
    a first launch) then overlap with whatever the session does next. Only a notebook or
    a REPL starts it at import: a script, the command line or a ``torchrun`` worker that
    imports distlab may never launch anything, and should not pay for a server.
    """
    if not ("ipykernel" in sys.modules or "IPython" in sys.modules or hasattr(sys, "ps1")):
        return
    context()                       # the preload list, before the server starts
    forkserver.ensure_running()     # returns once it is spawned; it imports on its own


def warm_up() -> None:
    """Start the forkserver and wait until it has imported torch, so the next launch is fast.

    Starting the server returns at once, while it is still importing (seconds on a loaded
    machine); forking one empty process through it waits for that, so a launch with a short
    timeout right after ``warm_up()`` never pays the import.
    """
    probe = WorkerProcess(target=int, name="distlab-warm-up", daemon=True)
    context()
    probe.start()
    probe.join()
