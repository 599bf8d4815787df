"""Does every lab fit Binder? Peak memory of a lab run: the kernel and all its workers.

Binder gives a user 2 GB of memory for everything. This script executes each lab
top to bottom in a fresh kernel (with the lab's default settings, unless ``--small``) and
samples, every 0.1 s, the proportional set size (PSS) of the kernel and of every process
below it (distlab's forkserver and its worker ranks). PSS divides each shared page among the
processes sharing it, so the sum is the real memory the run occupies, torch's shared
libraries counted once. The peak of that sum is compared with the 2 GB budget.

The Jupyter server itself (about 0.1 GB) is not counted; the target leaves room for it.

Usage::

    python benchmarks/lab_memory.py                     # every lab in labs/, default settings
    python benchmarks/lab_memory.py labs/00_start_here.ipynb --small
    python benchmarks/lab_memory.py --write             # also write benchmarks/results/lab_memory.md
    python benchmarks/lab_memory.py labs/04_*.ipynb --small --out /tmp   # /tmp/lab_memory.md
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient

import report
from report import load, write

ROOT = Path(__file__).resolve().parent.parent
BUDGET_GB = 2.0
GB = 1e9


def _pss(proc: psutil.Process) -> int:
    try:
        return proc.memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def measure(path: Path, timeout: float) -> dict:
    """Execute the notebook at ``path``; return peak PSS figures and the wall time."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    outcome: dict = {}

    def execute():
        try:
            client.execute()
        except Exception as e:  # a failing lab is reported, not measured as fitting
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))       # no terminal colours
            lines = [ln.strip() for ln in text.splitlines()
                     if re.match(r"\s*\w+(Error|Exception)\b", ln)]
            outcome["error"] = (lines[-1] if lines else type(e).__name__)[:160]
        finally:
            outcome["done"] = True

    t0 = time.monotonic()
    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    peak = {"total": 0, "kernel": 0, "processes": 0}
    kernel = None
    while not outcome.get("done"):
        if kernel is None:
            proc = getattr(getattr(client.km, "provisioner", None), "process", None)
            kernel = psutil.Process(proc.pid) if proc is not None else None
        if kernel is not None:
            try:
                tree = [kernel] + kernel.children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            sizes = [_pss(p) for p in tree]
            if sum(sizes) > peak["total"]:
                peak = {"total": sum(sizes), "kernel": sizes[0] if sizes else 0,
                        "processes": len(tree)}
        time.sleep(0.1)
    thread.join()
    return {**peak, "seconds": time.monotonic() - t0, "error": outcome.get("error")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labs", nargs="*", type=Path, help="notebooks (default: labs/*.ipynb)")
    parser.add_argument("--small", action="store_true", help="DISTLAB_SMALL=1 (the CI setting)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/lab_memory.md")
    parser.add_argument("--out", type=Path, help="write the report to OUT/lab_memory.md instead")
    args = parser.parse_args()
    load_before = load()
    labs = args.labs or sorted((ROOT / "labs").glob("[0-9]*.ipynb"))
    if args.small:
        os.environ["DISTLAB_SMALL"] = "1"
    else:
        os.environ.pop("DISTLAB_SMALL", None)   # the labs' default settings
    setting = "small (DISTLAB_SMALL=1)" if args.small else "default"

    rows = []
    for lab in labs:
        print(f"running {lab.name} ...", file=sys.stderr, flush=True)
        r = measure(lab.resolve(), args.timeout)
        fits = "yes" if r["total"] / GB < BUDGET_GB else "NO"
        ran = "yes" if r["error"] is None else f"no, stopped at: {r['error']}"
        rows.append(f"| {lab.name} | {r['total'] / GB:.2f} | {r['kernel'] / GB:.2f} | "
                    f"{r['processes']} | {r['seconds']:.0f} | {fits} | {ran} |")
        print(rows[-1], flush=True)

    body = [
        f"Peak total PSS of the kernel and all its child processes (forkserver, worker ranks) "
        f"while each lab runs top to bottom, {setting} settings. Target: under "
        f"{BUDGET_GB:g} GB per lab (the Jupyter server, about 0.1 GB, comes on top). The "
        f"machine has {psutil.virtual_memory().total / GB:.0f} GB; times are noisy, memory is "
        "not. A lab that stopped at a failing cell is measured up to that cell only.", "",
        "| lab | peak total PSS (GB) | kernel PSS at peak (GB) | processes at peak | "
        "wall time (s) | fits 2 GB | ran to the end |",
        "|---|---|---|---|---|---|---|",
        *rows]
    title = "Lab memory: does every lab fit Binder's 2 GB?"
    if args.out:
        report.RESULTS = args.out
    if args.write or args.out:
        write("lab_memory", title, body, load_before)
    else:
        print("\n".join([f"# {title}", ""] + body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
