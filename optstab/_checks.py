"""Construction-time validation shared by every optstab transform.

Hyperparameters may be traced arrays (``optax.inject_hyperparams``), so only concrete
Python numbers are checked; arrays pass through unchecked.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any


def is_concrete_number(value: Any) -> bool:
    """A Python (or numpy scalar) real number, not a bool and not an array."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_range(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    """Raises ``ValueError`` naming ``name`` if a concrete ``value`` fails ``ok``."""
    if is_concrete_number(value) and not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_count(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` is a whole number >= 0."""
    check_range(name, value, lambda x: x >= 0 and float(x).is_integer(), "an integer >= 0")
