"""ema_jax.steps: the jitted train / eval steps (BatchNorm state, donation) and
``evaluate_dataset``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import host_copy, linear_params, mse_loss, regression_batches, tree_allclose

import ema_jax

TX = optax.adam(0.05)
EMA = ema_jax.ema(0.8)
BATCHES = regression_batches(seed=2, num=6, batch_size=8)
TRAIN_STEP = ema_jax.make_train_step(mse_loss)
EVAL_STEP = ema_jax.make_eval_step(mse_loss)
PAIRED_EVAL = ema_jax.make_paired_eval_step(mse_loss)


def _fresh_state(seed=0):
    params = linear_params(jax.random.key(seed))
    return ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=TX, ema=EMA)


def _trained_state(steps=3):
    state = _fresh_state()
    for batch in BATCHES[:steps]:
        state, _ = TRAIN_STEP(state, batch)
    return state


def test_train_step_donates_and_equals_manual_step():
    """The jitted train step donates its input state (every input array is deleted
    afterwards) and equals grad at ``params`` → optax update → EMA of the new params."""
    state = _fresh_state()
    params = host_copy(state.params)
    new, metrics = TRAIN_STEP(state, BATCHES[0])
    assert all(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array))

    loss, grads = jax.value_and_grad(mse_loss)(params, BATCHES[0])
    updates, _ = TX.update(grads, TX.init(params), params)
    new_params = optax.apply_updates(params, updates)
    want_ema, _ = EMA.update(new_params, EMA.init(params))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    tree_allclose(new.params, new_params, rtol=1e-5, atol=1e-7)
    tree_allclose(new.ema_params, want_ema, rtol=1e-5, atol=1e-7)
    assert int(new.step) == 1 and int(new.ema_state.count) == 1


def test_train_loss_is_taken_at_params_and_ema_gets_no_gradient():
    """The loss (and so the gradient) depends on ``params`` only: its gradient with
    respect to the EMA accumulators is exactly zero, and so is that of the new params."""
    state = _trained_state()
    step = ema_jax.make_train_step(mse_loss, donate=False)
    batch = BATCHES[3]
    _, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["loss"], mse_loss(state.params, batch), rtol=1e-6)
    assert abs(float(mse_loss(state.ema_params, batch)) - float(metrics["loss"])) > 1e-3

    def with_ema(ema_tree):
        return state.replace(ema_state=state.ema_state.replace(ema=ema_tree))

    def loss_of_ema(ema_tree):
        return step(with_ema(ema_tree), batch)[1]["loss"]

    def new_params_of_ema(ema_tree):
        new = step(with_ema(ema_tree), batch)[0]
        return sum(jnp.sum(x) for x in jax.tree.leaves(new.params))

    for fn in (loss_of_ema, new_params_of_ema):
        grads = jax.grad(fn)(state.ema_state.ema)
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
    # Sanity: the same construction does see the params.
    grads = jax.grad(lambda p: step(state.replace(params=p), batch)[1]["loss"])(state.params)
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_eval_steps_select_inside_jit_and_leave_state_unchanged():
    """``make_eval_step`` gives the metric of ``ema_params`` (use_ema=True) or of
    ``params`` (False), computed directly; it does not touch the state; the paired step
    returns both."""
    state = _trained_state()
    before = host_copy(state)
    batch = BATCHES[4]
    want_ema = float(mse_loss(state.ema_params, batch))
    want_raw = float(mse_loss(state.params, batch))
    assert abs(want_ema - want_raw) > 1e-3  # the choice matters
    np.testing.assert_allclose(EVAL_STEP(state, batch), want_ema, rtol=1e-6)
    np.testing.assert_allclose(EVAL_STEP(state, batch, use_ema=False), want_raw, rtol=1e-6)
    paired = PAIRED_EVAL(state, batch)
    np.testing.assert_allclose(paired["ema"], want_ema, rtol=1e-6)
    np.testing.assert_allclose(paired["raw"], want_raw, rtol=1e-6)
    tree_allclose(host_copy(state), before, rtol=0, atol=0)


def test_eval_step_ema_index_with_several_decays():
    """With K decays ``ema_index`` picks a decay; the paired step returns all K; an index out
    of range raises a ValueError naming ``ema_index``."""
    params = linear_params(jax.random.key(5))
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.5), ema=ema_jax.ema((0.5, 0.95))
    )
    state = state.apply_gradients(grads=jax.grad(mse_loss)(params, BATCHES[0]))
    batch = BATCHES[1]
    wants = [float(mse_loss(p, batch)) for p in state.ema_params]
    for k, want in enumerate(wants):
        np.testing.assert_allclose(EVAL_STEP(state, batch, ema_index=k), want, rtol=1e-6)
    np.testing.assert_allclose(PAIRED_EVAL(state, batch)["ema"], wants, rtol=1e-6)
    with pytest.raises(ValueError, match="ema_index"):
        EVAL_STEP(state, batch, ema_index=2)


def test_rng_is_folded_with_the_step_and_aux_is_merged():
    """The train step passes ``fold_in(rng, step)`` to the loss and merges a dict ``aux``."""

    def noisy_loss(params, batch, rng):
        return mse_loss(params, batch), {"noise": jax.random.uniform(rng)}

    step = ema_jax.make_train_step(noisy_loss, has_aux=True)
    rng = jax.random.key(7)
    state = _fresh_state()
    for t in range(2):
        state, metrics = step(state, BATCHES[t], rng)
        assert set(metrics) == {"loss", "noise"}
        np.testing.assert_array_equal(
            metrics["noise"], jax.random.uniform(jax.random.fold_in(rng, t))
        )


def test_train_step_compiles_once():
    """A jitted train step should compile once for a run of same-shaped batches.

    (``_cache_size`` counts compiled executables; the trace itself is reused, so counting
    calls of the loss function would not see the second compilation.)
    """
    step = ema_jax.make_train_step(mse_loss)
    state = _fresh_state()
    for batch in BATCHES[:3]:
        state, _ = step(state, batch)
    assert step._cache_size() == 1


# ------------------------------------------------------------------------------ BatchNorm


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(2)(nn.relu(x))


BN = BNNet()


def bn_loss(params, model_state, batch):
    x, y = batch
    variables = {"params": params, **model_state}
    pred, new_model_state = BN.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean((pred - y) ** 2), new_model_state


def bn_metric(params, model_state, batch):
    x, y = batch
    return jnp.mean((BN.apply({"params": params, **model_state}, x, train=False) - y) ** 2)


BN_STEP = ema_jax.make_train_step(bn_loss, with_model_state=True)
BN_EVAL = ema_jax.make_eval_step(bn_metric, with_model_state=True)


def _bn_state(average_model_state, decay=0.6):
    variables = BN.init(jax.random.key(0), BATCHES[0][0], train=False)
    return ema_jax.EmaTrainState.create(
        apply_fn=BN.apply,
        params=variables["params"],
        tx=optax.sgd(0.1),
        ema=ema_jax.ema(decay),
        model_state={"batch_stats": variables["batch_stats"]},
        average_model_state=average_model_state,
    )


def _np_ema(sequence, decay):
    """Float64 ``e ← β·e + (1-β)·x`` over a list of trees, from ``e = sequence[0]``."""
    ema = jax.tree.map(lambda x: np.asarray(x, np.float64), sequence[0])
    for tree in sequence[1:]:
        ema = jax.tree.map(lambda e, x: decay * e + (1 - decay) * np.asarray(x), ema, tree)
    return ema


def test_batchnorm_stats_averaged_with_average_model_state():
    """With ``average_model_state=True`` the EMA of ``batch_stats`` equals a NumPy EMA
    of the batch_stats sequence, and EMA evaluation uses those averaged statistics."""
    decay = 0.6
    state = _bn_state(True, decay)
    stats = [host_copy(state.model_state)]
    params = [host_copy(state.params)]
    for batch in BATCHES[:4]:
        state, _ = BN_STEP(state, batch)
        stats.append(host_copy(state.model_state))
        params.append(host_copy(state.params))
    assert not np.allclose(
        stats[1]["batch_stats"]["BatchNorm_0"]["mean"],
        stats[4]["batch_stats"]["BatchNorm_0"]["mean"],
    )
    averaged = state.ema_state.ema
    tree_allclose(averaged["model_state"], _np_ema(stats, decay), rtol=1e-5, atol=1e-7)
    tree_allclose(averaged["params"], _np_ema(params, decay), rtol=1e-5, atol=1e-7)
    tree_allclose(state.select_model_state(True), averaged["model_state"], rtol=0, atol=0)

    batch = BATCHES[5]
    want = bn_metric(state.ema_params, averaged["model_state"], batch)
    live = bn_metric(state.ema_params, state.model_state, batch)
    assert abs(float(want) - float(live)) > 1e-4  # the averaged statistics matter
    np.testing.assert_allclose(BN_EVAL(state, batch), want, rtol=1e-6)
    np.testing.assert_allclose(
        BN_EVAL(state, batch, use_ema=False),
        bn_metric(state.params, state.model_state, batch),
        rtol=1e-6,
    )


def test_batchnorm_stats_shared_without_average_model_state():
    """With ``average_model_state=False`` the EMA holds params only; batch_stats are
    carried (updated by training, never averaged) and shared by raw and EMA evaluation."""
    state = _bn_state(False)
    for batch in BATCHES[:3]:
        params, stats = host_copy(state.params), host_copy(state.model_state)
        state, _ = BN_STEP(state, batch)
        _, want = bn_loss(params, stats, batch)  # the stats of this step's forward pass
        tree_allclose(state.model_state, want, rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(state.ema_state.ema) == jax.tree.structure(state.params)
    assert state.select_model_state(True) is state.model_state
    batch = BATCHES[5]
    np.testing.assert_allclose(
        BN_EVAL(state, batch), bn_metric(state.ema_params, state.model_state, batch), rtol=1e-6
    )


# ------------------------------------------------------------------------ evaluate_dataset


def test_evaluate_dataset_dict_metrics_and_several_decays():
    """``evaluate_dataset``: batch-size-weighted means of every metric, raw and EMA, with a
    list over decays when the EMA keeps several."""

    def metrics(params, batch):
        x, y = batch
        err = x @ params["w"] + params["b"] - y
        return {"mse": jnp.mean(err**2), "mae": jnp.mean(jnp.abs(err))}

    params = linear_params(jax.random.key(6))
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.3), ema=ema_jax.ema((0.5, 0.9))
    )
    state = state.apply_gradients(grads=jax.grad(mse_loss)(params, BATCHES[0]))
    val = [regression_batches(seed=4, num=1, batch_size=n)[0] for n in (3, 13)]
    out = ema_jax.evaluate_dataset(ema_jax.make_paired_eval_step(metrics), state, val)
    assert set(out) == {"val_mse", "val_mse_ema", "val_mae", "val_mae_ema"}

    def weighted(p, name):
        total = sum(len(b[0]) * float(metrics(p, b)[name]) for b in val)
        return total / sum(len(b[0]) for b in val)

    for name in ("mse", "mae"):
        assert out[f"val_{name}"] == pytest.approx(weighted(state.params, name), rel=1e-5)
        want = [weighted(p, name) for p in state.ema_params]
        np.testing.assert_allclose(out[f"val_{name}_ema"], want, rtol=1e-5)


def test_evaluate_dataset_sizes_a_batch_by_its_arrays_not_its_scalars():
    """A scalar in the batch (first in key order) does not make the batch weigh 1; arrays
    that disagree on their leading dimension are an error, not a guess."""

    def metrics(params, batch):
        err = batch["x"] @ params["w"] + params["b"] - batch["y"]
        return jnp.mean(err**2)

    params = linear_params(jax.random.key(7))
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.1), ema=ema_jax.ema(0.9)
    )
    pairs = [regression_batches(seed=5, num=1, batch_size=n)[0] for n in (2, 14)]
    val = [{"a_step": jnp.int32(i), "x": x, "y": y} for i, (x, y) in enumerate(pairs)]
    step = ema_jax.make_paired_eval_step(metrics)
    out = ema_jax.evaluate_dataset(step, state, val)
    per_batch = [float(metrics(params, b)) for b in val]
    assert out["val_loss"] == pytest.approx((2 * per_batch[0] + 14 * per_batch[1]) / 16, rel=1e-5)
    ragged = [{"x": pairs[0][0], "y": pairs[1][1]}]
    with pytest.raises(ValueError, match=r"leading dimensions \[2, 14\]"):
        ema_jax.evaluate_dataset(step, state, ragged)


def test_evaluate_dataset_skips_empty_batches_and_refuses_only_empty_ones():
    """Batches of size 0 weigh nothing (no NaN in the mean); only size-0 batches raise
    instead of returning NaN."""
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1), ema=ema_jax.ema(0.9)
    )
    paired = ema_jax.make_paired_eval_step(lambda p, b: jnp.mean((p["w"] - b) ** 2))
    full, empty = jnp.zeros((4, 2)), jnp.zeros((0, 2))
    result = ema_jax.evaluate_dataset(paired, state, [full, empty])
    assert result["val_loss"] == 1.0 and result["val_loss_ema"] == 1.0
    with pytest.raises(ValueError, match="only batches of size 0"):
        ema_jax.evaluate_dataset(paired, state, [empty, empty])


# ------------------------------------------------------------------------------- donation

DONATED = r"state\.\w+.* was deleted: it was donated to an earlier train step .*donate=False"

USES_OF_A_DONATED_STATE = {
    "train step": lambda state: TRAIN_STEP(state, BATCHES[0]),
    "eval step": lambda state: EVAL_STEP(state, BATCHES[0]),
    "eval step, raw": lambda state: EVAL_STEP(state, BATCHES[0], use_ema=False),
    "paired eval step": lambda state: PAIRED_EVAL(state, BATCHES[0]),
    "evaluate_dataset": lambda state: ema_jax.evaluate_dataset(PAIRED_EVAL, state, BATCHES[:1]),
}


@pytest.mark.parametrize("use", USES_OF_A_DONATED_STATE.values(), ids=USES_OF_A_DONATED_STATE)
def test_a_donated_state_is_refused_naming_the_fix(use):
    """Reusing the state a donating train step consumed raises a ValueError that says it
    was donated and names the fixes (the returned state, ``donate=False``), chained to
    JAX's own error when JAX raised one; the returned state still works."""
    state = _fresh_state()
    new, _ = TRAIN_STEP(state, BATCHES[0])
    with pytest.raises(ValueError, match=DONATED):
        use(state)
    use(new)


def test_the_params_given_to_create_are_donated_with_the_state():
    """``create`` keeps the params it is given (no copy), so the first donating step deletes
    them: the documented surprise. ``donate=False`` keeps both usable."""
    params = linear_params(jax.random.key(1))
    state = ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=TX, ema=EMA)
    TRAIN_STEP(state, BATCHES[0])
    assert all(x.is_deleted() for x in jax.tree.leaves(params))

    params = linear_params(jax.random.key(1))
    state = ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=TX, ema=EMA)
    ema_jax.make_train_step(mse_loss, donate=False)(state, BATCHES[0])
    assert not any(x.is_deleted() for x in jax.tree.leaves((params, state)))
    EVAL_STEP(state, BATCHES[0])


def test_step_errors_other_than_donation_pass_through():
    """A step's own failure (here a batch of the wrong shape) is JAX's error, unchanged,
    and the wrapped step still exposes ``jax.jit``'s methods (``lower``)."""
    state = _fresh_state()
    with pytest.raises(TypeError, match="dot_general"):
        EVAL_STEP(state, (jnp.ones((4, 5)), jnp.ones((4, 2))))
    assert "HloModule" in EVAL_STEP.lower(state, BATCHES[0]).compile().as_text()


# ------------------------------------------------------------------ misuse of the factories
def _misuse_state() -> ema_jax.EmaTrainState:
    return ema_jax.EmaTrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1), ema=ema_jax.ema(0.9)
    )


def _call_loss_not_a_pair() -> None:
    scalar_loss = ema_jax.make_train_step(lambda p, b: jnp.sum(p["w"] * b), has_aux=True)
    scalar_loss(_misuse_state(), jnp.ones(2))


def _call_vector_metric() -> None:
    vector_metric = ema_jax.make_paired_eval_step(lambda p, b: p["w"] * b)
    ema_jax.evaluate_dataset(vector_metric, _misuse_state(), [jnp.ones((2,))])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (_call_loss_not_a_pair, TypeError, r"has_aux=True, loss_fn must return a pair"),
        (_call_vector_metric, ValueError, r"metric \['loss'\] of the \w+ params has shape \(2,\)"),
    ],
    ids=["has_aux without a pair", "non-scalar metric"],
)
def test_misuse_raises_naming_it(call, error, match):
    """``has_aux=True`` with a loss that is not a pair, and a non-scalar metric in
    ``evaluate_dataset``, each raise naming it."""
    with pytest.raises(error, match=match):
        call()
