"""RUL models: output shapes, dropout only in training, per-window outputs (LayerNorm only;
``cnn_gru_bn``, the BatchNorm study's, has its own test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import MODELS, RNN, Ensemble, make_model


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"cnn_gru_bn"}))
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
    with pytest.raises(
        ValueError,
        match=r"model must be one of \['cnn_attn', 'cnn_gru', 'cnn_gru_bn', 'dcnn', 'dcnn_li', "
        r"'dcnn_wide', "
        r"'gru', 'lstm'\]",
    ):
        make_model("transformer")


@pytest.mark.parametrize("bad", [0, 2.0, True])
def test_members_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="members must be an integer >= 1"):
        make_model("dcnn_li", members=bad)


def test_rnn_cell_is_checked():
    with pytest.raises(ValueError, match=r"cell must be one of \['gru', 'lstm'\]"):
        RNN(cell="rnn").init(jax.random.key(0), jnp.zeros((1, 4, 2)))


def test_recurrent_models_read_the_window_oldest_to_newest():
    """The prediction comes from the last step's state: changing only the newest cycle changes
    it, and the model runs on windows of any length."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, 3)), jnp.float32)
    for name in ("gru", "lstm", "cnn_gru"):
        model = make_model(name)
        params = model.init(jax.random.key(0), x)
        y = model.apply(params, x)
        y_new = model.apply(params, x.at[:, -1].add(1.0))
        assert not np.allclose(y, y_new)
        assert model.apply(params, x[:, :5]).shape == (2,)


def test_ensemble_is_the_mean_of_independent_members():
    """``members=3``: three differently initialised copies of the registered model; evaluation
    returns their mean, training every member's own prediction (so the MSE loss is the mean of
    the members' losses and no member's gradient depends on another member)."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 30, 14)), jnp.float32)
    ens = make_model("dcnn_li", members=3)
    assert isinstance(ens, Ensemble)
    params = ens.init(jax.random.key(0), x)["params"]
    assert sorted(params) == ["member0", "member1", "member2"]
    single = make_model("dcnn_li")
    preds = [single.apply({"params": params[f"member{i}"]}, x) for i in range(3)]
    assert not np.allclose(preds[0], preds[1])  # independent initialisations
    np.testing.assert_allclose(ens.apply({"params": params}, x), np.mean(preds, 0), rtol=1e-5)

    train = ens.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert train.shape == (3, 4)
    y = jnp.zeros(4)

    def loss(p):
        pred = ens.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
        return jnp.mean((pred - y) ** 2)

    grads = jax.grad(loss)(params)
    # perturbing member 1 leaves member 0's gradient unchanged
    moved = jax.tree.map(lambda a: a, params)
    moved["member1"] = jax.tree.map(lambda a: a + 0.1, params["member1"])
    grads_moved = jax.grad(loss)(moved)
    for a, b in zip(
        jax.tree.leaves(grads["member0"]), jax.tree.leaves(grads_moved["member0"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dcnn_li_is_the_dcnn_without_layer_norm():
    """``dcnn_li`` (Li et al. 2018 as published) has exactly the DCNN's convolution and dense
    weights and no LayerNorm scale/shift; with LayerNorm at identity (scale 1, shift 0) the
    two still differ, so the flag really removes the normalisation."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 30, 14)), jnp.float32)
    ln = make_model("dcnn").init(jax.random.key(0), x)["params"]
    li = make_model("dcnn_li").init(jax.random.key(0), x)["params"]
    assert not any(k.startswith("LayerNorm") for k in li)
    assert {k for k in ln if not k.startswith("LayerNorm")} == set(li)
    for k in li:
        for a, b in zip(jax.tree.leaves(ln[k]), jax.tree.leaves(li[k]), strict=True):
            assert a.shape == b.shape
    n_li = sum(p.size for p in jax.tree.leaves(li))
    # 14·10·10+10, 3×(10·10·10+10), 10·3+1, 30·100+100, 100+1 (Li et al.'s layer sizes)
    assert n_li == (1400 + 10) + 3 * (1000 + 10) + (30 + 1) + (3000 + 100) + (100 + 1)
    wide = make_model("dcnn_wide").init(jax.random.key(0), x)["params"]
    assert set(wide) == set(li)  # same layers, 20 filters per convolution instead of 10
    n_wide = sum(p.size for p in jax.tree.leaves(wide))
    assert n_wide == (14 * 10 * 20 + 20) + 3 * (20 * 10 * 20 + 20) + (20 * 3 + 1) + 3100 + 101
    merged = {k: li[k] if k in li else ln[k] for k in ln}
    assert not np.allclose(
        make_model("dcnn").apply({"params": merged}, x),
        make_model("dcnn_li").apply({"params": li}, x),
    )


def test_cnn_gru_bn_normalises_with_batch_statistics_only_when_asked():
    """``cnn_gru_bn``: BatchNorm statistics are updated in training and with
    ``batch_stats=True`` (dropout off, so twice the same output), never in evaluation."""
    model = MODELS["cnn_gru_bn"]()
    x = jax.random.normal(jax.random.key(0), (8, 40, 15)) * 3.0 + 1.0
    variables = model.init(jax.random.key(1), x)
    stats = variables["batch_stats"]
    out, updated = model.apply(variables, x, batch_stats=True, mutable=["batch_stats"])
    again, _ = model.apply(variables, x, batch_stats=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(out, again)
    assert not np.allclose(
        updated["batch_stats"]["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"]
    )
    _, kept = model.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(
        kept["batch_stats"]["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"]
    )
