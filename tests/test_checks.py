"""distlab.checks: the checks every configuration dataclass shares."""
import math
from dataclasses import dataclass

import pytest

from distlab.checks import is_int, is_number, require


def test_bools_are_neither_ints_nor_numbers_and_numbers_are_finite():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and not is_number(False)
    assert not is_number(math.inf) and not is_number(math.nan) and not is_number("1")


def test_require_names_the_class_field_value_and_allowed_range():
    @dataclass(frozen=True)
    class Toy:
        lr: float = -1.0

    require(Toy(), "lr", True, "a number > 0")     # ok: nothing happens
    with pytest.raises(ValueError, match=r"^Toy\.lr=-1\.0 is out of range; allowed a number > 0$"):
        require(Toy(), "lr", False, "a number > 0")
