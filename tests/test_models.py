"""RUL models: output shapes, dropout only in training, per-window outputs (LayerNorm only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import MODELS, make_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_dropout_and_per_window_outputs(name):
    model = make_model(name)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 30, 14)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params"}  # no batch_stats: nothing but weights to average
    apply = jax.jit(model.apply, static_argnames="train")

    y = apply(variables, x)
    assert y.shape == (5,)
    assert y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))

    # a window's prediction does not depend on the rest of its batch (no batch norm)
    reordered = apply(variables, x[::-1])[::-1]
    np.testing.assert_allclose(y, reordered, rtol=1e-5, atol=1e-6)

    # dropout is active only in training, and depends on the key
    train_a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert train_a.shape == (5,)
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, y)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"model must be one of \['cnn_attn', 'dcnn'\]"):
        make_model("lstm")
