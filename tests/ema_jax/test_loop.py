"""ema_jax.loop: ``train_with_ema`` against a hand-rolled loop, its result type, and the
mistakes it refuses before the first train step (so before anything is donated)."""

from __future__ import annotations

import warnings

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
from ema_jax import monitors

TX = optax.adam(0.05)
EMA = ema_jax.ema(0.8)
BATCHES = regression_batches(seed=2, num=6, batch_size=8)


def _fresh_state(seed=0):
    params = linear_params(jax.random.key(seed))
    return ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=TX, ema=EMA)


def _alive(state):
    return not any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array))


def test_train_with_ema_matches_a_hand_rolled_loop():
    """``train_with_ema`` returns per-epoch ``train_loss``, ``val_loss``,
    ``val_loss_ema``, calls the callback once per epoch, and its final EMA equals a
    hand-rolled optax + ``ema`` loop; validation means are weighted by batch size."""
    epochs = 3
    train = BATCHES[:4]
    val = [regression_batches(seed=3, num=1, batch_size=n)[0] for n in (5, 11)]

    def train_data(epoch):
        return train[epoch % 4 :] + train[: epoch % 4]  # a different order every epoch

    params0 = linear_params(jax.random.key(9))
    calls = []
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=jax.tree.map(jnp.copy, params0), tx=TX, ema=EMA
    )
    history, final = ema_jax.train_with_ema(
        state,
        mse_loss,
        train_data,
        val,
        epochs=epochs,
        callback=lambda epoch, record, state: calls.append((epoch, dict(record))),
    )

    @jax.jit
    def hand_step(params, opt_state, ema_state, batch):
        loss, grads = jax.value_and_grad(mse_loss)(params, batch)
        updates, opt_state = TX.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        _, ema_state = EMA.update(params, ema_state)
        return params, opt_state, ema_state, loss

    params, opt_state, ema_state = params0, TX.init(params0), EMA.init(params0)
    train_losses = []
    for epoch in range(epochs):
        losses = []
        for batch in train_data(epoch):
            params, opt_state, ema_state, loss = hand_step(params, opt_state, ema_state, batch)
            losses.append(float(loss))
        train_losses.append(np.mean(losses))

    tree_allclose(final.params, params, rtol=1e-5, atol=1e-6)
    tree_allclose(final.ema_params, ema_jax.shadow(ema_state), rtol=1e-5, atol=1e-6)
    assert {"train_loss", "val_loss", "val_loss_ema"} <= set(history)
    assert all(len(history[k]) == epochs for k in history)
    np.testing.assert_allclose(history["train_loss"], train_losses, rtol=1e-5)

    def weighted(p):
        return sum(len(b[0]) * float(mse_loss(p, b)) for b in val) / sum(len(b[0]) for b in val)

    assert history["val_loss"][-1] == pytest.approx(weighted(params), rel=1e-5)
    assert history["val_loss_ema"][-1] == pytest.approx(
        weighted(ema_jax.shadow(ema_state)), rel=1e-5
    )
    assert [epoch for epoch, _ in calls] == list(range(epochs))
    assert calls[-1][1]["val_loss_ema"] == history["val_loss_ema"][-1]


def test_the_result_unpacks_as_history_and_state_and_names_its_parts():
    """One result type with or without early stopping: ``history, state = ...`` still reads
    the history and the final state; ``stopping`` is empty without early stopping."""
    result = ema_jax.train_with_ema(_fresh_state(), mse_loss, BATCHES[:2], BATCHES[2:3], epochs=2)
    assert isinstance(result, ema_jax.TrainResult)
    history, state = result
    assert history is result.history and state is result.state and result.stopping == {}
    assert len(history["train_loss"]) == 2 and int(state.step) == 4

    stopped = ema_jax.train_with_ema(
        _fresh_state(),
        mse_loss,
        BATCHES[:2],
        BATCHES[2:3],
        epochs=2,
        early_stopping=ema_jax.EarlyStopping(patience=5),
    )
    history, state = stopped
    assert list(stopped.stopping) == [monitors.Average()]  # the default, "val_loss_ema"
    assert isinstance(stopped.stopping[monitors.Average()], ema_jax.EarlyStoppingState)


def test_train_with_ema_is_still_importable_from_steps_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="moved to ema_jax.loop"):
        from ema_jax.steps import train_with_ema
    assert train_with_ema is ema_jax.train_with_ema is ema_jax.loop.train_with_ema
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from ema_jax import train_with_ema as top_level  # no warning from the package
    assert top_level is train_with_ema


def test_one_shot_generators_are_refused_for_several_epochs_but_serve_one():
    """A generator for several epochs is refused before the state is donated (the state
    passed in is still usable), for train_data and val_data; for one epoch it is read."""
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1), ema=ema_jax.ema(0.9)
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


def test_a_one_shot_val_iterator_is_evaluated_whole_for_one_epoch():
    """The first validation batch is read before training (for the checks) and put back:
    the mean is over every batch, as with a list."""
    val = [regression_batches(seed=3, num=1, batch_size=n)[0] for n in (5, 11)]
    from_list, _ = ema_jax.train_with_ema(_fresh_state(), mse_loss, BATCHES[:2], val, epochs=1)
    from_iter, _ = ema_jax.train_with_ema(
        _fresh_state(), mse_loss, BATCHES[:2], iter(val), epochs=1
    )
    assert from_iter["val_loss"] == from_list["val_loss"]
    assert from_iter["val_loss_ema"] == from_list["val_loss_ema"]


def _vector_metric(params, batch):
    x, y = batch
    return (x @ params["w"] + params["b"] - y) ** 2


def _mae_metric(params, batch):
    x, y = batch
    return {"mae": jnp.mean(jnp.abs(x @ params["w"] + params["b"] - y))}


MISTAKES = {
    "epochs 0": ({"epochs": 0}, ValueError, "epochs"),
    "epochs np.int64(0)": ({"epochs": np.int64(0)}, ValueError, "epochs"),
    "epochs -1": ({"epochs": -1}, ValueError, "epochs"),
    "epochs 2.0": ({"epochs": 2.0}, ValueError, "epochs"),
    "epochs True": ({"epochs": True}, ValueError, "epochs"),
    "empty train_data": ({"train_data": []}, ValueError, "train_data"),
    "empty val_data": ({"val_data": []}, ValueError, "val_data"),
    "non-scalar metric": (
        {"metric_fn": _vector_metric},
        ValueError,
        r"metric \['loss'\] of the \w+ params has shape \(8, 2\)",
    ),
    "early_stopping of another kind": (
        {"early_stopping": {"patience": 3}},
        TypeError,
        "early_stopping must be an ema_jax.EarlyStopping",
    ),
    "not an EmaTrainState": ({"state": {"params": 1}}, TypeError, "state must be an ema_jax"),
    "switch_every 0": ({"switch_every": 0}, ValueError, "switch_every must be >= 1"),
    "switch_every -2": ({"switch_every": -2}, ValueError, "switch_every must be >= 1"),
    "switch_every 1.0": ({"switch_every": 1.0}, TypeError, "switch_every must be None or an int"),
    "switch_every True": ({"switch_every": True}, TypeError, "switch_every must be None or an"),
    "switch_every '2'": ({"switch_every": "2"}, TypeError, "switch_every must be None or an int"),
    "best_ema with a metric_fn without 'loss'": (
        {
            "metric_fn": _mae_metric,
            "early_stopping": ema_jax.EarlyStopping(),
            "monitor": "best_ema",
        },
        ValueError,
        r"monitor='best_ema' reads history key 'val_loss_ema', which this run does not "
        r"record; it records train_loss, val_mae, val_mae_ema",
    ),
    "a typo in the monitor": (
        {"early_stopping": ema_jax.EarlyStopping(), "monitor": "val_los"},
        ValueError,
        "monitor='val_los' is not a monitored value; choose from best_ema",
    ),
    "an index past the one average": (
        {"early_stopping": ema_jax.EarlyStopping(), "monitor": "val_loss_ema[3]"},
        ValueError,
        r"monitor='val_loss_ema\[3\]' does not name one value of this history",
    ),
    "the default monitor with two decays": (
        {
            "state": ema_jax.EmaTrainState.create(
                apply_fn=None,
                params=linear_params(jax.random.key(0)),
                tx=TX,
                ema=ema_jax.ema((0.8, 0.9)),
            ),
            "early_stopping": ema_jax.EarlyStopping(),
        },
        ValueError,
        r"monitor='val_loss_ema' does not name one value of this history \(val_loss_ema is "
        "a list of 2",
    ),
}


@pytest.mark.parametrize(("change", "error", "match"), MISTAKES.values(), ids=MISTAKES)
def test_mistakes_are_refused_before_anything_is_donated(change, error, match):
    """Each mistake raises naming the argument, and the state passed in is still alive
    (nothing was trained or donated)."""
    state = _fresh_state()
    kwargs = {
        "state": state,
        "loss_fn": mse_loss,
        "train_data": BATCHES[:1],
        "val_data": BATCHES[1:2],
        "epochs": 1,
        **change,
    }
    with pytest.raises(error, match=match):
        ema_jax.train_with_ema(**kwargs)
    assert _alive(kwargs["state"])


def test_numpy_integer_epochs_are_accepted():
    history, state = ema_jax.train_with_ema(
        _fresh_state(), mse_loss, BATCHES[:2], BATCHES[2:3], epochs=np.int64(2)
    )
    assert len(history["train_loss"]) == 2 and int(state.step) == 4


class _Passes:
    """A re-iterable that serves ``batches`` for its first ``passes`` iterations, then
    ``then`` (a data pipeline that runs dry, or turns bad)."""

    def __init__(self, batches, passes, then=()):
        self.batches, self.passes, self.then = batches, passes, list(then)

    def __iter__(self):
        self.passes -= 1
        return iter(self.batches if self.passes >= 0 else self.then)


_X, _Y = BATCHES[2]
DRY = {
    # train_data: checked for re-iterability (1 pass), then epochs 0 and 1
    "train_data empty in epoch 1": (
        {"train_data": _Passes(BATCHES[:2], 2)},
        "train_data yielded no batches in epoch 1",
    ),
    "train_data(epoch) empty in epoch 2": (
        {"train_data": lambda epoch: BATCHES[:2] if epoch < 2 else []},
        "train_data yielded no batches in epoch 2",
    ),
    # val_data: checked (1 pass), its first batch read (1 pass), then epochs 0 and 1
    "val_data empty in epoch 1": (
        {"val_data": _Passes(BATCHES[2:3], 3)},
        r"val_data yielded no batches .* in epoch 1",
    ),
    "val_data malformed in epoch 1": (
        {"val_data": _Passes(BATCHES[2:3], 3, then=[(_X, _Y[:3])])},
        r"in epoch 1 \(counting from 0\)",
    ),
}


@pytest.mark.parametrize(("change", "match"), DRY.values(), ids=DRY)
def test_data_that_fails_after_training_began_hands_back_the_trained_state(change, match):
    """A data set found empty (or malformed) only in a later epoch raises a ``DataError``
    (a ``ValueError``) that carries the state trained so far and the finished epochs'
    history: the donated state passed in is not lost."""
    kwargs = {
        "state": _fresh_state(),
        "loss_fn": mse_loss,
        "train_data": BATCHES[:2],
        "val_data": BATCHES[2:3],
        "epochs": 4,
        **change,
    }
    with pytest.raises(ema_jax.loop.DataError, match=match) as caught:
        ema_jax.train_with_ema(**kwargs)
    assert isinstance(caught.value, ValueError)
    result = caught.value.result
    assert _alive(result.state) and int(result.state.step) >= 2
    finished = len(result.history["train_loss"])
    assert finished in (1, 2) and all(len(v) == finished for v in result.history.values())
    history, _ = ema_jax.train_with_ema(
        result.state, mse_loss, BATCHES[:2], BATCHES[2:3], epochs=1
    )  # training continues from it
    assert len(history["train_loss"]) == 1


def test_a_donated_state_is_refused_naming_the_fix():
    state = _fresh_state()
    ema_jax.make_train_step(mse_loss)(state, BATCHES[0])
    with pytest.raises(ValueError, match=r"was donated to an earlier train step.*donate=False"):
        ema_jax.train_with_ema(state, mse_loss, BATCHES[:1], BATCHES[1:2], epochs=1)


def test_switch_every_switches_after_every_kth_epoch_once_it_is_evaluated():
    """``switch_every=2`` over 5 epochs of SGD switches after epochs 2 and 4 (from 1): the
    result matches a float64 loop switching there; the history and the callback up to the
    first switch are those of a run without switching (validation sees the raw weights
    before each switch), and the epoch after it differs."""
    params0 = linear_params(jax.random.key(11))
    epochs, lr, beta = 5, 0.1, 0.6
    train = BATCHES[:2]

    def run(**options):
        seen = []
        state = ema_jax.EmaTrainState.create(
            apply_fn=None,
            params=jax.tree.map(jnp.copy, params0),
            tx=optax.sgd(lr),
            ema=ema_jax.ema(beta),
        )
        result = ema_jax.train_with_ema(
            state,
            mse_loss,
            train,
            BATCHES[4:],
            epochs=epochs,
            callback=lambda epoch, record, s: seen.append(host_copy(s.params)),
            **options,
        )
        return result, seen

    (history, state), seen = run(switch_every=2)
    want_params, want_ema = np_sgd_ema_switch(
        host_copy(params0), [train] * epochs, lr, beta, switch_after={1, 3}
    )
    tree_allclose(state.params, want_params, rtol=1e-5, atol=1e-6)
    tree_allclose(state.ema_params, want_ema, rtol=1e-5, atol=1e-6)

    (plain, _), plain_seen = run()
    for key in ("train_loss", "val_loss", "val_loss_ema"):
        assert history[key][:2] == plain[key][:2], key
        assert history[key][2] != plain[key][2], key
    tree_allclose(seen[1], plain_seen[1], rtol=0, atol=0)  # the callback: before the switch
