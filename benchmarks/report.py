"""What every benchmark shares: interleaved pairs, their median with min and max, the report.

The machine is shared and one timing swings by 2x, so a comparison is never two separate
series: A and B alternate (A B A B ...), each pair gives one ratio, and the report gives the
median of the ratios with their min and max, beside the machine's load before and after.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(a: Callable[[], float], b: Callable[[], float], pairs: int,
                warmup: int = 1) -> tuple[list[float], list[float]]:
    """Call ``a`` and ``b`` alternately, ``pairs`` times after ``warmup`` untimed pairs.

    Each callable returns its own measurement (seconds, bytes/s, ...); returns both lists.
    """
    if pairs < 1:
        raise ValueError(f"pairs={pairs!r} must be >= 1")
    for _ in range(warmup):
        a(), b()
    out_a, out_b = [], []
    for _ in range(pairs):
        out_a.append(a())
        out_b.append(b())
    return out_a, out_b


def spread(values: list[float]) -> dict:
    """``{"median", "min", "max", "n"}`` of the values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def pair_ratios(ours: list[float], theirs: list[float]) -> dict:
    """The spread of ``ours[i] / theirs[i]`` over interleaved pairs."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError("ratios need two equally long, non-empty series of pairs")
    return spread([o / t for o, t in zip(ours, theirs)])


def fmt_ratio(r: dict) -> str:
    """``0.91× (0.85-1.02, 15 pairs)``."""
    return f"{r['median']:.2f}× ({r['min']:.2f}-{r['max']:.2f}, {r['n']} pairs)"


def parse_args(parser, argv=None):
    """``parser.parse_args(argv)`` with the shared ``--out DIR`` flag: where reports go
    (``benchmarks/results/`` by default; a smoke run writes elsewhere)."""
    global RESULTS
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the report")
    args = parser.parse_args(argv)
    RESULTS = args.out
    return args


def load() -> float:
    """The 1-minute load average (how busy the shared machine is)."""
    return os.getloadavg()[0]


def write(name: str, title: str, body: list[str], load_before: float) -> Path:
    """Write ``results/<name>.md``: title, date, command, machine and load, then ``body``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    header = [
        f"# {title}", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`",
        f"- machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}",
        f"- load average: {load_before:.1f} before, {load():.1f} after "
        "(other jobs share the cores)", "",
    ]
    path.write_text("\n".join(header + body) + "\n", encoding="utf-8")
    print(path.read_text(encoding="utf-8"))
    return path
