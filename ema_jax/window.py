"""How long an EMA remembers: windows, half-lives, batch scaling and EDM2's σ_rel ↔ γ.

Each function's docstring gives its formula; ``docs/choosing-the-decay.md`` shows them in use.
All functions take and return plain Python floats: they configure, they do not trace.
"""

from __future__ import annotations

import math

import numpy as np

from ema_jax import _checks

#: The γ where σ_rel(γ) peaks: d/dγ log σ_rel = 0  ⇔  γ² + 3γ + 1 = 0.
_GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0
#: Largest relative width a power-function profile can have (≈ 0.30028, at γ ≈ -0.382).
SIGMA_REL_MAX = math.sqrt(_GAMMA_AT_MAX + 1.0) / (
    (_GAMMA_AT_MAX + 2.0) * math.sqrt(_GAMMA_AT_MAX + 3.0)
)


def effective_window(decay: float) -> float:
    """``1 / (1 - β)`` steps: β = 0.999 averages over ~1000 steps."""
    return 1.0 / (1.0 - _checks.decay("decay", decay))


def half_life(decay: float) -> float:
    """``ln 0.5 / ln β`` steps after which a sample's weight has halved (0 for β = 0)."""
    decay = _checks.decay("decay", decay)
    return 0.0 if decay == 0.0 else math.log(0.5) / math.log(decay)


def decay_for_window(steps: float) -> float:
    """Inverse of :func:`effective_window`: ``β = 1 - 1/steps`` (``steps >= 1``)."""
    beta = 1.0 - 1.0 / _checks.real("steps", steps, low=1.0)
    return _checks.below_one(beta, "steps", steps, "1 - 1/steps")


def scale_decay(decay: float, batch_scale: float) -> float:
    """``β^κ``: the decay that keeps the same horizon in samples when the batch is κ× larger."""
    decay = _checks.decay("decay", decay)
    beta = decay ** _checks.positive("batch_scale", batch_scale)
    return _checks.below_one(beta, "batch_scale", batch_scale, "decay**batch_scale")


def gamma_to_sigma_rel(gamma: float) -> float:
    """``σ_rel = sqrt(γ+1) / ((γ+2)·sqrt(γ+3))`` (Karras et al. 2024, eq. 3), ``γ > -1``."""
    g = _checks.real("gamma", gamma, low=-1.0, low_open=True)
    return math.sqrt(g + 1.0) / ((g + 2.0) * math.sqrt(g + 3.0))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Inverse of :func:`gamma_to_sigma_rel` on its decreasing branch (γ ≥ -0.382).

    Squaring gives the cubic ``γ³ + 7γ² + (16 - s⁻²)γ + (12 - s⁻²) = 0``; its largest real
    root is γ. ``sigma_rel`` must be in ``(0, SIGMA_REL_MAX]``.
    """
    sigma_rel = _checks.real("sigma_rel", sigma_rel, low=0.0, high=SIGMA_REL_MAX, low_open=True)
    inv_sq = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv_sq, 12.0 - inv_sq])
    # For valid σ_rel the two largest roots are real (they merge at SIGMA_REL_MAX, where
    # rounding may leave a tiny imaginary part), so the largest real part is γ.
    return float(roots.real.max())
