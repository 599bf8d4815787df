"""The forkserver every distlab worker is forked from, with torch already imported.

Starting a Python process and importing torch costs about a second of CPU; forking from a
server that did it once costs milliseconds and shares torch's pages between the workers.
``spawn`` would re-import everything in every worker and cannot run a function defined in
a notebook; a plain ``fork`` of a threaded Jupyter kernel can deadlock. The forkserver is
started once per session (:func:`warm_up`), single-threaded, before any worker is needed.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from multiprocessing import popen_forkserver, spawn

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
