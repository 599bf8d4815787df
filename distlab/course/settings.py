"""Lab-wide settings read from the environment, in one place.

``DISTLAB_SMALL=1`` selects the small setting that CI and nbval use: labs and demos shrink
their step counts and sweeps so each notebook runs in well under a minute on 2 cores.
"""
from __future__ import annotations

import os


def small() -> bool:
    """True when the small (CI) setting is selected by ``DISTLAB_SMALL=1``."""
    return os.environ.get("DISTLAB_SMALL", "0") not in ("", "0", "false", "False")


def scale(full, small_value):
    """``small_value`` under ``DISTLAB_SMALL=1``, else ``full``: ``num_steps = scale(300, 40)``."""
    return small_value if small() else full
