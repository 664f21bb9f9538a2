"""Property tests: constants are fixed points, the shadow stays inside the range of
what it has seen, and the average is linear in its input sequence.

Shapes are fixed and each configuration's runner is built once, so hypothesis examples reuse
compiled code instead of recompiling.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from helpers import scan_runner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ema_jax
from ema_jax import schedules

STEPS, WIDTH = 12, 5

CONFIGS = {
    "plain 0.9": ema_jax.ema(0.9),
    "plain 0.5": ema_jax.ema(0.5),
    "debias 0.99": ema_jax.ema(0.99, debias=True),
    "debias tf_warmup": ema_jax.ema(schedules.tf_warmup(0.999), debias=True),
    "plain power_function": ema_jax.ema(schedules.power_function(gamma=1.0)),
    "debias inverse_power every 2": ema_jax.ema(
        schedules.inverse_power(power=0.75), debias=True, update_every=2
    ),
    "plain 0.7 start 3": ema_jax.ema(0.7, start_step=3),
}
RUNNERS = {name: scan_runner(tx) for name, tx in CONFIGS.items()}

SETTINGS = settings(max_examples=50, deadline=None)
names = st.sampled_from(sorted(CONFIGS))
floats = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
sequences = hnp.arrays(np.float32, (STEPS + 1, WIDTH), elements=floats)


@SETTINGS
@given(name=names, value=st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False))
def test_constant_sequence_is_a_fixed_point(name, value):
    """The EMA of a constant sequence is exactly that constant, at every step.

    (Subnormal constants are excluded: XLA on CPU flushes denormals to zero in arithmetic.)
    """
    seq = jnp.full((STEPS + 1, WIDTH), value, jnp.float32)
    shadows, _ = RUNNERS[name](seq[0], seq[1:])
    np.testing.assert_array_equal(np.asarray(shadows), np.asarray(seq[1:]))


@SETTINGS
@given(name=names, seq=sequences)
def test_shadow_stays_inside_what_it_has_seen(name, seq):
    """After step t every coordinate of the shadow lies within that coordinate's
    min/max over θ_0..θ_t (plain and debiased, constant and scheduled decays)."""
    shadows = np.asarray(RUNNERS[name](jnp.asarray(seq[0]), jnp.asarray(seq[1:]))[0])
    low = np.minimum.accumulate(seq, axis=0)[1:]
    high = np.maximum.accumulate(seq, axis=0)[1:]
    assert np.all(low <= shadows), name
    assert np.all(shadows <= high), name


@SETTINGS
@given(
    name=names,
    x=sequences,
    y=sequences,
    a=st.floats(-10, 10, width=32),
    b=st.floats(-10, 10, width=32),
)
def test_average_is_linear_in_the_sequence(name, x, y, a, b):
    """EMA(a·x + b·y) = a·EMA(x) + b·EMA(y), to float32 rounding.

    Tolerance: every quantity is a convex combination of inputs bounded by
    M = |a|·max|x| + |b|·max|y|; each of the ≤ 12 updates and the input combination round
    by ~2^-24·M a few times, so 1e-5·M (≈ 170 ulps of M) is generous but far below any real
    nonlinearity.
    """
    run = RUNNERS[name]
    z = (np.float32(a) * x + np.float32(b) * y).astype(np.float32)
    ez = np.asarray(run(jnp.asarray(z[0]), jnp.asarray(z[1:]))[0], np.float64)
    ex = np.asarray(run(jnp.asarray(x[0]), jnp.asarray(x[1:]))[0], np.float64)
    ey = np.asarray(run(jnp.asarray(y[0]), jnp.asarray(y[1:]))[0], np.float64)
    scale = abs(a) * np.abs(x).max() + abs(b) * np.abs(y).max()
    np.testing.assert_allclose(ez, a * ex + b * ey, rtol=0, atol=1e-5 * scale + 1e-30)
