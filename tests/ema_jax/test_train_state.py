"""``EmaTrainState``: fresh EMA buffers, ``apply_gradients`` = optimizer step then EMA of the
new params, dtypes, the number of averages and ``ema_index`` checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    host_copy,
    linear_params,
    mse_loss,
    np_sgd_ema_switch,
    regression_batches,
    tree_allclose,
)

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


# Switch EMA: ``switch`` puts the shadow into ``params``, everything else as it was.

SWITCH_BATCHES = regression_batches(seed=5, num=6, batch_size=8)


def _trained(params=None, *, decay=0.5, tx=None, steps=3, **kwargs):
    """A state after ``steps`` SGD (or ``tx``) steps, so params, shadow and opt_state differ."""
    params = linear_params(jax.random.key(6)) if params is None else params
    state = ema_jax.EmaTrainState.create(
        apply_fn=None,
        params=params,
        tx=optax.adam(0.1) if tx is None else tx,
        ema=ema_jax.ema(decay),
        **kwargs,
    )
    for batch in SWITCH_BATCHES[:steps]:
        state = state.apply_gradients(grads=jax.grad(mse_loss)(state.params, batch))
    return state


SWITCHES = {
    "eager": lambda s: s.switch(),
    "jit": jax.jit(lambda s: s.switch()),
    "jit donating the state": jax.jit(lambda s: s.switch(), donate_argnums=0),
}


@pytest.mark.parametrize("switch", SWITCHES.values(), ids=SWITCHES)
def test_switch_makes_the_shadow_the_params_and_keeps_optimizer_and_ema_state(switch):
    """After ``switch``: params are the shadow bit for bit, in fresh buffers (not the fp32
    accumulators); ``opt_state``, ``ema_state`` and ``step`` are bitwise those before; the
    next step is the optimizer's from the shadow with the old ``opt_state``, then the EMA's
    from its unchanged state."""
    state = _trained()
    before = host_copy(state)
    shadow = host_copy(state.ema_params)
    assert not np.array_equal(before.params["w"], shadow["w"])  # a switch that changes
    switched = switch(state)
    chex.assert_trees_all_equal(host_copy(switched.params), shadow)
    chex.assert_trees_all_equal(host_copy(switched.opt_state), before.opt_state)
    chex.assert_trees_all_equal(host_copy(switched.ema_state), before.ema_state)
    assert int(switched.step) == int(before.step)
    for p, a in zip(
        jax.tree.leaves(switched.params), jax.tree.leaves(switched.ema_state.ema), strict=True
    ):
        assert p.unsafe_buffer_pointer() != a.unsafe_buffer_pointer()

    @jax.jit
    def continued(params, opt_state, ema_state, grads):  # optimizer, then EMA, by hand
        updates, opt_state = switched.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, switched.ema.update(params, ema_state)[1]

    grads = jax.grad(mse_loss)(shadow, SWITCH_BATCHES[3])
    want_params, want_opt, want_ema = continued(shadow, before.opt_state, before.ema_state, grads)
    # Donated, as a train step donates it: a params buffer shared with the accumulators
    # would be donated twice, which XLA refuses.
    after = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)(switched, grads)
    chex.assert_trees_all_equal(host_copy(after.params), host_copy(want_params))
    chex.assert_trees_all_equal(host_copy(after.opt_state), host_copy(want_opt))
    chex.assert_trees_all_equal(host_copy(after.ema_state), host_copy(want_ema))


def test_switching_at_epoch_ends_matches_a_float64_reference():
    """Three epochs of SGD + EMA on a linear model, switched at the end of epochs 0 and 2,
    match a NumPy float64 loop doing the same by hand (and not one that never switches)."""
    params = linear_params(jax.random.key(7))
    epochs = [SWITCH_BATCHES[:2], SWITCH_BATCHES[2:4], SWITCH_BATCHES[4:]]
    want_params, want_ema = np_sgd_ema_switch(host_copy(params), epochs, 0.1, 0.6, {0, 2})
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.1), ema=ema_jax.ema(0.6)
    )
    step = jax.jit(lambda s, b: s.apply_gradients(grads=jax.grad(mse_loss)(s.params, b)))
    for epoch, batches in enumerate(epochs):
        for batch in batches:
            state = step(state, batch)
        if epoch in (0, 2):
            state = state.switch()
    tree_allclose(state.params, want_params, rtol=1e-5, atol=1e-6)
    tree_allclose(state.ema_params, want_ema, rtol=1e-5, atol=1e-6)
    unswitched, _ = np_sgd_ema_switch(host_copy(params), epochs, 0.1, 0.6, {2})
    assert not np.allclose(np.asarray(state.params["w"]), unswitched["w"], rtol=1e-3)


def test_switch_casts_fp32_accumulators_to_bf16_params():
    """bf16 params get the fp32 average cast to bf16 (bitwise); the accumulators stay fp32
    and unchanged."""
    state = _trained(linear_params(jax.random.key(8), dtype=jnp.bfloat16), tx=optax.sgd(0.1))
    accumulators = host_copy(state.ema_state.ema)
    switched = jax.jit(lambda s: s.switch())(state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(switched.params))
    want = jax.tree.map(lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16)), accumulators)
    chex.assert_trees_all_equal(host_copy(switched.params), want)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(switched.ema_state.ema))
    chex.assert_trees_all_equal(host_copy(switched.ema_state.ema), accumulators)


def test_switch_picks_one_of_k_averages_by_ema_index():
    """With K decays ``switch(i)`` takes average i's shadow; ``None`` is the first."""
    state = _trained(decay=(0.5, 0.9))
    fast, slow = host_copy(state.ema_params)
    assert not np.array_equal(fast["w"], slow["w"])
    chex.assert_trees_all_equal(host_copy(state.switch().params), fast)
    chex.assert_trees_all_equal(host_copy(state.switch(0).params), fast)
    chex.assert_trees_all_equal(host_copy(state.switch(1).params), slow)


def test_switch_takes_the_averaged_model_state_only_when_it_is_averaged():
    """``average_model_state=True``: the averaged ``model_state`` is switched in too;
    otherwise ``model_state`` is kept as it is."""
    params = linear_params(jax.random.key(9))
    for averaged in (True, False):
        state = ema_jax.EmaTrainState.create(
            apply_fn=None,
            params=params,
            tx=optax.sgd(0.1),
            ema=ema_jax.ema(0.5),
            model_state={"mean": jnp.zeros(2)},
            average_model_state=averaged,
        )
        grads = jax.tree.map(jnp.ones_like, params)
        state = state.apply_gradients(grads=grads, model_state={"mean": jnp.ones(2)})
        switched = state.switch()
        want = 0.5 if averaged else 1.0  # the EMA of 0 -> 1 with β = 0.5, or the raw state
        np.testing.assert_array_equal(switched.model_state["mean"], np.full(2, want))
        chex.assert_trees_all_equal(host_copy(switched.params), host_copy(state.ema_params))


def test_a_jitted_switch_and_train_step_compile_once():
    """Switched states keep the params' dtypes and tree: alternating a donated train step
    and a donated switch compiles each once."""
    state = _trained(linear_params(jax.random.key(10), dtype=jnp.bfloat16), steps=0)
    train_step = ema_jax.make_train_step(mse_loss)
    switch = jax.jit(lambda s: s.switch(), donate_argnums=0)
    for batch in SWITCH_BATCHES:
        state, _ = train_step(state, batch)
        state = switch(state)
    assert train_step._cache_size() == 1
    assert switch._cache_size() == 1


@pytest.mark.parametrize(
    ("decay", "index"), [(0.9, 1), (0.9, True), ((0.9, 0.99), 2), ((0.9, 0.99), -1)]
)
def test_switch_refuses_an_ema_index_that_is_no_average(decay, index):
    """An ``ema_index`` that names no average raises a ValueError naming it."""
    state = _trained(decay=decay, steps=0)
    with pytest.raises(ValueError, match="ema_index"):
        state.switch(index)
