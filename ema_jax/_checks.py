"""Argument checks shared by the public constructors: clear errors at construction time."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``float(value)`` if it is a finite real number in the given range, else a clear error.

    Accepts Python and NumPy numbers and concrete 0-d arrays; rejects bools and NaN.
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    is_number = isinstance(value, numbers.Real) or (
        np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)
        if hasattr(value, "dtype")
        else False
    )
    if isinstance(value, (bool, np.bool_)) or not is_number:
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    x = float(value)
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if math.isnan(x) or too_low or too_high or math.isinf(x):
        raise ValueError(f"{name} must be finite and in {interval}, got {value!r}")
    return x


def decay(name: str, value: Any) -> float:
    """A decay: a real number in [0, 1)."""
    return real(name, value, low=0.0, high=1.0, high_open=True)


def positive(name: str, value: Any) -> float:
    return real(name, value, low=0.0, low_open=True)


def below_one(beta: float, name: str, value: Any, formula: str, dtype: Any = np.float64) -> float:
    """``beta`` if it stays < 1 in ``dtype``, else a ``ValueError`` blaming argument ``name``:
    the decay computed from it (``formula``) rounds to 1.0, and such an average never moves."""
    if np.asarray(beta, dtype) == 1.0:
        raise ValueError(
            f"{name}={value!r} is out of range: {formula} rounds to 1.0 in {np.dtype(dtype)} "
            "and an average with decay 1.0 never moves"
            + (
                ""
                if np.dtype(dtype) == np.float64
                else " (enable jax_enable_x64 for longer windows)"
            )
        )
    return beta
