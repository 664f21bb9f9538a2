"""Issue 17: the faults an adversarial probe found, one test per item (``test_item_<n>_...``).

Each test fails on the code before the fix (base 856731b). References are closed forms or
float64 loops written here, independent of ema_jax. docs/guarantees.md lists what each
test guarantees.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import np_plain_ema

import ema_jax
from ema_jax import schedules

OPT = optax.sgd(0.1)
PARAMS_1_TO_5 = jnp.arange(1.0, 6.0, dtype=jnp.float32)[:, None]  # θ_1..θ_5, one element


def _run(tx: ema_jax.EmaTransform, seq: jax.Array, init: jax.Array | None = None):
    """``tx.init(init or 0)``, then one jitted ``tx.update`` per row of ``seq``: the shadows
    and the final state."""
    state = tx.init(jnp.zeros_like(seq[0]) if init is None else init)

    def body(state, params):
        out, state = tx.update(params, state)
        return state, out

    state, outs = jax.jit(lambda s, q: jax.lax.scan(body, s, q))(state, seq)
    return np.asarray(outs), state


# ------------------------------------------------------------ run-time numerics (1-7)


FAULTS = {2: np.nan, 4: np.inf, 6: 1.5, 7: -0.5}  # step t -> the faulty β_t returned
THETAS_1_TO_9 = jnp.arange(1.0, 10.0, dtype=jnp.float32)[:, None]


def _faulty_schedule(t: jax.Array) -> jax.Array:
    beta = jnp.float32(0.5)
    for step, bad in FAULTS.items():
        beta = jnp.where(t == step, jnp.float32(bad), beta)
    return beta


def test_item_1_2_faulty_decay_is_skipped_and_counted():
    """Items 1, 2: a schedule returning NaN, Inf, 1.5 or -0.5 at some steps skips those
    updates (each counted in ``num_skipped``) whatever ``skip_nonfinite`` is; the other
    steps average as if the faulty ones never happened, and the shadow stays in the convex
    hull of the params seen. Debiased, the weight stays in (0, 1]."""
    thetas = np.arange(1.0, 10.0)
    good = [i for i in range(9) if i + 1 not in FAULTS]
    ref = np_plain_ema(np.zeros(1), thetas[good, None], [0.5] * len(good))[:, 0]
    for guard in (False, True):
        tx = ema_jax.ema(_faulty_schedule, skip_nonfinite=guard)
        outs, state = _run(tx, THETAS_1_TO_9)
        np.testing.assert_allclose(outs[good, 0], ref, rtol=1e-6)
        for t in FAULTS:  # unchanged by the faulty step
            assert outs[t - 1, 0] == outs[t - 2, 0]
        assert int(state.num_skipped) == len(FAULTS) and int(state.count) == 9
    outs, state = _run(ema_jax.ema(_faulty_schedule, debias=True), THETAS_1_TO_9)
    assert 0.0 < float(state.weight) <= 1.0 and outs[0, 0] == 1.0
    assert np.all((outs >= 1.0) & (outs <= 9.0)) and int(state.num_skipped) == len(FAULTS)


def test_item_3_count_saturates_and_averaging_goes_on():
    """Item 3: from ``count = 2^31 - 3`` five more updates: the count stops at 2^31 - 1
    (never wraps), and the shadow keeps averaging (not the raw params)."""
    tx = ema_jax.ema(0.5, skip_nonfinite=False)
    state = tx.init(jnp.zeros(1)).replace(count=jnp.int32(2**31 - 3))
    shadows = []
    step = jax.jit(tx.update)
    for theta in PARAMS_1_TO_5:
        out, state = step(theta, state)
        shadows.append(float(out[0]))
    assert int(state.count) == 2**31 - 1
    ref = np_plain_ema(np.zeros(1), np.arange(1.0, 6.0)[:, None], [0.5] * 5)[:, 0]
    np.testing.assert_allclose(shadows, ref, rtol=1e-6)


def test_item_4_float32_too_long_decay_warns():
    """Item 4: a decay whose float32 rounding error passes 1e-3 (β > 1 - 2^-24/1e-3 ≈
    0.99994; measured table in docs/guarantees.md) warns at ``init`` / schedule
    construction; 0.9999 does not; float64 accumulators under x64 do not."""
    f32 = jnp.zeros(2, jnp.float32)
    with pytest.warns(UserWarning, match=r"decay=0.99999 in float32.*relative error"):
        ema_jax.ema(0.99999).init(f32)
    with pytest.warns(UserWarning, match=r"decay\[1\]=0.9999999 in float32"):
        ema_jax.ema((0.9, 0.9999999)).init(f32)
    with pytest.warns(UserWarning, match="max_decay=0.99999 in float32"):
        schedules.inverse_power(max_decay=0.99999)
    with pytest.warns(UserWarning, match="decay=0.99999 in float32"):
        schedules.tf_warmup(0.99999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema_jax.ema(0.9999).init(f32)
        schedules.constant(0.9999)
        with jax.enable_x64(True):
            ema_jax.ema(0.99999).init(jnp.zeros(2, jnp.float64))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_item_5_narrow_accumulator_warns(dtype):
    """Item 5: an accumulator narrower than float32 is kept as asked but warns (it stalls:
    bf16, β = 0.999, 5000 steps towards 1.0 from 0 gives 0.25, the exact 0.993)."""
    with pytest.warns(UserWarning, match=f"accumulator_dtype={jnp.dtype(dtype).name} is narrower"):
        tx = ema_jax.ema(0.999, accumulator_dtype=dtype)
    assert tx.init(jnp.zeros(1)).ema.dtype == dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema_jax.ema(0.999, accumulator_dtype=jnp.float32).init(jnp.zeros(1, jnp.bfloat16))


def test_item_6_copy_is_a_copy():
    """Item 6: an update that copies (debias's first update, ``decay=0``, the ``start_step``
    phase) gives the params exactly, even when the average holds Inf/NaN (0·Inf = NaN)."""
    seq = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.float32)
    init = jnp.asarray([jnp.inf, 0.0], jnp.float32)
    outs, _ = _run(ema_jax.ema(0.9, debias=True, skip_nonfinite=False), seq, init)
    np.testing.assert_array_equal(outs[0], [1.0, 2.0])
    with_nan = jnp.asarray([[np.nan, 1.0], [3.0, 4.0]], jnp.float32)
    for tx in (
        ema_jax.ema(0.0, skip_nonfinite=False),
        ema_jax.ema(0.9, start_step=2, skip_nonfinite=False),
    ):
        outs, _ = _run(tx, with_nan)
        np.testing.assert_array_equal(outs[1], [3.0, 4.0])


def test_item_7_schedules_rounding_to_one_are_refused():
    """Item 7: every schedule with a decay argument refuses one that rounds to 1.0 in
    float32 (as ``constant`` and ``half_life`` already did)."""
    with pytest.raises(ValueError, match=r"decay=0.999999999 .*rounds to 1.0 in float32"):
        schedules.tf_warmup(0.999999999)
    with pytest.raises(ValueError, match=r"max_decay=0.99999999 .*rounds to 1.0 in float32"):
        schedules.inverse_power(max_decay=0.99999999)


# ------------------------------------------------------------------------ misuse (8-11)


def test_item_8_dtype_kind_change_is_refused():
    """Item 8: params of another dtype kind than at ``init`` (int into a float state,
    complex into a float state, float into an int state) raise, naming the path; a float
    of another width (bf16 into an fp32 state) is still averaged."""
    tx = ema_jax.ema(0.9)
    kinds = [(jnp.float32, jnp.int32), (jnp.float32, jnp.complex64), (jnp.int32, jnp.float32)]
    for init_dtype, update_dtype in kinds:
        state = tx.init({"a": jnp.zeros(3), "b": jnp.zeros(2, init_dtype)})
        with pytest.raises(ValueError, match=r"params\['b'\] has dtype .* in the params"):
            tx.update({"a": jnp.zeros(3), "b": jnp.ones(2, update_dtype)}, state)
    state = tx.init({"a": jnp.zeros(3)})
    out, _ = jax.jit(tx.update)({"a": jnp.ones(3, jnp.bfloat16)}, state)
    np.testing.assert_allclose(out["a"], 0.1, rtol=1e-6)


def test_item_9_obscure_errors_name_the_argument():
    """Item 9: each misuse raises a clear error naming the argument or path."""
    tx, multi = ema_jax.ema(0.9), ema_jax.ema((0.9, 0.99))
    state = tx.init({"a": jnp.float32(0.0)})
    with pytest.raises(TypeError, match=r"params\['a'\] must be an array.*got float"):
        tx.update({"a": 1.0}, state)
    with pytest.raises(TypeError, match="state must be the EmaState"):
        tx.update({"a": jnp.float32(0.0)}, None)
    with pytest.raises(ValueError, match="holds one average but this transform keeps 2"):
        multi.update({"a": jnp.float32(0.0)}, state)
    multi_state = multi.init({"a": jnp.arange(2.0)})
    np.testing.assert_array_equal(  # a concrete integer array is an index
        ema_jax.shadow(multi_state, jnp.int32(1))["a"], ema_jax.shadow(multi_state, 1)["a"]
    )
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 2147483646\]"):
        ema_jax.ema(0.9, start_step=2**31)
    train_state = ema_jax.EmaTrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=OPT, ema=tx
    )
    scalar_loss = ema_jax.make_train_step(lambda p, b: jnp.sum(p["w"] * b), has_aux=True)
    with pytest.raises(TypeError, match=r"has_aux=True, loss_fn must return a pair"):
        scalar_loss(train_state, jnp.ones(2))
    vector_metric = ema_jax.make_paired_eval_step(lambda p, b: p["w"] * b)
    with pytest.raises(ValueError, match=r"metric \['loss'\] of the \w+ params has shape \(2,\)"):
        ema_jax.evaluate_dataset(vector_metric, train_state, [jnp.ones((2,))])


def test_item_10_one_shot_generator_is_refused_before_training():
    """Item 10: a generator for several epochs is refused before the state is donated (the
    state passed in is still usable), for train_data and val_data."""
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=OPT, ema=ema_jax.ema(0.9)
    )

    def loss(p, b):
        return jnp.mean((p["w"] - b) ** 2)

    batches = [jnp.zeros((4, 2))]
    with pytest.raises(TypeError, match="train_data is a one-shot iterator"):
        ema_jax.train_with_ema(state, loss, (b for b in batches), batches, epochs=2)
    with pytest.raises(TypeError, match="val_data is a one-shot iterator"):
        ema_jax.train_with_ema(state, loss, batches, iter(batches), epochs=2)
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    history, _ = ema_jax.train_with_ema(state, loss, (b for b in batches), batches, epochs=1)
    assert len(history["val_loss"]) == 1


def test_item_11_zero_size_batches_are_skipped_or_refused():
    """Item 11: batches of size 0 weigh nothing (no NaN in the mean); only size-0 batches
    raise instead of returning NaN."""
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=OPT, ema=ema_jax.ema(0.9)
    )
    paired = ema_jax.make_paired_eval_step(lambda p, b: jnp.mean((p["w"] - b) ** 2))
    full, empty = jnp.zeros((4, 2)), jnp.zeros((0, 2))
    result = ema_jax.evaluate_dataset(paired, state, [full, empty])
    assert result["val_loss"] == 1.0 and result["val_loss_ema"] == 1.0
    with pytest.raises(ValueError, match="only batches of size 0"):
        ema_jax.evaluate_dataset(paired, state, [empty, empty])
