"""How long an EMA remembers: windows, half-lives, batch scaling and EDM2's σ_rel ↔ γ.

For a constant decay β the weight of the parameters from ``k`` steps ago is ``(1-β)·β^k``:

* effective window (mean age + 1, the seed's "~N steps"): ``N = 1 / (1 - β)``
* half-life (age at which the weight has halved): ``h = ln 0.5 / ln β``
* changing the batch size by a factor ``κ`` keeps the horizon in *samples* with
  ``β' = β^κ`` (Busbridge et al. 2023, "How to scale your EMA").

For the power-function EMA (Karras et al. 2024) the averaging profile at the end of
training has relative standard deviation ``σ_rel = sqrt(γ+1) / ((γ+2)·sqrt(γ+3))``.

All functions take and return plain Python floats: they configure, they do not trace.
"""

from __future__ import annotations

import math

import numpy as np

#: Largest relative width a power-function profile can have (reached at γ ≈ -0.382).
SIGMA_REL_MAX = 0.30028310558


def _decay(decay: float) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be a float in [0, 1), got {decay!r}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    return float(decay)


def effective_window(decay: float) -> float:
    """``1 / (1 - β)`` steps: β = 0.999 averages over ~1000 steps."""
    return 1.0 / (1.0 - _decay(decay))


def half_life(decay: float) -> float:
    """``ln 0.5 / ln β`` steps after which a sample's weight has halved (0 for β = 0)."""
    decay = _decay(decay)
    return 0.0 if decay == 0.0 else math.log(0.5) / math.log(decay)


def decay_for_window(steps: float) -> float:
    """Inverse of :func:`effective_window`: ``β = 1 - 1/steps`` (``steps >= 1``)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, float)):
        raise TypeError(f"steps must be a number >= 1, got {steps!r}")
    if not (steps >= 1.0 and math.isfinite(steps)):
        raise ValueError(f"steps must be finite and >= 1, got {steps!r}")
    return 1.0 - 1.0 / float(steps)


def scale_decay(decay: float, batch_scale: float) -> float:
    """``β^κ``: the decay that keeps the same horizon in samples when the batch is κ× larger."""
    decay = _decay(decay)
    if isinstance(batch_scale, bool) or not isinstance(batch_scale, (int, float)):
        raise TypeError(f"batch_scale must be a number > 0, got {batch_scale!r}")
    if not (batch_scale > 0.0 and math.isfinite(batch_scale)):
        raise ValueError(f"batch_scale must be finite and > 0, got {batch_scale!r}")
    return decay ** float(batch_scale)


def gamma_to_sigma_rel(gamma: float) -> float:
    """``σ_rel = sqrt(γ+1) / ((γ+2)·sqrt(γ+3))`` (Karras et al. 2024, eq. 3), ``γ > -1``."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a number > -1, got {gamma!r}")
    if not (gamma > -1.0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be finite and > -1, got {gamma!r}")
    g = float(gamma)
    return math.sqrt(g + 1.0) / ((g + 2.0) * math.sqrt(g + 3.0))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Inverse of :func:`gamma_to_sigma_rel` on its decreasing branch (γ ≥ -0.382).

    Squaring gives the cubic ``γ³ + 7γ² + (16 - s⁻²)γ + (12 - s⁻²) = 0``; its largest real
    root is γ. ``sigma_rel`` must be in ``(0, SIGMA_REL_MAX]``.
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise TypeError(
            f"sigma_rel must be a number in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel!r}"
        )
    if not 0.0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel!r}")
    inv_sq = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv_sq, 12.0 - inv_sq])
    # For valid σ_rel the two largest roots are real (they merge at SIGMA_REL_MAX, where
    # rounding may leave a tiny imaginary part), so the largest real part is γ.
    return float(roots.real.max())
