"""Gradient accumulation: the EMA advances once per real optimizer step (optax.MultiSteps),
in EmaTrainState by itself, in NNX and the functional API through ``optimizer_step``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ema_jax
import ema_jax.nnx
from ema_jax import schedules

K = 4  # micro-steps per optimizer step


def _micro_grads(steps: int = 2 * K):
    """Gradients whose means over each group of K are exact in float32 (small integers
    over a power of two), so accumulating them is bit-exact."""
    rng = np.random.default_rng(0)
    return [
        {"w": jnp.asarray(rng.integers(-8, 8, (3, 2)), jnp.float32), "b": jnp.full(2, i % K + 1.0)}
        for i in range(steps)
    ]


def _mean_grads(micro):
    return [jax.tree.map(lambda *g: sum(g) / K, *micro[i : i + K]) for i in range(0, len(micro), K)]


PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.ones(2)}
RULES = {
    "debiased": ema_jax.ema(0.9, debias=True),
    "two averages, schedule": ema_jax.ema((schedules.tf_warmup(0.99), 0.5), debias=(False, True)),
    "update_every and start_step": ema_jax.ema(0.8, update_every=2, start_step=1),
}


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("name", list(RULES))
def test_train_state_micro_steps_equal_real_steps_of_mean_gradients(name):
    """8 micro-steps of MultiSteps(k=4) give the params, the EMA state (count included)
    and the shadow of 2 real steps of the mean gradients, bit for bit."""
    rule = RULES[name]
    step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    micro = _micro_grads()
    accumulated = ema_jax.EmaTrainState.create(
        apply_fn=None, params=PARAMS, tx=optax.MultiSteps(optax.sgd(0.5), K), ema=rule
    )
    for g in micro:
        accumulated = step(accumulated, g)
    real = ema_jax.EmaTrainState.create(apply_fn=None, params=PARAMS, tx=optax.sgd(0.5), ema=rule)
    for g in _mean_grads(micro):
        real = step(real, g)
    assert int(accumulated.ema_state.count) == int(real.ema_state.count) == 2
    for got, want in zip(_leaves(accumulated.params), _leaves(real.params), strict=True):
        assert got.tobytes() == want.tobytes()
    for got, want in zip(_leaves(accumulated.ema_state), _leaves(real.ema_state), strict=True):
        assert got.tobytes() == want.tobytes()


def test_train_state_counts_real_steps_with_the_transformation_form():
    """``MultiSteps(...).gradient_transformation()`` (no ``has_updated`` of its own) is
    recognised by its state: 8 micro-steps are 2 EMA steps."""
    tx = optax.MultiSteps(optax.sgd(0.5), K).gradient_transformation()
    state = ema_jax.EmaTrainState.create(apply_fn=None, params=PARAMS, tx=tx, ema=ema_jax.ema(0.9))
    for g in _micro_grads():
        state = state.apply_gradients(grads=g)
    assert int(state.ema_state.count) == 2


def test_optimizer_step_false_leaves_the_state_unchanged_inside_jit():
    """A traced ``optimizer_step=False`` returns the state bit for bit (count, weight,
    accumulators); ``True`` is an ordinary update."""
    tx = ema_jax.ema((0.9, 0.5), debias=(True, False))
    state = tx.init(PARAMS)
    moved = jax.tree.map(lambda x: x + 1.0, PARAMS)
    update = jax.jit(lambda p, s, stepped: tx.update(p, s, optimizer_step=stepped))
    _, held = update(moved, state, jnp.bool_(False))
    _, stepped = update(moved, state, jnp.bool_(True))
    _, plain = tx.update(moved, state)
    for got, want in zip(_leaves(held), _leaves(state), strict=True):
        assert got.tobytes() == want.tobytes()
    assert int(stepped.count) == 1
    for got, want in zip(_leaves(stepped), _leaves(plain), strict=True):
        np.testing.assert_array_equal(got, want)


def test_optimizer_stepped_follows_multisteps_has_updated():
    """``optimizer_stepped`` is ``MultiSteps.has_updated`` on every call, and a Python
    ``True`` (nothing to trace) for an optimizer without accumulation."""
    multi = optax.MultiSteps(optax.sgd(0.5), K)
    opt_state = multi.init(PARAMS)
    for g in _micro_grads():
        _, opt_state = multi.update(g, opt_state, PARAMS)
        assert bool(ema_jax.optimizer_stepped(opt_state)) == bool(multi.has_updated(opt_state))
    assert ema_jax.optimizer_stepped(optax.adam(1e-3).init(PARAMS)) is True


@pytest.mark.parametrize("bad", ["yes", 1, jnp.float32(1.0), jnp.ones(2, bool)])
def test_optimizer_step_that_is_not_a_boolean_scalar_is_refused(bad):
    tx = ema_jax.ema(0.9)
    with pytest.raises(TypeError, match="optimizer_step must be a bool"):
        tx.update(PARAMS, tx.init(PARAMS), optimizer_step=bad)


class _Linear(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((3, 2)))
        self.b = nnx.Param(jnp.ones(2))


def test_nnx_ema_over_a_multisteps_optimizer_counts_real_steps():
    """An ``nnx.Optimizer`` over ``MultiSteps``: with
    ``optimizer_step=optimizer_stepped(optimizer.opt_state)`` 8 micro-steps of the EMA
    equal 2 real steps of the mean gradients, bit for bit."""

    @nnx.jit
    def step(model, optimizer, average, g):
        def loss(m):  # linear: its gradient is exactly g
            return jnp.sum(m.w[...] * g["w"]) + jnp.sum(m.b[...] * g["b"])

        optimizer.update(model, nnx.grad(loss)(model))
        average.update(model, optimizer_step=ema_jax.optimizer_stepped(optimizer.opt_state))

    def run(tx, grads):
        model = _Linear()
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        average = ema_jax.nnx.EMA(model, 0.9, debias=True)
        for g in grads:
            step(model, optimizer, average, g)
        return average

    micro = _micro_grads()
    accumulated = run(optax.MultiSteps(optax.sgd(0.5), K), micro)
    real = run(optax.sgd(0.5), _mean_grads(micro))
    assert int(accumulated.state.count) == 2
    for got, want in zip(_leaves(accumulated.state), _leaves(real.state), strict=True):
        assert got.tobytes() == want.tobytes()
