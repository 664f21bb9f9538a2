"""``EmaTrainState``: fresh EMA buffers, ``apply_gradients`` = optimizer step then EMA of the
new params, dtypes, the number of averages and ``ema_index`` checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import linear_params, mse_loss, regression_batches, tree_allclose

import ema_jax
from ema_jax import schedules

BATCH = regression_batches(seed=1, num=1, batch_size=16)[0]


def _state(params=None, *, decay=0.5, **kwargs):
    params = linear_params(jax.random.key(0)) if params is None else params
    return ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.1), ema=ema_jax.ema(decay), **kwargs
    )


def test_create_copies_params_into_fresh_buffers():
    """The EMA starts as a copy of params in its own buffers (no aliasing), so the
    whole state can be donated."""
    state = _state()
    for p, e in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(state.ema_state.ema), strict=True
    ):
        np.testing.assert_array_equal(p, e)
        assert p.unsafe_buffer_pointer() != e.unsafe_buffer_pointer()
    tree_allclose(state.ema_params, state.params, rtol=0, atol=0)
    # Donating the freshly created state works (XLA rejects a buffer donated twice).
    donated = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0)(state)
    assert int(donated.step) == 1
    assert all(x.is_deleted() for x in jax.tree.leaves(state.ema_state.ema))


def test_apply_gradients_is_optimizer_step_then_ema_of_new_params():
    """``apply_gradients`` = optax update, then ``ema.update`` with the NEW params."""
    tx, ema = optax.adam(0.1), ema_jax.ema(0.5)
    params = linear_params(jax.random.key(1))
    state = ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=tx, ema=ema)
    grads = jax.grad(mse_loss)(params, BATCH)
    new = state.apply_gradients(grads=grads)

    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = optax.apply_updates(params, updates)
    want, _ = ema.update(new_params, ema.init(params))
    tree_allclose(new.params, new_params, rtol=1e-6)
    tree_allclose(new.ema_params, want, rtol=1e-6)
    stale, _ = ema.update(params, ema.init(params))  # the wrong order would give this
    assert not np.allclose(new.ema_params["w"], stale["w"])
    assert int(new.step) == 1 and int(new.ema_state.count) == 1


def test_ema_params_have_the_params_tree_and_dtypes():
    """bf16 params keep fp32 accumulators, and ``ema_params`` is bf16 again."""
    params = linear_params(jax.random.key(2), dtype=jnp.bfloat16)
    state = _state(params)
    assert jax.tree.structure(state.ema_params) == jax.tree.structure(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema_state.ema))
    grads = jax.tree.map(jnp.ones_like, params)
    state = state.apply_gradients(grads=grads)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.ema_params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema_state.ema))
    assert jax.tree.structure(state.ema_params) == jax.tree.structure(params)


def test_select_params_and_multi_decay():
    """``select_params`` picks raw or shadow params; with K decays ``ema_params`` is a
    K-tuple and ``ema_index`` picks one."""
    params = linear_params(jax.random.key(3))
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(1.0), ema=ema_jax.ema((0.5, 0.9))
    )
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
    assert state.num_averages == 2
    assert state.select_params(False) is state.params
    fast, slow = state.ema_params
    # After one step of -1 on every coordinate: ema_k = θ_0 - (1 - β_k).
    np.testing.assert_allclose(fast["b"], params["b"] - 0.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(slow["b"], params["b"] - 0.1, rtol=1e-6, atol=1e-6)
    tree_allclose(state.select_params(True), fast, rtol=0, atol=0)  # default: the first
    tree_allclose(state.select_params(True, 1), slow, rtol=0, atol=0)
    assert _state().num_averages == 1


@pytest.mark.parametrize(
    ("decay", "index"), [(0.9, 1), (0.9, -1), ((0.9, 0.99), 2), ((0.9, 0.99), -1)]
)
def test_ema_index_out_of_range(decay, index):
    """An out-of-range ``ema_index`` raises a ValueError naming it."""
    params = linear_params(jax.random.key(4))
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(1.0), ema=ema_jax.ema(decay)
    )
    with pytest.raises(ValueError, match="ema_index"):
        state.select_params(True, index)


def test_average_model_state_needs_a_model_state():
    """``average_model_state=True`` without a ``model_state`` is rejected."""
    with pytest.raises(ValueError, match="average_model_state"):
        _state(average_model_state=True)


def test_create_refuses_an_optax_ema():
    """optax.ema averages updates; EmaTrainState needs an ema_jax.EmaTransform, and says so
    at create (it used to train and fail later, in .ema_params)."""
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"ema must be an ema_jax\.EmaTransform.*optax\.ema"):
        ema_jax.EmaTrainState.create(
            apply_fn=None, params=params, tx=optax.sgd(0.1), ema=optax.ema(0.9)
        )


def test_a_rebuilt_state_with_an_equal_schedule_reuses_the_compiled_step():
    """The transform is a static field of the state: rebuilt from equal schedules it is
    equal, so the jitted step is traced (and compiled) once, not once per rebuild. A
    different schedule does retrace (so the count is not vacuous)."""
    traces = []
    tx = optax.sgd(0.1)

    @jax.jit
    def step(state, grads):
        traces.append(None)
        return state.apply_gradients(grads=grads)

    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.ones(3)}
    for _ in range(3):  # e.g. a restore into a target built afresh
        ema = ema_jax.ema(
            (schedules.power_function(sigma_rel=0.1), schedules.constant(0.9)), update_every=2
        )
        step(ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=tx, ema=ema), grads)
    assert len(traces) == 1
    other = ema_jax.ema(
        (schedules.power_function(sigma_rel=0.2), schedules.constant(0.9)), update_every=2
    )
    step(ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=tx, ema=other), grads)
    assert len(traces) == 2
