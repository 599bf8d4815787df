"""The one way distlab refuses bad input: before any process starts, naming what is wrong.

Each algorithm's settings are a frozen dataclass that checks itself in ``__post_init__``
with :func:`require`, and every public function that takes numbers checks them with
:func:`require_arg`; both name the setting, the bad value and what is allowed::

    require(self, "lr", is_number(self.lr) and self.lr > 0, "a number > 0")
    # ValueError: SyncSGDConfig.lr=-1.0 is out of range; allowed a number > 0
    require_arg("world_size", world_size, is_int(world_size) and world_size >= 1, "an int >= 1")
    # ValueError: world_size=0 is out of range; allowed an int >= 1
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
        require_arg(f"{type(config).__name__}.{name}", getattr(config, name), False, allowed)


def require_arg(name: str, value, ok: bool, allowed) -> None:
    """Unless ``ok``, raise ValueError naming the argument ``name``, its value and ``allowed``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range; allowed {allowed}")
