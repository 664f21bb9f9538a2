"""ema_jax.posthoc's solver: the weights against a quadrature re-derivation, and the inputs
it refuses, each named."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from posthoc_support import reference_coefficients, tree

from ema_jax import posthoc

LAYOUTS = {
    "two sigmas, every 100 steps": (
        [s for s in range(100, 801, 100) for _ in range(2)],
        [0.05, 0.10] * 8,
        800,
        0.15,
    ),
    "irregular, later snapshots unused": (
        [30, 30, 75, 75, 160, 160, 400, 400, 900, 900],
        [0.05, 0.10] * 5,
        400,
        0.03,
    ),
    "three sigmas, off-grid target": ([50, 50, 50, 120, 120, 120], [0.05, 0.1, 0.2] * 2, 100, 0.08),
    "one snapshot": ([1000], [0.1], 1000, 0.2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_solve_coefficients_equals_quadrature_rederivation(layout: str) -> None:
    steps, sigmas, out_step, out_sigma = LAYOUTS[layout]
    got = posthoc.solve_coefficients(steps, sigmas, out_step, out_sigma)
    want = reference_coefficients(steps, sigmas, out_step, out_sigma)
    assert got.dtype == np.float64 and got.shape == (len(steps),)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert np.all(got[np.asarray(steps) > out_step] == 0.0)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.3, float("nan"), float("inf")])
def test_out_sigma_rel_out_of_range_or_nan_raises(bad: float) -> None:
    with pytest.raises(ValueError, match=r"out_sigma_rel must be finite and in \(0, 0.288"):
        posthoc.solve_coefficients([100, 100], [0.05, 0.1], 100, bad)
    with pytest.raises(ValueError, match="out_sigma_rel"):
        posthoc.synthesize([(100, 0.05, tree()), (100, 0.1, tree(1))], bad)


BAD_SNAPSHOTS: dict[str, tuple[Callable[[], Any], str]] = {
    "no snapshots": (lambda: posthoc.synthesize([], 0.1), "snapshots is empty"),
    "no steps": (lambda: posthoc.solve_coefficients([], [], 10, 0.1), "in_steps is empty"),
    "a leaf missing": (
        lambda: posthoc.synthesize(
            [(10, 0.05, tree()), (10, 0.1, {"w": jnp.ones((2, 3)), "c": jnp.zeros(3)})], 0.1
        ),
        r"\['b'\] is in the snapshots\[0\] but not in the snapshots\[1\]",
    ),
    "a leaf of another shape": (
        lambda: posthoc.synthesize(
            [(10, 0.05, tree()), (10, 0.1, {**tree(), "w": jnp.ones((3, 2))})], 0.1
        ),
        r"\['w'\] has shape \(3, 2\) in the snapshots\[1\]",
    ),
    "every snapshot after the step": (
        lambda: posthoc.synthesize([(100, 0.05, tree()), (200, 0.1, tree(1))], 0.1, step=50),
        r"every snapshot is after out_step=50 \(the earliest is at step 100\)",
    ),
    "the same EMA twice": (
        lambda: posthoc.solve_coefficients([100, 100, 100], [0.05, 0.1, 0.05], 100, 0.1),
        "snapshots 0 and 2 are the same EMA",
    ),
    "nearly dependent profiles": (
        lambda: posthoc.solve_coefficients([100, 100 + 1e-13, 200], [0.05, 0.05, 0.1], 200, 0.1),
        "nearly linearly dependent",
    ),
    "a NaN sigma_rel": (
        lambda: posthoc.solve_coefficients([100, 200], [0.05, float("nan")], 200, 0.1),
        r"in_sigma_rels\[1\] must be finite",
    ),
    "a step 0": (
        lambda: posthoc.solve_coefficients([0, 200], [0.05, 0.1], 200, 0.1),
        r"in_steps\[0\] must be finite",
    ),
    "lengths differing": (
        lambda: posthoc.solve_coefficients([100, 200], [0.05], 200, 0.1),
        "one entry per snapshot",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SNAPSHOTS))
def test_bad_snapshots_raise_clear_errors(case: str) -> None:
    call, message = BAD_SNAPSHOTS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_several_widths_share_one_solve_and_equal_one_at_a_time() -> None:
    steps, sigmas, out_step, _ = LAYOUTS["two sigmas, every 100 steps"]
    widths = [0.03, 0.08, 0.15, 0.25]
    got = posthoc.solve_coefficients(steps, sigmas, out_step, widths)
    assert got.shape == (len(widths), len(steps))
    for row, width in zip(got, widths, strict=True):
        np.testing.assert_allclose(
            row, reference_coefficients(steps, sigmas, out_step, width), rtol=1e-6, atol=1e-8
        )
    with pytest.raises(ValueError, match=r"out_sigma_rel\[1\] must be finite"):
        posthoc.solve_coefficients(steps, sigmas, out_step, [0.1, 0.3])
    with pytest.raises(ValueError, match="out_sigma_rel is empty"):
        posthoc.solve_coefficients(steps, sigmas, out_step, [])


def test_snapshots_of_one_step_warn_that_sigma_rel_cannot_be_chosen() -> None:
    with pytest.warns(UserWarning, match="at least 2 snapshots"):
        posthoc.solve_coefficients([100, 100], [0.05, 0.1], 100, 0.1)
