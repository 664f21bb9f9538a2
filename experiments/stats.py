"""The study's statistics over seeds: t-intervals and paired differences.

Every figure the reports give over seeds is ``mean ± t_{0.975, n-1}·s/√n`` (:func:`mean_ci`,
written by :func:`fmt`); EMA-against-raw comparisons are paired by seed (:func:`differences`,
:func:`percent_differences`, :func:`ratios`), the two lists aligned seed by seed. JAX-free;
scipy (an experiment extra) is imported by :func:`mean_ci`, where it is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the ``level`` t-interval for the mean; half-width is
    ``nan`` for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if v.size < 2:
        return float(v.mean()), float("nan")
    from scipy import stats  # an experiment extra: imported where used (experiments.extras)

    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(v.mean()), float(half)


def fmt(values: Sequence[float], digits: int = 2) -> str:
    """``"mean ± half-width"`` of :func:`mean_ci`, to ``digits`` decimals."""
    m, h = mean_ci(values)
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def differences(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """``value − base``, pair by pair (negative: lower than the base)."""
    return [v - b for v, b in zip(values, base, strict=True)]


def percent_differences(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """``100·(value − base)/base``, pair by pair: the difference in % of the base."""
    return [100 * (v - b) / b for v, b in zip(values, base, strict=True)]


def ratios(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """``value / base``, pair by pair."""
    return [v / b for v, b in zip(values, base, strict=True)]


__all__ = ["differences", "fmt", "mean_ci", "percent_differences", "ratios"]
