"""benchmarks/device_check.py --cpu: every algorithm runs on gloo and equals its reference.

The same script checks the GPU path with NCCL on CUDA tensors; here it runs with ``--cpu``
(2 ranks, tiny settings), as CI can, and every algorithm must have its row, ok.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distlab.communication.collectives import ALL_REDUCES
from distlab.communication_efficient.compression import METHODS
from distlab.data_parallel.ddp import VARIANTS

ROOT = Path(__file__).resolve().parent.parent

# Every algorithm distlab teaches, by the start of its row's name.
ALGORITHMS = [
    "comm.all_reduce", "comm.broadcast", "comm.all_gather_into_tensor",
    "comm.reduce_scatter_tensor", *[f"collectives.ALL_REDUCES[{k!r}]" for k in ALL_REDUCES],
    "collectives.ring_reduce_scatter", "collectives.ring_all_gather",
    "cost_model.time_collective",
    *[f"sync_sgd, DDP variant {v!r}" for v in VARIANTS], "sync_sgd, linear",
    "ZeRO stage 0", "ZeRO stage 1", "ZeRO stage 2", "ZeRO stage 3",
    "parameter server", "Hogwild!", "simulated staleness",
    "tensor parallel", "mesh", "pipeline gpipe", "pipeline 1f1b",
    "local SGD, period 1", "local SGD, period 4", "FedAvg",
    *[f"all_reduce_compressed {m!r}" for m in METHODS], "LAMB", "1-bit Adam",
    "checkpoint save and resume", "elastic",
]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    proc = subprocess.run(
        [sys.executable, "benchmarks/device_check.py", "--cpu", "--world-size", "2",
         "--steps", "2", "--mib", "0.25", "--write", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    rows = {}
    report = (out / "device_check.md").read_text() if (out / "device_check.md").exists() else ""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and cells[1] in ("ok", "FAILED"):
            rows[cells[0]] = cells
    return proc, report, rows


def _row(rows, prefix):
    found = [cells for name, cells in rows.items() if name.startswith(prefix)]
    assert found, f"no row for {prefix!r}; rows: {sorted(rows)}"
    return found[0]


def test_cpu_run_exits_zero_and_writes_its_report(cpu_run):
    proc, report, _ = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "backend gloo" in report and "date:" in report and "machine:" in report
    assert "the GPU path is checked by" in report


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_has_an_ok_row(cpu_run, algorithm):
    name, ok, seconds, reference, memory, note = _row(cpu_run[2], algorithm)
    assert ok == "ok", f"{name}: {note}"
    assert reference, f"{name}: the row says nothing about its reference"


def test_rows_with_a_reference_equal_it(cpu_run):
    rows = cpu_run[2]
    for prefix in ("sync_sgd", "ZeRO", "parameter server", "Hogwild!", "tensor parallel",
                   "mesh", "pipeline", "local SGD, period 1", "FedAvg", "LAMB", "1-bit Adam",
                   "all_reduce_compressed", "checkpoint", "elastic"):
        reference = _row(rows, prefix)[3]
        assert "=" in reference and "max abs diff" in reference, (prefix, reference)


def test_model_state_memory_falls_with_each_zero_stage(cpu_run):
    kib = [float(re.search(r"model states ([\d.]+) KiB", _row(cpu_run[2], f"ZeRO stage {s}")[4])
                 .group(1)) for s in range(4)]
    assert kib[0] > kib[1] > kib[2] > kib[3], kib
