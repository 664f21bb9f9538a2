"""``ema_jax.ema``: plain and debiased averages against float64 references, dtypes, the
non-finite guard, ``update_every`` / ``start_step``, and the rule's misuse errors."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import f32, np_debiased_closed_form, np_plain_ema, scan_updates

import ema_jax
from ema_jax import schedules

RNG = np.random.default_rng(20241124)
THETAS = RNG.normal(size=(1001, 64))  # θ_0 .. θ_1000
F32 = jnp.zeros(2, jnp.float32)


# ------------------------------------------------------------------------------- accuracy


def test_plain_float64_matches_numpy_loop_with_exact_beta():
    """Float64 params (x64 on), 1000 updates, equal to the float64 loop with the
    exact β (decay arithmetic runs in the default float dtype, float64 under x64)."""
    with jax.enable_x64(True):
        thetas = jnp.asarray(THETAS, jnp.float64)
        outs = np.asarray(scan_updates(ema_jax.ema(0.999), thetas[0], thetas[1:])[0])
    ref = np_plain_ema(THETAS[0], THETAS[1:], [0.999] * 1000)
    np.testing.assert_allclose(outs, ref, rtol=1e-6)


def test_plain_float32_matches_numpy_loop():
    """Float32 params, 1000 updates, against the float64 loop (β = float32(0.999)).

    Tolerance: each update rounds a few times by ≤ 2^-24·|ema|; the errors have random sign
    and are damped by β each step, so they accumulate like a random walk of length
    ~1/(1-β²) ≈ 500 steps: ≈ 22·2·6e-8·M ≈ 3e-6·M (M = max|θ|). We allow 1e-5·M, still
    ~100x smaller than a one-step shift of the average ((1-β)·|θ - ema| ≈ 1e-3·M).
    """
    thetas = jnp.asarray(THETAS, jnp.float32)
    outs = np.asarray(scan_updates(ema_jax.ema(0.999), thetas[0], thetas[1:])[0])
    theta64 = np.asarray(thetas, np.float64)
    ref = np_plain_ema(theta64[0], theta64[1:], [f32(0.999)] * 1000)
    np.testing.assert_allclose(outs, ref, rtol=0, atol=1e-5 * np.abs(theta64).max())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ema_jax.ema(0.99999).init(F32), r"decay=0.99999 in float32.*relative error"),
        (lambda: ema_jax.ema((0.9, 0.9999999)).init(F32), r"decay\[1\]=0.9999999 in float32"),
        (lambda: schedules.inverse_power(max_decay=0.99999), "max_decay=0.99999 in float32"),
        (lambda: schedules.tf_warmup(0.99999), "decay=0.99999 in float32"),
    ],
    ids=["float decay", "decay in a tuple", "inverse_power", "tf_warmup"],
)
def test_a_decay_too_long_for_float32_warns(make, match):
    """A decay whose float32 rounding error passes 1e-3 (β > 1 - 2^-24/1e-3 ≈ 0.99994;
    measured table in docs/guarantees.md) warns at ``init`` / schedule construction."""
    with pytest.warns(UserWarning, match=match):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ema_jax.ema(0.9999).init(F32),
        lambda: schedules.constant(0.9999),
    ],
    ids=["float decay", "constant"],
)
def test_a_decay_float32_keeps_accurate_does_not_warn(make):
    """0.9999 stays within 1e-3 in float32: no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make()


def test_float64_accumulators_do_not_warn_for_long_decays():
    """Under x64, float64 accumulators keep 0.99999 accurate: no warning."""
    with warnings.catch_warnings(), jax.enable_x64(True):
        warnings.simplefilter("error")
        ema_jax.ema(0.99999).init(jnp.zeros(2, jnp.float64))


# ------------------------------------------------------------------------ bias correction


def test_debias_constant_equals_optax_ema_every_step():
    """``debias=True`` with constant β equals ``optax.ema(β, debias=True)`` at
    every one of 200 steps (float32 on both sides: atol/rtol 1e-5)."""
    beta = 0.99
    thetas = jnp.asarray(THETAS[:201], jnp.float32)
    ours = np.asarray(scan_updates(ema_jax.ema(beta, debias=True), thetas[0], thetas[1:])[0])
    theirs = np.asarray(scan_updates(optax.ema(beta, debias=True), thetas[0], thetas[1:])[0])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # The first debiased update is θ_1 itself (no trace of the init θ_0).
    np.testing.assert_array_equal(ours[0], np.asarray(thetas[1]))


@pytest.mark.parametrize("update_every", [1, 3])
def test_debias_schedule_skips_and_update_every_equal_closed_form(update_every):
    """With a schedule, ``update_every`` and NaN-skipped steps, the debiased average
    equals ``Σ_k (1-β_k)·Π_{j>k} β_j·θ_k / (1 - Π_j β_j)`` over the applied steps (float64)."""
    n = 60
    schedule = schedules.inverse_power(inv_gamma=1.0, power=0.75, max_decay=0.99)
    thetas = np.array(THETAS[: n + 1, :8], np.float32)
    bad_steps = {5, 6, 12, 30}  # 1-based steps whose params hold NaN / Inf
    for t in bad_steps:
        thetas[t, t % 8] = np.nan if t % 2 else np.inf
    outs, state = scan_updates(
        ema_jax.ema(schedule, debias=True, update_every=update_every, skip_nonfinite=True),
        jnp.asarray(thetas[0]),
        jnp.asarray(thetas[1:]),
    )
    # Only updates that were due and skipped count: a NaN on a step in between is not read.
    assert int(state.num_skipped) == sum(t % update_every == 0 for t in bad_steps)
    assert int(state.count) == n
    # β the transform uses: the product of the schedule's float32 values over the
    # update_every steps the update stands for.
    steps = range(1, n + 1)
    per_step = [float(schedule(jnp.int32(t))) for t in steps]
    betas = [float(np.prod(per_step[max(0, t - update_every) : t])) for t in steps]
    applied = [t % update_every == 0 and t not in bad_steps for t in steps]
    ref = np_debiased_closed_form(np.asarray(thetas[1:], np.float64), betas, applied)
    first = applied.index(True)
    np.testing.assert_allclose(np.asarray(outs)[first:], ref[first:], rtol=1e-5, atol=1e-5)
    # Before the first applied update the shadow is still the initial copy.
    np.testing.assert_array_equal(np.asarray(outs)[:first], np.broadcast_to(thetas[0], (first, 8)))


# --------------------------------------------------------------------------------- dtypes


def test_bf16_params_follow_fp32_prediction_without_stall():
    """bf16 params, β = 0.9999, 10 000 updates toward a fixed target.

    The float32 accumulator follows ``target + (init - target)·β^n`` (β = float32(0.9999));
    a bf16-arithmetic EMA of the same sequence stalls at its init (1 - β rounds to nothing
    against bf16's 2^-8 spacing), which is what this test would see without fp32 accumulators.
    """
    n, beta, init, target = 10_000, 0.9999, 1.0, 3.0
    params0 = jnp.full((8,), init, jnp.bfloat16)
    targets = jnp.full((n, 8), target, jnp.bfloat16)
    tx = ema_jax.ema(beta)

    @jax.jit
    def run(params0, targets):
        def body(state, p):
            out, state = tx.update(p, state)
            return state, (out, state.ema)

        return jax.lax.scan(body, tx.init(params0), targets)[1]

    shadows, accumulators = run(params0, targets)
    assert shadows.dtype == jnp.bfloat16 and accumulators.dtype == jnp.float32
    steps = np.arange(1, n + 1, dtype=np.float64)[:, None]
    predicted = target + (init - target) * f32(beta) ** steps
    # fp32 rounding: ≤ ulp(2)/2 = 1.2e-7 per update with random sign, ≈ √n·1.2e-7 = 1.2e-5
    # after n = 10⁴ (measured: 1.7e-6). atol 2e-5 is below a one-step lag, 2·(1-β)·β^n ≥ 7e-5.
    np.testing.assert_allclose(
        np.asarray(accumulators), np.broadcast_to(predicted, (n, 8)), rtol=0, atol=2e-5
    )
    # The bf16 shadow is the accumulator rounded to nearest bf16 (spacing 2^-6 in [2, 4)).
    np.testing.assert_allclose(
        np.asarray(shadows, np.float64), np.broadcast_to(predicted, (n, 8)), atol=2.0**-7 + 2e-5
    )
    assert float(shadows[-1, 0]) > 2.2  # predicted 3 - 2·0.3679 = 2.264

    @jax.jit
    def bf16_ema(params0, targets):
        b = jnp.bfloat16(beta)

        def body(e, p):
            e = b * e + (jnp.bfloat16(1) - b) * p
            return e, e

        return jax.lax.scan(body, params0, targets)[1]

    stalled = np.asarray(bf16_ema(params0, targets), np.float64)
    assert np.all(stalled == init)  # no progress at all in bf16 arithmetic


@pytest.mark.parametrize("accumulator_dtype", [None, jnp.float32, jnp.bfloat16])
def test_complex_params_keep_their_imaginary_part(accumulator_dtype):
    """A complex leaf is averaged in the complex dtype of the requested precision (a real
    accumulator would drop the imaginary part), beside a bf16 leaf that gets the request."""
    tx = ema_jax.ema(0.75, accumulator_dtype=accumulator_dtype)
    params = {"z": jnp.asarray([1 + 1j, -2j], jnp.complex64), "h": jnp.ones(2, jnp.bfloat16)}
    state = tx.init(params)
    assert state.ema["z"].dtype == jnp.complex64
    assert state.ema["h"].dtype == (accumulator_dtype or jnp.float32)
    out, state = tx.update({"z": jnp.asarray([5 + 9j, 4j], jnp.complex64), "h": params["h"]}, state)
    assert out["z"].dtype == jnp.complex64
    # 0.75·(1+1j) + 0.25·(5+9j) = 2+3j;  0.75·(−2j) + 0.25·4j = −0.5j
    np.testing.assert_array_equal(np.asarray(out["z"]), [2 + 3j, -0.5j])


def test_complex128_accumulators_for_a_float64_request():
    with jax.enable_x64(True):
        tx = ema_jax.ema(0.5, accumulator_dtype=jnp.float64)
        state = tx.init({"z": jnp.asarray([1j], jnp.complex64)})
        assert state.ema["z"].dtype == jnp.complex128


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_an_accumulator_narrower_than_float32_warns(dtype):
    """An accumulator narrower than float32 is kept as asked but warns (it stalls: bf16,
    β = 0.999, 5000 steps towards 1.0 from 0 gives 0.25, the exact 0.993)."""
    with pytest.warns(UserWarning, match=f"accumulator_dtype={jnp.dtype(dtype).name} is narrower"):
        tx = ema_jax.ema(0.999, accumulator_dtype=dtype)
    assert tx.init(jnp.zeros(1)).ema.dtype == dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema_jax.ema(0.999, accumulator_dtype=jnp.float32).init(jnp.zeros(1, jnp.bfloat16))


# ----------------------------------------------------------- non-finite params and decays


def _mixed_params(w):
    return {
        "w": jnp.asarray(w, jnp.float32),
        "n": jnp.asarray([7, -3], jnp.int32),
        "flag": jnp.asarray([True, False]),
    }


def test_nonfinite_params_skip_update_and_count_still_advances():
    """A NaN or Inf in any floating leaf skips the update: EMA and weight are
    unchanged (bitwise), ``num_skipped`` increments, ``count`` advances; int and bool leaves
    are copied on applied updates, never averaged."""
    tx = ema_jax.ema(0.5, debias=True, skip_nonfinite=True)
    update = jax.jit(tx.update)
    state = tx.init(_mixed_params([0.0, 0.0, 0.0]))

    good = {
        "w": jnp.asarray([2.0, 4.0, 6.0]),
        "n": jnp.asarray([1, 2]),
        "flag": jnp.asarray([False, True]),
    }
    out, state = update(good, state)
    np.testing.assert_array_equal(out["w"], [2.0, 4.0, 6.0])  # debiased: first update copies
    np.testing.assert_array_equal(out["n"], [1, 2])
    np.testing.assert_array_equal(out["flag"], [False, True])
    before = state

    for bad_value in (np.nan, np.inf, -np.inf):
        bad = {
            "w": jnp.asarray([1.0, bad_value, 1.0]),
            "n": jnp.asarray([9, 9]),
            "flag": jnp.asarray([True, True]),
        }
        out, state = update(bad, state)
        for key in ("w", "n", "flag"):
            np.testing.assert_array_equal(state.ema[key], before.ema[key])
            np.testing.assert_array_equal(out[key], before.ema[key])
        np.testing.assert_array_equal(state.weight, before.weight)
    assert int(state.num_skipped) == 3
    assert int(state.count) == 4

    nxt = {
        "w": jnp.asarray([0.0, 0.0, 0.0]),
        "n": jnp.asarray([5, 6]),
        "flag": jnp.asarray([True, False]),
    }
    out, state = update(nxt, state)
    # Debiased with β = 0.5: weights (0.5·0.5, 0.5) / 0.75 on θ = (2,4,6) and 0.
    np.testing.assert_allclose(out["w"], np.array([2.0, 4.0, 6.0]) / 3.0, rtol=1e-6)
    np.testing.assert_array_equal(out["n"], [5, 6])  # copied, not averaged with [1, 2]
    assert out["n"].dtype == jnp.int32 and out["flag"].dtype == jnp.bool_
    np.testing.assert_array_equal(out["flag"], [True, False])
    assert int(state.num_skipped) == 3 and int(state.count) == 5


@pytest.mark.parametrize(
    ("dtype", "big"), [(jnp.float32, 3e38), (jnp.float16, 6e4), (jnp.bfloat16, 3e38)]
)
def test_large_finite_params_are_not_skipped(dtype, big):
    """Finite params whose sum overflows (so a sum-based check sees Inf) are still
    averaged; NaN / ±Inf hidden among them, or split across leaves, are still caught."""
    tx = ema_jax.ema(0.5, skip_nonfinite=True)
    update = jax.jit(tx.update)
    zeros = {"a": jnp.zeros(64, dtype), "b": jnp.zeros(3, dtype)}
    state = tx.init(zeros)
    large = {"a": jnp.full(64, big, dtype), "b": jnp.full(3, big, dtype)}
    out, state = update(large, state)
    assert int(state.num_skipped) == 0
    np.testing.assert_allclose(np.asarray(out["a"], np.float64), float(dtype(big)) / 2, rtol=1e-2)
    for bad in (
        {"a": large["a"].at[17].set(jnp.nan), "b": large["b"]},
        {"a": large["a"].at[5].set(-jnp.inf), "b": large["b"]},
        {"a": large["a"].at[0].set(jnp.inf), "b": large["b"].at[1].set(-jnp.inf)},
    ):
        before = state.ema
        out, state = update(bad, state)
        for key in ("a", "b"):
            np.testing.assert_array_equal(state.ema[key], before[key])
    assert int(state.num_skipped) == 3


@pytest.mark.parametrize(("dtype", "big"), [(jnp.float32, 3e38), (jnp.float16, 6e4)])
def test_huge_values_of_opposite_signs_average_without_overflow(dtype, big):
    """θ − average overflows for huge finite values of opposite signs; the average itself
    is representable (here 0 or ±big/2) and must come out, for α < 0.5 and α ≥ 0.5."""
    for decay, expected in ((0.5, 0.0), (0.75, big / 2), (0.25, -big / 2)):
        tx = ema_jax.ema(decay, accumulator_dtype=dtype)
        state = tx.init(jnp.asarray([big], dtype))
        out, state = tx.update(jnp.asarray([-big], dtype), state)
        assert int(state.num_skipped) == 0
        np.testing.assert_allclose(np.asarray(out, np.float64), [expected], rtol=1e-3, atol=0)


def test_nan_between_due_updates_is_neither_read_nor_counted():
    """``update_every=4``: a NaN on steps 1–3 (no update due) changes nothing and is not a
    skipped update; the same NaN on step 4 (due) is skipped and counted."""
    tx = ema_jax.ema(0.5, update_every=4, skip_nonfinite=True)
    update = jax.jit(tx.update)
    state = tx.init(jnp.ones(2))
    bad = jnp.asarray([np.nan, 1.0])
    for _ in range(3):
        _, state = update(bad, state)
    assert int(state.num_skipped) == 0
    np.testing.assert_array_equal(state.ema, [1.0, 1.0])
    _, state = update(bad, state)
    assert int(state.num_skipped) == 1 and int(state.count) == 4
    np.testing.assert_array_equal(state.ema, [1.0, 1.0])
    for _ in range(4):
        out, state = update(jnp.asarray([3.0, 3.0]), state)
    # β^4 = 1/16 on step 8: 1/16 · 1 + 15/16 · 3 = 46/16
    np.testing.assert_allclose(out, [46 / 16, 46 / 16], rtol=1e-6)
    assert int(state.num_skipped) == 1


@pytest.mark.parametrize("kwargs", [{}, {"skip_nonfinite": False}], ids=["default", "explicit"])
def test_nonfinite_propagates_when_not_skipping(kwargs):
    """Without the guard (the default) NaN / Inf reach the average."""
    tx = ema_jax.ema(0.9, **kwargs)
    assert not tx.skip_nonfinite
    state = tx.init(_mixed_params([1.0, 1.0, 1.0]))
    out, state = tx.update(_mixed_params([np.nan, 1.0, np.inf]), state)
    w = np.asarray(out["w"])
    assert np.isnan(w[0]) and w[1] == 1.0 and np.isposinf(w[2])
    assert int(state.num_skipped) == 0
    out, state = tx.update(_mixed_params([1.0, 1.0, 1.0]), state)
    assert np.isnan(np.asarray(out["w"])[0])  # once in, NaN stays


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 0.9},
        {"decay": 0.99, "debias": True},
        {"decay": 0.9, "start_step": 3},
        {"decay": (0.9, 0.99), "debias": (False, True)},
    ],
)
def test_unguarded_update_equals_guarded_on_finite_params(kwargs):
    """``skip_nonfinite=False`` with ``update_every=1`` runs the pass without a branch; on
    finite params it gives bitwise the guarded update's shadows and state."""
    thetas = jnp.asarray(THETAS[:13, :8], jnp.float32)
    guarded = scan_updates(ema_jax.ema(**kwargs, skip_nonfinite=True), thetas[0], thetas[1:])
    unguarded = scan_updates(ema_jax.ema(**kwargs, skip_nonfinite=False), thetas[0], thetas[1:])
    for got, want in zip(jax.tree.leaves(unguarded), jax.tree.leaves(guarded), strict=True):
        np.testing.assert_array_equal(got, want)


FAULTS = {2: np.nan, 4: np.inf, 6: 1.5, 7: -0.5}  # step t -> the faulty β_t returned
THETAS_1_TO_9 = jnp.arange(1.0, 10.0, dtype=jnp.float32)[:, None]


def _faulty_schedule(t: jax.Array) -> jax.Array:
    beta = jnp.float32(0.5)
    for step, bad in FAULTS.items():
        beta = jnp.where(t == step, jnp.float32(bad), beta)
    return beta


def _run(tx: ema_jax.EmaTransform, seq: jax.Array, init: jax.Array | None = None):
    """``tx.init(init or 0)``, then one jitted ``tx.update`` per row of ``seq``: the shadows
    (as a NumPy array) and the final state."""
    outs, state = scan_updates(tx, jnp.zeros_like(seq[0]) if init is None else init, seq)
    return np.asarray(outs), state


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_a_faulty_decay_is_skipped_and_counted(skip_nonfinite):
    """A schedule returning NaN, Inf, 1.5 or -0.5 at some steps skips those updates (each
    counted in ``num_skipped``) whatever ``skip_nonfinite`` is; the other steps average as
    if the faulty ones never happened."""
    thetas = np.arange(1.0, 10.0)
    good = [i for i in range(9) if i + 1 not in FAULTS]
    ref = np_plain_ema(np.zeros(1), thetas[good, None], [0.5] * len(good))[:, 0]
    tx = ema_jax.ema(_faulty_schedule, skip_nonfinite=skip_nonfinite)
    outs, state = _run(tx, THETAS_1_TO_9)
    np.testing.assert_allclose(outs[good, 0], ref, rtol=1e-6)
    for t in FAULTS:  # unchanged by the faulty step
        assert outs[t - 1, 0] == outs[t - 2, 0]
    assert int(state.num_skipped) == len(FAULTS) and int(state.count) == 9


def test_a_faulty_decay_keeps_a_debiased_average_in_the_convex_hull():
    """Debiased, with faulty decays at some steps: the weight stays in (0, 1], the first
    update copies θ_1 and the shadow stays in the convex hull of the params seen."""
    outs, state = _run(ema_jax.ema(_faulty_schedule, debias=True), THETAS_1_TO_9)
    assert 0.0 < float(state.weight) <= 1.0 and outs[0, 0] == 1.0
    assert np.all((outs >= 1.0) & (outs <= 9.0)) and int(state.num_skipped) == len(FAULTS)


def test_count_saturates_and_averaging_goes_on():
    """From ``count = 2^31 - 3`` five more updates: the count stops at 2^31 - 1 (never
    wraps), and the shadow keeps averaging (not the raw params)."""
    tx = ema_jax.ema(0.5, skip_nonfinite=False)
    state = tx.init(jnp.zeros(1)).replace(count=jnp.int32(2**31 - 3))
    shadows = []
    step = jax.jit(tx.update)
    for theta in jnp.arange(1.0, 6.0, dtype=jnp.float32)[:, None]:
        out, state = step(theta, state)
        shadows.append(float(out[0]))
    assert int(state.count) == 2**31 - 1
    ref = np_plain_ema(np.zeros(1), np.arange(1.0, 6.0)[:, None], [0.5] * 5)[:, 0]
    np.testing.assert_allclose(shadows, ref, rtol=1e-6)


# ------------------------------------------------------------ update_every and start_step


def test_update_every_equals_subsampled_loop_with_beta_to_the_k():
    """``update_every=k`` equals a float64 loop over every k-th step with β^k;
    the steps in between leave the shadow unchanged."""
    k, beta, n = 4, 0.9, 40
    thetas = jnp.asarray(THETAS[: n + 1, :8], jnp.float32)
    outs = np.asarray(scan_updates(ema_jax.ema(beta, update_every=k), thetas[0], thetas[1:])[0])
    theta64 = np.asarray(thetas, np.float64)
    sub = np_plain_ema(theta64[0], theta64[k::k], [f32(beta) ** k] * (n // k))
    for t in range(1, n + 1):
        expected = theta64[0] if t < k else sub[t // k - 1]
        np.testing.assert_allclose(outs[t - 1], expected, rtol=1e-5, atol=1e-6)


def test_update_every_keeps_the_horizon_in_optimizer_steps():
    """On a ramp θ_t = t the plain EMA lags by its mean age, β/(1-β) = 99 steps for
    β = 0.99. With ``update_every=4`` (β^4 per update) the lag stays ≈ 4·β⁴/(1-β⁴) = 97.5
    steps — within 3% of 99 — whereas reusing β per update would lag 4·99 = 396 steps."""
    beta, n = 0.99, 3000
    ramp = jnp.arange(n + 1, dtype=jnp.float32)[:, None]
    lag = {}
    for k in (1, 4):
        outs = scan_updates(ema_jax.ema(beta, update_every=k), ramp[0], ramp[1:])[0]
        lag[k] = n - float(outs[-1, 0])  # n is a multiple of 4: the last step was applied
    b = f32(beta)
    assert lag[1] == pytest.approx(b / (1 - b), rel=1e-3)
    assert lag[4] == pytest.approx(4 * b**4 / (1 - b**4), rel=1e-3)
    assert lag[4] == pytest.approx(lag[1], rel=0.03)


@pytest.mark.parametrize("debias", [False, True])
def test_start_step_copies_then_averages(debias):
    """``start_step=s`` copies θ_t for t ≤ s, then averages from θ_s on (the copy
    has full weight, so plain and debiased agree)."""
    s, beta, n = 5, 0.8, 20
    thetas = jnp.asarray(THETAS[: n + 1, :8], jnp.float32)
    tx = ema_jax.ema(beta, debias=debias, start_step=s)
    outs = np.asarray(scan_updates(tx, thetas[0], thetas[1:])[0])
    theta64 = np.asarray(thetas, np.float64)
    np.testing.assert_array_equal(outs[:s], np.asarray(thetas[1 : s + 1]))
    ref = np_plain_ema(theta64[s], theta64[s + 1 :], [f32(beta)] * (n - s))
    np.testing.assert_allclose(outs[s:], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("debias", [False, True])
def test_start_step_with_update_every_matches_float64_loop(debias):
    """``start_step=4, update_every=3``: θ_t is copied for t ≤ 4 (every step, due or not);
    afterwards only t = 6, 9, … update: t = 6 with β² (it stands for steps 5 and 6, the
    steps since the copy at 4), later ones with β³ (float64 loop, float32 β)."""
    s, k, beta, n = 4, 3, 0.8, 20
    thetas = jnp.asarray(THETAS[: n + 1, :8], jnp.float32)
    tx = ema_jax.ema(beta, debias=debias, start_step=s, update_every=k)
    outs = np.asarray(scan_updates(tx, thetas[0], thetas[1:])[0])
    theta64 = np.asarray(thetas, np.float64)
    ema, want, last = theta64[0], [], 0
    for t in range(1, n + 1):
        if t <= s:
            ema, last = theta64[t], t
        elif t % k == 0:
            b = f32(f32(beta) ** (t - last))
            ema, last = b * ema + (1 - b) * theta64[t], t
        want.append(ema)
    np.testing.assert_array_equal(outs[:s], np.asarray(thetas[1 : s + 1]))
    np.testing.assert_allclose(outs, np.stack(want), rtol=1e-5, atol=1e-6)


def test_debiased_schedule_at_one_before_any_weight_keeps_the_copy():
    """A schedule that returns β = 1 before anything was averaged (debiased weight 0) must
    not divide 0 by 0: the shadow keeps the initial copy until β < 1, then restarts from θ."""

    def schedule(t):
        return jnp.where(t < 3, 1.0, 0.5).astype(schedules.default_float())

    tx = ema_jax.ema(schedule, debias=True)
    thetas = jnp.asarray([[1.0], [2.0], [3.0], [5.0], [8.0]])
    outs = np.asarray(scan_updates(tx, thetas[0], thetas[1:])[0])
    # t = 1, 2: w stays 0, copy kept; t = 3: w = 0.5, α = 1 (θ_3); t = 4: w = 0.75, α = 2/3
    np.testing.assert_allclose(outs[:, 0], [1.0, 1.0, 5.0, 5.0 + 2.0 / 3.0 * 3.0], rtol=1e-6)


def test_a_debiased_first_update_copies_exactly_even_from_inf():
    """Debias's first update gives the params exactly, even when the average held Inf
    (0·Inf = NaN)."""
    seq = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.float32)
    init = jnp.asarray([jnp.inf, 0.0], jnp.float32)
    outs, _ = _run(ema_jax.ema(0.9, debias=True, skip_nonfinite=False), seq, init)
    np.testing.assert_array_equal(outs[0], [1.0, 2.0])


@pytest.mark.parametrize(
    "kwargs", [{"decay": 0.0}, {"decay": 0.9, "start_step": 2}], ids=["decay 0", "start_step"]
)
def test_a_copying_update_gives_the_params_exactly_even_from_nan(kwargs):
    """An update that copies (``decay=0``, the ``start_step`` phase) gives the params
    exactly, even when the average holds NaN."""
    with_nan = jnp.asarray([[np.nan, 1.0], [3.0, 4.0]], jnp.float32)
    outs, _ = _run(ema_jax.ema(**kwargs, skip_nonfinite=False), with_nan)
    np.testing.assert_array_equal(outs[1], [3.0, 4.0])


# ------------------------------------------------------------------- multi-decay, lightly


def test_multi_decay_equals_separate_runs():
    """Several decays in one pass equal the single-decay runs (plain and debiased mixed)."""
    thetas = jnp.asarray(THETAS[:31, :8], jnp.float32)
    outs = scan_updates(ema_jax.ema((0.9, 0.99), debias=(False, True)), thetas[0], thetas[1:])[0]
    assert isinstance(outs, tuple) and len(outs) == 2
    single = [
        scan_updates(ema_jax.ema(0.9), thetas[0], thetas[1:])[0],
        scan_updates(ema_jax.ema(0.99, debias=True), thetas[0], thetas[1:])[0],
    ]
    for got, want in zip(outs, single, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------- misuse


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"decay": 1.0}, ValueError, "decay"),
        ({"decay": -0.1}, ValueError, "decay"),
        ({"decay": 1.5}, ValueError, "decay"),
        ({"decay": float("nan")}, ValueError, "decay"),
        ({"decay": True}, TypeError, "decay"),
        ({"decay": "0.9"}, TypeError, "decay"),
        ({"decay": ()}, ValueError, "decay"),
        ({"decay": np.bool_(True)}, TypeError, "decay"),
        ({"decay": np.array([0.9, 0.99])}, TypeError, "decay"),
        ({"decay": np.float32(1.0)}, ValueError, "decay"),
        ({"decay": (0.9, 1.2)}, ValueError, "decay[1]"),
        ({"decay": 0.9, "update_every": 0}, ValueError, "update_every"),
        ({"decay": 0.9, "update_every": 1.5}, TypeError, "update_every"),
        ({"decay": 0.9, "update_every": True}, TypeError, "update_every"),
        ({"decay": 0.9, "start_step": -1}, ValueError, "start_step"),
        ({"decay": 0.9, "start_step": 2.0}, TypeError, "start_step"),
        ({"decay": 0.9, "accumulator_dtype": jnp.int32}, TypeError, "accumulator_dtype"),
        ({"decay": 0.9, "accumulator_dtype": jnp.bool_}, TypeError, "accumulator_dtype"),
        ({"decay": 0.9, "accumulator_dtype": "nope"}, TypeError, "accumulator_dtype"),
        ({"decay": 0.9, "debias": 1}, ValueError, "debias"),
        ({"decay": (0.9, 0.99), "debias": (True,)}, ValueError, "debias"),
        ({"decay": 0.9, "debias": (True,)}, ValueError, "debias"),
        ({"decay": 0.9, "skip_nonfinite": None}, TypeError, "skip_nonfinite"),
        ({"decay": 0.9, "skip_nonfinite": 1}, TypeError, "skip_nonfinite"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, error, names):
    """Each bad setting raises at construction, naming the argument."""
    kwargs = dict(kwargs)
    decay = kwargs.pop("decay")
    with pytest.raises(error) as info:
        ema_jax.ema(decay, **kwargs)
    assert names in str(info.value)


@pytest.mark.parametrize(
    "decay", [np.float32(0.9), np.float64(0.9), jnp.float32(0.9), jnp.asarray(0.9)]
)
def test_numpy_and_jax_scalar_decays_are_accepted(decay):
    """A decay given as a NumPy or 0-d JAX float is a number in [0, 1) and is accepted
    (single and in a tuple), with the float32 value of 0.9."""
    for tx in (ema_jax.ema(decay), ema_jax.ema((decay, 0.5))):
        out, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
        first = out[0] if isinstance(out, tuple) else out
        np.testing.assert_allclose(first, 1 - f32(0.9), rtol=1e-6)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"a": jnp.zeros(3), "b": {"c": jnp.zeros((2, 3))}},
            r"\['b'\]\['c'\].*\(2, 3\).*\(2, 2\)",
        ),
        ({"a": jnp.zeros(3), "b": {"d": jnp.zeros((2, 2))}}, r"\['b'\]\['d'\]"),
        (
            {"a": jnp.zeros(3), "b": {"c": jnp.zeros((2, 2))}, "e": jnp.zeros(1)},
            r"params\['e'\] is in the params but not in the EMA state",
        ),
        ({"a": jnp.zeros(3)}, r"params\['b'\]\['c'\] is in the EMA state but not in the params"),
    ],
    ids=["other shape", "other key", "extra leaf", "missing leaf"],
)
def test_update_with_other_tree_names_the_path(params, match):
    """A params tree of another structure or a leaf of another shape is rejected,
    and the message names the tree path."""
    tx = ema_jax.ema(0.9)
    state = tx.init({"a": jnp.zeros(3), "b": {"c": jnp.zeros((2, 2))}})
    with pytest.raises(ValueError, match=match):
        tx.update(params, state)


def test_init_with_a_non_array_leaf_names_the_path():
    """``init`` refuses a leaf that is not an array (a Python float), naming its path."""
    with pytest.raises(TypeError, match=r"params\['x'\] must be an array"):
        ema_jax.ema(0.9).init({"x": 1.0})


def test_chained_as_an_optax_transform_fails_loudly():
    """An EmaTransform averages params: inside optax.chain it would turn the shadow into
    "updates" (w = 1, gradient 2, sgd(1) then ema(0.9) moved w to 1.7 instead of -1). The
    first update raises, saying why, before any wrong step can be applied."""
    tx = ema_jax.ema(0.9)
    assert not isinstance(tx, optax.GradientTransformation)
    chained = optax.chain(optax.sgd(1.0), tx)
    params = {"w": jnp.ones(())}
    with pytest.raises(TypeError, match="averages params, not updates"):
        chained.update({"w": jnp.full((), 2.0)}, chained.init(params), params)
    with pytest.raises(TypeError, match="cannot unpack non-iterable EmaTransform"):
        _init, _update = tx  # type: ignore[misc]


def test_used_as_an_optimizer_fails_loudly():
    """flax's TrainState(tx=ema) calls tx.update(grads, opt_state, params): refused."""
    from flax.training import train_state

    params = {"w": jnp.ones(())}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=ema_jax.ema(0.9))
    with pytest.raises(TypeError, match="averages params, not updates"):
        state.apply_gradients(grads={"w": jnp.full((), 2.0)})


@pytest.mark.parametrize(
    ("init_dtype", "update_dtype"),
    [(jnp.float32, jnp.int32), (jnp.float32, jnp.complex64), (jnp.int32, jnp.float32)],
)
def test_params_of_another_dtype_kind_are_refused(init_dtype, update_dtype):
    """Params of another dtype kind than at ``init`` (int into a float state, complex into
    a float state, float into an int state) raise, naming the path."""
    tx = ema_jax.ema(0.9)
    state = tx.init({"a": jnp.zeros(3), "b": jnp.zeros(2, init_dtype)})
    with pytest.raises(ValueError, match=r"params\['b'\] has dtype .* in the params"):
        tx.update({"a": jnp.zeros(3), "b": jnp.ones(2, update_dtype)}, state)


def test_params_of_another_float_width_are_averaged():
    """A float of another width (bf16 into an fp32 state) is averaged, not refused."""
    tx = ema_jax.ema(0.9)
    state = tx.init({"a": jnp.zeros(3)})
    out, _ = jax.jit(tx.update)({"a": jnp.ones(3, jnp.bfloat16)}, state)
    np.testing.assert_allclose(out["a"], 0.1, rtol=1e-6)


SCALAR_STATE = ema_jax.ema(0.9).init({"a": jnp.float32(0.0)})


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: ema_jax.ema(0.9).update({"a": 1.0}, SCALAR_STATE),
            TypeError,
            r"params\['a'\] must be an array.*got float",
        ),
        (
            lambda: ema_jax.ema(0.9).update({"a": jnp.float32(0.0)}, None),
            TypeError,
            "state must be the EmaState",
        ),
        (
            lambda: ema_jax.ema((0.9, 0.99)).update({"a": jnp.float32(0.0)}, SCALAR_STATE),
            ValueError,
            "holds one average but this transform keeps 2",
        ),
        (
            lambda: ema_jax.ema(0.9, start_step=2**31),
            ValueError,
            r"start_step must be in \[0, 2147483646\]",
        ),
        (
            lambda: ema_jax.ema(0.9, update_every=2**31),
            ValueError,
            r"update_every must be in \[1, 2147483647\]",
        ),
    ],
    ids=["non-array leaf", "no state", "state with another number of averages", "start_step",
         "update_every"],
)  # fmt: skip
def test_misuse_raises_naming_the_argument(call, error, match):
    """Each misuse of the rule raises a clear error naming the argument or path."""
    with pytest.raises(error, match=match):
        call()


def test_update_needs_the_state_from_init():
    tx = ema_jax.ema(0.9)
    with pytest.raises(TypeError, match="state must be the EmaState returned by init"):
        tx.update(jnp.ones(2), None)


def test_equal_settings_make_equal_transforms():
    """Constant decays are kept as numbers, so two transforms built alike are equal and hash
    alike: a state restored into a target built afresh reuses the compiled step."""
    assert ema_jax.ema(0.999, debias=True) == ema_jax.ema(0.999, debias=True)
    assert hash(ema_jax.ema((0.9, 0.99))) == hash(ema_jax.ema((0.9, 0.99)))
    assert ema_jax.ema(0.999) != ema_jax.ema(0.99)


def test_num_averages_counts_one_for_a_single_decay():
    """``num_averages`` is K, an int: 1 for a single decay, on the rule and on its state;
    ``shadows`` then gives a 1-tuple holding the one shadow."""
    single, multi = ema_jax.ema(0.9), ema_jax.ema((0.9, 0.99))
    assert single.num_averages == 1 and multi.num_averages == 2
    state = single.init({"w": jnp.arange(2.0)})
    assert ema_jax.num_averages(state) == 1
    assert ema_jax.num_averages(multi.init({"w": jnp.arange(2.0)})) == 2
    (only,) = ema_jax.shadows(state)
    np.testing.assert_array_equal(only["w"], ema_jax.shadow(state)["w"])


def test_import_is_light():
    """`import ema_jax` loads neither Orbax nor tensorstore; `ema_jax.checkpoint` does."""
    import subprocess
    import sys

    code = (
        "import sys, ema_jax; heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} "
        "& {'orbax', 'tensorstore'}); print(heavy()); ema_jax.checkpoint.save; print(heavy())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split("\n")
    assert out[:2] == ["[]", "['orbax', 'tensorstore']"]
