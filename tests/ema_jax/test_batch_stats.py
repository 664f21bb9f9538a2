"""ema_jax.batch_stats: BatchNorm statistics recomputed for the weights a model holds,
against a NumPy float64 reference of flax's training-mode statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import ema_jax
from ema_jax.batch_stats import recompute_batch_stats, recompute_linen_batch_stats


class Net(nnx.Module):
    def __init__(self, rngs):
        self.bn1 = nnx.BatchNorm(3, momentum=0.9, use_running_average=True, rngs=rngs)
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn2 = nnx.BatchNorm(4, momentum=0.5, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return self.bn2(jax.nn.relu(self.linear(self.bn1(x))))


def _net():
    net = Net(nnx.Rngs(0))
    net.bn1.scale[...] = jnp.asarray([1.5, 0.5, 2.0])
    net.bn1.bias[...] = jnp.asarray([0.1, -0.2, 0.3])
    return net


BATCHES = [
    np.random.default_rng(i).normal(i, 1.0 + i, size=(n, 3)).astype(np.float32)
    for i, n in enumerate((4, 5, 9))
]


def _reference(net, batches):
    """Per BatchNorm, the mean over batches of each batch's mean and (biased) variance, the
    second layer's input normalised with the first's batch statistics (training mode)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    eps, w, b = net.bn1.epsilon, f64(net.linear.kernel[...]), f64(net.linear.bias[...])
    s1, b1 = f64(net.bn1.scale[...]), f64(net.bn1.bias[...])
    stats = {"bn1": ([], []), "bn2": ([], [])}
    for x in map(f64, batches):
        m, v = x.mean(0), x.var(0)
        stats["bn1"][0].append(m), stats["bn1"][1].append(v)
        h = np.maximum(((x - m) / np.sqrt(v + eps) * s1 + b1) @ w + b, 0.0)
        stats["bn2"][0].append(h.mean(0)), stats["bn2"][1].append(h.var(0))
    return {k: (np.mean(ms, 0), np.mean(vs, 0)) for k, (ms, vs) in stats.items()}


@pytest.mark.parametrize("as_tuples", [False, True], ids=["inputs", "(input, target) tuples"])
def test_statistics_are_the_equal_weight_mean_of_each_batchs(as_tuples):
    net = _net()
    batches = [(x, np.zeros(len(x))) for x in BATCHES] if as_tuples else BATCHES
    assert recompute_batch_stats(net, batches) is net
    want = _reference(_net(), BATCHES)
    for name, (mean, var) in want.items():
        bn = getattr(net, name)
        np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.var[...], var, rtol=1e-5, atol=1e-6)


def test_modes_momenta_and_other_weights_are_left_as_found():
    net = _net()
    net.bn2.use_running_average = False
    params = jax.tree.map(np.asarray, nnx.state(net, nnx.Param))
    recompute_batch_stats(net, BATCHES)
    assert (net.bn1.use_running_average, net.bn1.momentum) == (True, 0.9)
    assert (net.bn2.use_running_average, net.bn2.momentum) == (False, 0.5)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(net, nnx.Param), params)


MISUSE = {
    "no batches": (lambda: _net(), [], "batches yielded no batch"),
    "no BatchNorm": (lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(0)), BATCHES, "has no nnx.BatchNorm"),
}


@pytest.mark.parametrize(("make", "batches", "match"), MISUSE.values(), ids=MISUSE)
def test_misuse_is_refused_and_the_model_is_unchanged(make, batches, match):
    model = make()
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ValueError, match=match):
        recompute_batch_stats(model, batches)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


def test_an_ema_view_is_recalibrated_and_the_trained_model_kept():
    """The intended route: recompute on a copy of ``ema.apply_to(model)`` (today's view
    shares the model's BatchStat Variables, so it is cloned); the training model's
    statistics stay as they were."""
    import ema_jax.nnx

    model = _net()
    ema = ema_jax.nnx.EMA(model, 0.9)
    model.linear.kernel[...] = model.linear.kernel[...] * 2.0
    ema.update(model)
    trained = np.asarray(model.bn2.mean[...])
    view = recompute_batch_stats(nnx.clone(ema.apply_to(model)), BATCHES)
    np.testing.assert_array_equal(model.bn2.mean[...], trained)
    want = _reference(view, BATCHES)  # the view's averaged kernel, not the model's
    np.testing.assert_allclose(view.bn2.mean[...], want["bn2"][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(view.bn2.mean[...], _reference(model, BATCHES)["bn2"][0])


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = jax.nn.relu(nn.Dense(4, name="linear")(x))
        return nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn2")(x)


def _linen_state():
    model = LinenNet()
    variables = model.init(jax.random.key(0), BATCHES[0], train=False)
    state = ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.1),
        ema=ema_jax.ema(0.9),
        model_state={"batch_stats": variables["batch_stats"]},
    )
    return model, state


def _linen_reference(params, batches):
    """:func:`_reference` for the Linen net's params (default scale 1, bias 0)."""
    net = _net()
    net.bn1.scale[...], net.bn1.bias[...] = jnp.ones(3), jnp.zeros(3)
    net.linear.kernel[...] = params["linear"]["kernel"]
    net.linear.bias[...] = params["linear"]["bias"]
    return _reference(net, batches)


def test_linen_statistics_are_the_equal_weight_mean_of_each_batchs():
    """For an EmaTrainState's average, from the user's training-mode forward; the state is
    not changed and the result has ``model_state``'s tree."""
    model, state = _linen_state()

    def forward(params, model_state, x):
        variables = {"params": params, **model_state}
        return model.apply(variables, x, train=True, mutable=["batch_stats"])[1]

    before = jax.tree.map(np.asarray, state.model_state)
    got = recompute_linen_batch_stats(state, forward, [(x, None) for x in BATCHES])
    assert jax.tree.structure(got) == jax.tree.structure(state.model_state)
    jax.tree.map(np.testing.assert_array_equal, state.model_state, before)
    want = _linen_reference(state.ema_params, BATCHES)
    for name, (mean, var) in want.items():
        stats = got["batch_stats"][name]
        np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], var, rtol=1e-5, atol=1e-6)


def _unchanged(params, model_state, x):
    return model_state


LINEN_MISUSE = {
    "no model_state": ({"model_state": None}, _unchanged, BATCHES, "state has no model_state"),
    "no BatchNorm ran": ({}, _unchanged, BATCHES, r"forward ran no flax\.linen\.BatchNorm"),
    "no batches": ({}, _unchanged, [], "batches yielded no batch"),
}


@pytest.mark.parametrize(
    ("change", "forward", "batches", "match"), LINEN_MISUSE.values(), ids=LINEN_MISUSE
)
def test_linen_misuse_is_refused_naming_it(change, forward, batches, match):
    state = _linen_state()[1].replace(**change)
    with pytest.raises(ValueError, match=match):
        recompute_linen_batch_stats(state, forward, batches)
