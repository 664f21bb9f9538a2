"""The post-hoc solver, in NumPy: the weights that combine power-function EMA snapshots
into the power-function EMA of another width (EDM2's Algorithm 3)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ema_jax import _checks, window

#: The σ_rel of the two EMAs recorded during training (EDM2's defaults).
SIGMA_RELS = (0.05, 0.10)
#: σ_rel of γ = 0 (a uniform average), ``sqrt(1/12)``: synthesized σ_rel must be below it.
SIGMA_REL_GAMMA0 = window.gamma_to_sigma_rel(0.0)
#: Largest condition number of the snapshots' Gram matrix that is still solved.
MAX_CONDITION = 1e13


def _profile_inner_products(
    a_steps: np.ndarray, a_gammas: np.ndarray, b_steps: np.ndarray, b_gammas: np.ndarray
) -> np.ndarray:
    """``<p_a, p_b>`` of power-function profiles ``p(τ) = (γ+1)·τ^γ / t^(γ+1)`` on
    ``[0, t]``, broadcast: with ``t_a ≤ t_b`` it is
    ``(γ_a+1)(γ_b+1) / ((γ_a+γ_b+1)·t_b) · (t_a/t_b)^γ_b``."""
    first = a_steps <= b_steps
    t_lo = np.where(first, a_steps, b_steps)
    t_hi = np.where(first, b_steps, a_steps)
    g_hi = np.where(first, b_gammas, a_gammas)
    scale = (a_gammas + 1.0) * (b_gammas + 1.0) / (a_gammas + b_gammas + 1.0)
    return np.asarray(scale / t_hi * (t_lo / t_hi) ** g_hi, np.float64)


def solve_coefficients(
    in_steps: Sequence[float],
    in_sigma_rels: Sequence[float],
    out_step: float,
    out_sigma_rel: float | Sequence[float],
) -> np.ndarray:
    """The weights that synthesize the power-function EMA ``(out_step, out_sigma_rel)``.

    Snapshot ``i`` is the power-function EMA of relative width ``in_sigma_rels[i]`` at step
    ``in_steps[i]``. The weights minimise the L2 distance between the target's averaging
    profile and the weighted sum of the snapshots' (EDM2's Algorithm 3: a linear system of
    the profiles' inner products), then are normalised to sum to 1. Snapshots after
    ``out_step`` get weight 0. Several ``out_sigma_rel`` share one factorisation of the
    system (a Cholesky factor, which also gives its condition number).

    Returns:
      float64 ``[len(in_steps)]``, summing to 1; for a sequence of K ``out_sigma_rel``,
      ``[K, len(in_steps)]``, one row per width.

    Warns:
      UserWarning: the snapshots used are all of one step: their combination cannot tell
        widths apart well (it needs snapshots of at least 2 steps to choose σ_rel).

    Raises:
      ValueError: an ``out_sigma_rel`` not finite in ``(0, SIGMA_REL_GAMMA0)`` (or none);
        an input σ_rel outside ``(0, SIGMA_REL_MAX]``; steps not finite and > 0; lengths
        differing; no snapshot at or before ``out_step``; identical snapshots or a
        near-singular system.
    """
    steps = np.asarray(
        [_checks.positive(f"in_steps[{i}]", s) for i, s in enumerate(in_steps)], np.float64
    )
    sigmas = [
        _checks.real(f"in_sigma_rels[{i}]", s, low=0.0, high=window.SIGMA_REL_MAX, low_open=True)
        for i, s in enumerate(in_sigma_rels)
    ]
    if len(sigmas) != len(steps):
        raise ValueError(
            f"in_steps and in_sigma_rels must have one entry per snapshot, got {len(steps)} "
            f"and {len(sigmas)}"
        )
    out_step = _checks.positive("out_step", out_step)
    many = not np.isscalar(out_sigma_rel) and np.ndim(out_sigma_rel) == 1
    outs = list(out_sigma_rel) if many else [out_sigma_rel]  # type: ignore[arg-type]
    if not outs:
        raise ValueError("out_sigma_rel is empty: give at least one σ_rel to synthesize")
    out_sigmas = [
        _checks.real(
            f"out_sigma_rel[{k}]" if many else "out_sigma_rel",
            s,
            low=0.0,
            high=SIGMA_REL_GAMMA0,
            low_open=True,
            high_open=True,
        )
        for k, s in enumerate(outs)
    ]
    if not len(steps):
        raise ValueError("no snapshots: in_steps is empty")
    used = np.flatnonzero(steps <= out_step)
    if not len(used):
        raise ValueError(
            f"every snapshot is after out_step={out_step:g} (the earliest is at step "
            f"{steps.min():g}): a synthesized EMA uses only snapshots at or before its step"
        )
    gamma_of = {s: window.sigma_rel_to_gamma(s) for s in {*sigmas, *out_sigmas}}
    gammas = np.asarray([gamma_of[s] for s in sigmas], np.float64)
    seen: dict[tuple[float, float], int] = {}
    for i in used.tolist():
        twin = seen.setdefault((float(steps[i]), sigmas[i]), i)
        if twin != i:
            raise ValueError(
                f"snapshots {twin} and {i} are the same EMA (step {steps[i]:g}, sigma_rel "
                f"{sigmas[i]:g}): their profiles are identical, so the system is singular"
            )
    if len(np.unique(steps[used])) < 2:
        warnings.warn(
            f"synthesizing from the snapshot of one step ({steps[used[0]]:g}) alone: at "
            "least 2 snapshots (of different steps) are needed to choose sigma_rel; the "
            "result barely depends on it",
            UserWarning,
            stacklevel=2,
        )
    t, g = steps[used] / out_step, gammas[used]  # steps relative to out_step: same solution
    gram = _profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    out_gammas = np.asarray([gamma_of[s] for s in out_sigmas], np.float64)
    targets = _profile_inner_products(t[:, None], g[:, None], np.ones(()), out_gammas[None, :])
    weights = _solve(gram, targets)
    totals = weights.sum(axis=0)
    for k, total in enumerate(totals):
        if not np.isfinite(total) or abs(total) < 1e-12:
            raise ValueError(
                f"the least-squares weights of sigma_rel {out_sigmas[k]:g} sum to {total:g}: "
                "cannot normalise them"
            )
    out = np.zeros((len(outs), len(steps)), np.float64)
    out[:, used] = (weights / totals).T
    return out if many else out[0]


def _solve(gram: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``gram⁻¹ · targets`` for the symmetric positive definite Gram matrix; a
    ``ValueError`` when it is not positive definite (no Cholesky factor) or its 1-norm
    condition number ``‖G‖₁·‖G⁻¹‖₁`` passes :data:`MAX_CONDITION`. NumPy only: the inverse
    comes from the Cholesky factor's, ``O(n³)`` like the factorisation (an SVD costs ten
    times more)."""
    dependent = (
        "the snapshots' profiles are nearly linearly dependent (condition number {} > "
        f"{MAX_CONDITION:g}): use fewer or more distinct snapshots"
    )
    try:
        lower = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        raise ValueError(dependent.format("inf")) from None
    inverse_lower = np.linalg.solve(lower, np.eye(len(gram)))
    inverse = inverse_lower.T @ inverse_lower
    condition = float(np.abs(gram).sum(axis=0).max() * np.abs(inverse).sum(axis=0).max())
    if not condition < MAX_CONDITION:
        raise ValueError(dependent.format(f"{condition:.3g}"))
    return np.asarray(np.linalg.solve(gram, targets))
