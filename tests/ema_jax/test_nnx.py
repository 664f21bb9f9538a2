"""ema_jax.nnx.EMA against flax's own nnx.EMA (plain β) and the functional ema_jax.ema
(everything else, bitwise), on tiny NNX models with Linear, BatchNorm and Dropout."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import f32, np_debiased_closed_form, tree_allclose

import ema_jax
from ema_jax.nnx import EMA


class Net(nnx.Module):
    def __init__(self, seed: int = 0, dtype: Any = jnp.float32) -> None:
        rngs = nnx.Rngs(seed)
        self.hidden = nnx.Linear(3, 8, param_dtype=dtype, rngs=rngs)
        self.norm = nnx.BatchNorm(8, param_dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))


X = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
Y = jnp.sin(X[:, :2])


@nnx.jit(donate_argnums=(0, 1, 2, 3))
def train_step(model: Net, optimizer: nnx.Optimizer, ours: EMA, theirs: Any, x: Any) -> None:
    grads = nnx.grad(lambda m: jnp.mean((m(x) - Y) ** 2))(model)
    optimizer.update(model, grads)
    ours.update(model)
    theirs.update(model)


@nnx.jit
def predict(model: Net, x: jax.Array) -> jax.Array:
    return model(x)


@pytest.fixture(scope="module")
def trained() -> tuple[Net, EMA, Any]:
    model = Net()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ours = EMA(model, 0.9)  # default only=nnx.Param, on a model with Dropout RNG state
    theirs = nnx.EMA(model, 0.9, only=nnx.Param)
    for i in range(20):
        train_step(model, optimizer, ours, theirs, X + 0.01 * i)
    return model, ours, theirs


def test_plain_decay_equals_flax_nnx_ema(trained: tuple[Net, EMA, Any]) -> None:
    model, ours, theirs = trained
    assert int(ours.ema_state.count) == 20
    our_view, their_view = ours.apply_to(model), theirs.apply_to(model)
    tree_allclose(nnx.state(our_view, nnx.Param), nnx.state(their_view, nnx.Param), atol=1e-6)
    raw = nnx.state(model, nnx.Param)
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, nnx.state(our_view, nnx.Param), raw))
    # the views share the model's BatchNorm statistics; the raw model keeps its own params
    assert our_view.norm.mean is model.norm.mean
    assert our_view.hidden.kernel is not model.hidden.kernel
    our_view.eval()
    their_view.eval()
    tree_allclose(predict(our_view, X), predict(their_view, X), atol=1e-6)
    tree_allclose(ours.params, nnx.as_pure(theirs.params), atol=1e-6)


def test_the_view_leaves_the_model_alone(trained: tuple[Net, EMA, Any]) -> None:
    model, ours, _ = trained
    before = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.Param)))
    view = ours.apply_to(model)
    view.eval()
    predict(view, X)
    tree_allclose(nnx.as_pure(nnx.state(model, nnx.Param)), before, atol=0)
    assert model.drop.deterministic is False


SETTINGS = {
    "debias": dict(decay=0.9, debias=True),
    "schedule": dict(decay=ema_jax.schedules.tf_warmup(0.99)),
    "update_every": dict(decay=0.8, update_every=3, start_step=2),
    "several": dict(decay=(0.9, ema_jax.schedules.tf_warmup(0.95)), debias=(True, False)),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_options_equal_the_functional_transform_bitwise(name: str) -> None:
    settings = dict(SETTINGS[name], skip_nonfinite=False)
    model = Net(seed=1)
    ours = EMA(model, **settings)
    tx = ema_jax.ema(**settings)
    state = tx.init(nnx.as_pure(nnx.state(model, nnx.Param)))
    update = nnx.jit(lambda e, m: e.update(m), donate_argnums=0)
    functional = jax.jit(lambda p, s: tx.update(p, s)[1])
    rng = np.random.default_rng(2)
    history = []
    for _ in range(7):
        for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=_is_variable):
            var[...] = var[...] + jnp.asarray(rng.normal(size=var.shape), var.dtype)
        history.append(np.asarray(model.out.bias[...], np.float64))
        update(ours, model)
        state = functional(nnx.as_pure(nnx.state(model, nnx.Param)), state)
    ours_leaves, theirs_leaves = jax.tree.leaves(ours.ema_state), jax.tree.leaves(state)
    assert len(ours_leaves) == len(theirs_leaves)
    for a, b in zip(ours_leaves, theirs_leaves, strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if name == "debias":  # and so the float64 closed form
        betas = [f32(0.9)] * 7
        want = np_debiased_closed_form(np.stack(history), betas, [True] * 7)[-1]
        tree_allclose(ours.params["out"]["bias"], want, rtol=1e-5)
    if name == "several":
        view = ours.apply_to(model, ema_index=1)
        tree_allclose(view.out.bias[...], ema_jax.shadow(state, 1)["out"]["bias"], atol=0)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def test_bf16_model_does_not_stall() -> None:
    model = nnx.Linear(4, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.kernel[...] = jnp.ones((4, 4), jnp.bfloat16)
    ours = EMA(model, 0.999)
    theirs = nnx.EMA(model, 0.999, only=nnx.Param)
    model.kernel[...] = jnp.full((4, 4), 2.0, jnp.bfloat16)
    step = nnx.jit(lambda a, b, m: (a.update(m), b.update(m)))
    for _ in range(300):
        step(ours, theirs, model)
    acc = ours.ema_state.ema["kernel"]
    assert acc.dtype == jnp.float32
    want = 2.0 - 0.999**300  # fp32 prediction from 1.0 towards 2.0
    np.testing.assert_allclose(np.asarray(acc), want, rtol=1e-4)
    shadow = ours.apply_to(model).kernel[...]
    assert shadow.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(shadow, np.float32), want, rtol=8e-3)
    assert float(theirs.params["kernel"][...][0, 0]) == 1.0  # flax's bf16 average stalls


class Counter(nnx.Variable):
    pass


def test_filters() -> None:
    model = Net()
    model.steps = Counter(jnp.zeros([], jnp.int32))
    with pytest.raises(TypeError, match=r"model\['drop'\]\['rngs'\]\['count'\].*RNG state"):
        EMA(model, 0.9, only=nnx.RngState)
    with pytest.raises(TypeError, match=r"RNG state"):
        EMA(model, 0.9, only=...)
    with pytest.raises(ValueError, match="selects no Variable"):
        EMA(model, 0.9, only=nnx.Intermediate)
    with pytest.raises(TypeError, match=r"model\['steps'\].*int32"):
        EMA(model, 0.9, only=(nnx.Param, Counter))
    with_stats = EMA(model, 0.5, only=(nnx.Param, nnx.BatchStat))
    model.norm.mean[...] = jnp.ones(8)
    with_stats.update(model)
    np.testing.assert_allclose(with_stats.apply_to(model).norm.var[...], np.ones(8))
    np.testing.assert_allclose(with_stats.apply_to(model).norm.mean[...], np.full(8, 0.5))
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.5)
    with pytest.raises(ValueError, match=r"params\['hidden'\]\['bias'\] has shape"):
        EMA(model, 0.9).update(_wider())


def _wider() -> nnx.Module:
    model = Net()
    model.hidden = nnx.Linear(3, 9, rngs=nnx.Rngs(0))
    return model
