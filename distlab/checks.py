"""The checks every configuration dataclass runs in its ``__post_init__``.

Each algorithm's settings are a frozen dataclass that refuses bad input before any process
starts, with an error that names the class, the field, the bad value and what is allowed::

    require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
    # ValueError: SyncSGDConfig.lr=-1.0 is out of range; allowed a number > 0
"""
from __future__ import annotations

import math


def is_int(v) -> bool:
    """True for an int that is not a bool (in Python, ``True`` is the int 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """True for a finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def require(config, name: str, ok: bool, allowed) -> None:
    """Unless ``ok``, raise ValueError naming ``config.name``, its value and ``allowed``."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name}={getattr(config, name)!r} is out of "
                         f"range; allowed {allowed}")
