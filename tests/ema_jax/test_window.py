"""Window utilities: the seed's table, inverses and EDM2's σ_rel ↔ γ, and their
bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ema_jax
from ema_jax import window


@pytest.mark.parametrize(
    ("decay", "steps", "half", "digits"),
    [
        (0.9, 10, 6.58, 2),
        (0.99, 100, 68.97, 2),
        (0.999, 1000, 692.8, 1),
        (0.9999, 10000, 6931.1, 1),
    ],
)
def test_window_table(decay, steps, half, digits):
    """β 0.9/0.99/0.999/0.9999 → windows 10/100/1000/10000 steps and half-lives
    ln .5/ln β = 6.58/68.97/692.8/6931.1 steps; ``decay_for_window`` inverts the window."""
    assert ema_jax.effective_window(decay) == pytest.approx(steps, rel=1e-9)
    assert round(ema_jax.half_life(decay), digits) == half
    assert ema_jax.decay_for_window(steps) == pytest.approx(decay, abs=1e-12)
    assert ema_jax.decay_for_window(ema_jax.effective_window(decay)) == pytest.approx(decay)
    # The half-life is where the weight of a past sample has halved.
    assert decay ** ema_jax.half_life(decay) == pytest.approx(0.5, rel=1e-12)


def test_window_edges():
    """β = 0 forgets at once; ``decay_for_window(1)`` is 0."""
    assert ema_jax.effective_window(0.0) == 1.0
    assert ema_jax.half_life(0.0) == 0.0
    assert ema_jax.decay_for_window(1) == 0.0
    for steps in (1.5, 7, 123.25, 1e6):
        assert ema_jax.effective_window(ema_jax.decay_for_window(steps)) == pytest.approx(steps)


@pytest.mark.parametrize(("decay", "kappa"), [(0.999, 2), (0.999, 0.5), (0.9, 8), (0.0, 3)])
def test_scale_decay(decay, kappa):
    """``scale_decay(β, κ) = β^κ``; the half-life in steps shrinks by κ, i.e. it is
    unchanged in samples."""
    scaled = ema_jax.scale_decay(decay, kappa)
    assert scaled == pytest.approx(decay**kappa, rel=1e-15)
    if decay > 0:
        assert ema_jax.half_life(scaled) * kappa == pytest.approx(ema_jax.half_life(decay))


def test_numpy_scalars_are_accepted():
    """Window utilities take NumPy scalars as well as Python numbers."""
    assert ema_jax.effective_window(np.float32(0.99)) == pytest.approx(100, rel=1e-5)
    assert ema_jax.decay_for_window(np.int64(10)) == pytest.approx(0.9)
    assert ema_jax.scale_decay(np.float64(0.9), np.int32(2)) == pytest.approx(0.81)
    assert ema_jax.sigma_rel_to_gamma(np.float32(0.1)) == pytest.approx(6.94, abs=0.01)


def _sigma_rel(gamma):
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def test_edm2_sigma_rel_values():
    """EDM2's σ_rel = 0.05 and 0.10 correspond to γ ≈ 16.97 and 6.94 (checked from
    σ_rel = sqrt(γ+1)/((γ+2)·sqrt(γ+3)): σ_rel(16.97) and σ_rel(6.94) round to them)."""
    g05 = ema_jax.sigma_rel_to_gamma(0.05)
    g10 = ema_jax.sigma_rel_to_gamma(0.10)
    assert g05 == pytest.approx(16.97, abs=0.005)
    assert g10 == pytest.approx(6.94, abs=0.005)
    assert _sigma_rel(g05) == pytest.approx(0.05, rel=1e-12)
    assert _sigma_rel(g10) == pytest.approx(0.10, rel=1e-12)
    assert ema_jax.gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=1e-5)
    assert ema_jax.gamma_to_sigma_rel(6.94) == pytest.approx(0.10, abs=1e-4)


@pytest.mark.parametrize("gamma", [-0.38, -0.2, 0.0, 0.5, 1.0, 6.94, 16.97, 100.0, 1e4])
def test_sigma_rel_gamma_are_inverses(gamma):
    """``sigma_rel_to_gamma`` inverts ``gamma_to_sigma_rel`` on γ ≥ -0.382 (the
    decreasing branch), and the forward map is the paper's formula."""
    sigma = ema_jax.gamma_to_sigma_rel(gamma)
    assert sigma == pytest.approx(_sigma_rel(gamma), rel=1e-14)
    assert ema_jax.sigma_rel_to_gamma(sigma) == pytest.approx(gamma, rel=1e-6, abs=1e-6)


def test_sigma_rel_max_is_the_profile_maximum():
    """σ_rel(γ) peaks at γ = (√5 - 3)/2 ≈ -0.382; ``SIGMA_REL_MAX`` is that peak (to 1e-9)
    and is itself accepted."""
    peak = (math.sqrt(5) - 3) / 2
    grid = np.linspace(-0.9, 2.0, 20001)
    assert abs(grid[np.argmax([_sigma_rel(g) for g in grid])] - peak) < 2e-4
    assert abs(window.SIGMA_REL_MAX - _sigma_rel(peak)) < 1e-9
    assert ema_jax.sigma_rel_to_gamma(window.SIGMA_REL_MAX) == pytest.approx(peak, abs=1e-3)


@pytest.mark.parametrize(
    ("call", "error", "names"),
    [
        (lambda: ema_jax.effective_window(1.0), ValueError, "decay"),
        (lambda: ema_jax.effective_window(-0.1), ValueError, "decay"),
        (lambda: ema_jax.effective_window(float("nan")), ValueError, "decay"),
        (lambda: ema_jax.effective_window(True), TypeError, "decay"),
        (lambda: ema_jax.effective_window(np.bool_(False)), TypeError, "decay"),
        (lambda: ema_jax.effective_window(np.array([0.9])), TypeError, "decay"),
        (lambda: ema_jax.half_life(1.0), ValueError, "decay"),
        (lambda: ema_jax.half_life("0.9"), TypeError, "decay"),
        (lambda: ema_jax.decay_for_window(0.5), ValueError, "steps"),
        (lambda: ema_jax.decay_for_window(float("inf")), ValueError, "steps"),
        (lambda: ema_jax.decay_for_window(True), TypeError, "steps"),
        (lambda: ema_jax.decay_for_window(1e17), ValueError, "steps=1e+17"),
        (lambda: ema_jax.scale_decay(0.9, 1e-20), ValueError, "batch_scale=1e-20"),
        (lambda: ema_jax.scale_decay(1.0, 2.0), ValueError, "decay"),
        (lambda: ema_jax.scale_decay(0.9, 0.0), ValueError, "batch_scale"),
        (lambda: ema_jax.scale_decay(0.9, -2.0), ValueError, "batch_scale"),
        (lambda: ema_jax.scale_decay(0.9, float("inf")), ValueError, "batch_scale"),
        (lambda: ema_jax.scale_decay(0.9, True), TypeError, "batch_scale"),
        (lambda: ema_jax.gamma_to_sigma_rel(-1.0), ValueError, "gamma"),
        (lambda: ema_jax.gamma_to_sigma_rel(float("inf")), ValueError, "gamma"),
        (lambda: ema_jax.gamma_to_sigma_rel(None), TypeError, "gamma"),
        (lambda: ema_jax.sigma_rel_to_gamma(0.0), ValueError, "sigma_rel"),
        (lambda: ema_jax.sigma_rel_to_gamma(0.31), ValueError, "sigma_rel"),
        (lambda: ema_jax.sigma_rel_to_gamma(float("nan")), ValueError, "sigma_rel"),
        (lambda: ema_jax.sigma_rel_to_gamma(True), TypeError, "sigma_rel"),
    ],
)
def test_bad_window_arguments_raise_naming_them(call, error, names):
    """Window utilities reject bad arguments, naming them and the allowed range."""
    with pytest.raises(error) as info:
        call()
    assert names in str(info.value)
