"""Run one submission's assignment section in a fresh kernel (a subprocess of the grader).

``python .../run_section.py IN OUT KERNEL_PGID_FILE``, run as a script so that it imports
nbclient only, not distlab and torch: executes the notebook IN with nbclient, writing it to
OUT after every cell, so that what was reached before the grader kills this process at the
time limit is still scored. The kernel starts
in a process group of its own (jupyter_client does that); its id goes to KERNEL_PGID_FILE
at once, so the grader can kill the kernel and the distlab workers it started with it.
Exits 0 when every cell ran, 3 when the kernel died.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat

KERNEL_DIED = 3


def main(argv: list[str]) -> int:
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    source, out, pgid_file = (Path(a) for a in argv)
    nb = nbformat.read(str(source), as_version=4)
    client = NotebookClient(nb, kernel_name="python3", allow_errors=True, timeout=None,
                            record_timing=False,
                            resources={"metadata": {"path": str(out.parent)}})

    def kernel_started(**_):
        provisioner = client.km.provisioner
        pgid = getattr(provisioner, "pgid", None) or getattr(provisioner, "pid", None)
        _write(pgid_file, str(pgid))

    client.on_notebook_start = kernel_started
    client.on_cell_executed = lambda **_: _write_nb(nb, out)
    try:
        client.execute()
    except DeadKernelError:
        _write_nb(nb, out)
        return KERNEL_DIED
    _write_nb(nb, out)
    return 0


def _write_nb(nb, path: Path) -> None:
    _write(path, nbformat.writes(nb))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)          # the grader never reads half a file


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
