"""EarlyStopping (Keras's rule), its best weights under donation, and train_with_ema's stopping.

The expected epochs come from two independent sources: sequences worked by hand from Keras's
documented rule, and :func:`keras_rule`, a loop written here from the wording of
``keras.callbacks.EarlyStopping`` (its ``monitor_op(current - min_delta, best)`` form, with
the sign of ``min_delta`` flipped in ``"min"`` mode), compared on random sequences.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import host_copy, linear_params, mse_loss
from hypothesis import given, settings
from hypothesis import strategies as st

import ema_jax
from ema_jax.monitors import Average, BestAverage, Raw

NAN = float("nan")


def keras_rule(metrics, patience=0, min_delta=0.0, mode="min", baseline=None, start=0):
    """``(stopped_epoch, best_epoch)`` (``None``: never) of Keras 3's EarlyStopping, from its
    docs: "an absolute change of less than min_delta will count as no improvement", the
    wait restarts only when the value beats both the best and the baseline, and training
    stops once ``wait >= patience`` (after epoch 0); epochs before ``start`` are ignored."""
    op = np.less if mode == "min" else np.greater
    delta = -abs(min_delta) if mode == "min" else abs(min_delta)
    best, wait, best_epoch = (np.inf if mode == "min" else -np.inf), 0, None
    for epoch, current in enumerate(metrics):
        if epoch < start:
            continue
        wait += 1
        if op(current - delta, best):
            best, best_epoch = current, epoch
            if baseline is None or op(current - delta, baseline):
                wait = 0
            continue
        if wait >= patience and epoch > 0:
            return epoch, best_epoch
    return None, best_epoch


def run_stopper(stopper, metrics):
    """Feed ``metrics`` (weights: the epoch number) until it stops; the final state."""
    es = stopper.init()
    for epoch, metric in enumerate(metrics):
        es = stopper.update(es, metric, {"epoch": jnp.asarray([epoch])})
        if es.stop:
            break
    return es


# (settings, metrics, stopped_epoch, best_epoch), each worked by hand from the rule.
HAND_WORKED = [
    # patience 2: 4.5 and 4.2 do not beat 4 -> wait 1, 2 -> stop at epoch 3.
    ({"patience": 2}, [5, 4, 4.5, 4.2, 3, 3.5], 3, 1),
    # min_delta 0.5: 9.75 is no improvement on 10 (needs < 9.5); 9.25 is; 8.75 is not
    # (needs < 8.75, strictly); 9.0 is not -> wait 2 at epoch 4.
    ({"patience": 2, "min_delta": 0.5}, [10, 9.75, 9.25, 8.75, 9.0, 1.0], 4, 2),
    # min_delta's sign is ignored (Keras takes abs).
    ({"patience": 2, "min_delta": -0.5}, [10, 9.75, 9.25, 8.75, 9.0, 1.0], 4, 2),
    # mode max, patience 1: 0.6 does not beat 0.7 -> stop at 2.
    ({"patience": 1, "mode": "max"}, [0.5, 0.7, 0.6, 0.8], 2, 1),
    # baseline 3 never beaten: improvements keep the wait growing (1, 2), and the first
    # epoch without improvement (4.5, wait 3 >= 2) stops.
    ({"patience": 2, "baseline": 3.0}, [5, 4, 4.5, 2.5, 2.0], 2, 1),
    # baseline beaten at epoch 1 (2.5 < 3): wait reset; 2.75, 2.9 -> wait 2 at epoch 3.
    ({"patience": 2, "baseline": 3.0}, [5, 2.5, 2.75, 2.9, 2.0], 3, 1),
    # start_from_epoch 2: epochs 0, 1 are not monitored, so 0.5 never counts.
    ({"patience": 1, "start_from_epoch": 2}, [1, 0.5, 3, 2, 2.5, 0.1], 4, 3),
    # patience 0: the first epoch without improvement stops.
    ({"patience": 0}, [3, 2, 2, 1], 2, 1),
    # NaN is never the best; at epoch 0 patience 0 cannot stop (epoch > 0), at epoch 1 it does.
    ({"patience": 0}, [NAN, NAN, 1.0], 1, None),
    ({"patience": 2}, [1, NAN, 0.5, NAN, NAN, 0.1], 4, 2),
    # never stops: every epoch improves.
    ({"patience": 1}, [5, 4, 3, 2], None, 3),
]


@pytest.mark.parametrize(("kwargs", "metrics", "stopped", "best"), HAND_WORKED)
def test_hand_worked_sequences_match_keras(kwargs, metrics, stopped, best):
    """Worked by hand: patience, min_delta, mode="max", baseline, start_from_epoch, NaN."""
    reference = {"min_delta": 0.0, "mode": "min", "baseline": None, "start": 0}
    reference.update({("start" if k == "start_from_epoch" else k): v for k, v in kwargs.items()})
    assert keras_rule(metrics, **reference) == (stopped, best)  # the reference agrees
    es = run_stopper(ema_jax.EarlyStopping(**kwargs), metrics)
    assert (es.stopped_epoch, es.best_epoch, es.stop) == (stopped, best, stopped is not None)
    if best is None:
        assert es.best_weights is None and math.isinf(es.best_metric)
    else:
        assert es.best_metric == metrics[best]
        assert int(es.best_weights["epoch"][0]) == best


@settings(max_examples=150, deadline=None)
@given(
    metrics=st.lists(
        st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0, NAN]), st.floats(-2, 2)), max_size=14
    ),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.25, -0.1]),
    mode=st.sampled_from(["min", "max"]),
    baseline=st.sampled_from([None, 0.0, 0.5]),
    start=st.integers(0, 3),
)
def test_random_sequences_match_the_keras_rule(metrics, patience, min_delta, mode, baseline, start):
    """The rule equals Keras's on random sequences (ties and NaNs included)."""
    stopper = ema_jax.EarlyStopping(patience, min_delta, mode, baseline, start)
    es = run_stopper(stopper, metrics)
    stopped, best = keras_rule(metrics, patience, min_delta, mode, baseline, start)
    assert (es.stopped_epoch, es.best_epoch) == (stopped, best)
    assert es.epoch == (len(metrics) if stopped is None else stopped + 1)


def test_updates_after_a_stop_change_nothing():
    stopper = ema_jax.EarlyStopping(patience=0)
    es = run_stopper(stopper, [1.0, 2.0])
    assert es.stop and stopper.update(es, 0.0, {"epoch": jnp.zeros(1)}) is es


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patience": -1}, ValueError, "patience must be >= 0"),
        ({"patience": 1.5}, TypeError, "patience must be an int"),
        ({"mode": "auto"}, ValueError, "mode must be 'min' or 'max'"),
        ({"min_delta": NAN}, ValueError, "min_delta must be finite"),
        ({"baseline": "0.1"}, TypeError, "baseline must be a number"),
        ({"start_from_epoch": -2}, ValueError, "start_from_epoch must be >= 0"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ema_jax.EarlyStopping(**kwargs)


def test_the_state_is_a_pytree_and_update_is_pure():
    stopper = ema_jax.EarlyStopping(patience=1)
    es0 = stopper.init()
    es1 = stopper.update(es0, 1.0, {"w": jnp.ones(2)})
    assert es0 == stopper.init() and es1.best_epoch == 0 and es0.best_weights is None
    leaves = jax.tree.leaves(es1)
    assert any(isinstance(x, jax.Array) for x in leaves)  # the weights are leaves
    assert jax.tree.structure(es1) == jax.tree.structure(jax.tree.map(lambda x: x, es1))


TX = optax.adam(0.05)
STEP = ema_jax.make_train_step(mse_loss)


def test_best_weights_survive_donation_bitwise():
    """The weights passed at the best epoch, bitwise, after later steps that
    donate (delete) the arrays that were passed."""
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(8, 3)), jnp.float32) for _ in range(6)]
    batches = [(x, x @ jnp.ones((3, 2))) for x in xs]
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=linear_params(jax.random.key(0)), tx=TX, ema=ema_jax.ema(0.5)
    )
    stopper = ema_jax.EarlyStopping(patience=10)
    es, snapshots, passed = stopper.init(), [], []
    for epoch, metric in enumerate([3.0, 2.0, 1.0, 1.5, 1.2, 1.1]):
        state, _ = STEP(state, batches[epoch])
        snapshots.append(host_copy((state.params, state.ema_params)))
        passed.append((state.params, state.ema_params))
        es = stopper.update(es, metric, (state.params, state.ema_params))
    assert es.best_epoch == 2
    state, _ = STEP(state, batches[0])  # donates the last arrays passed too
    assert all(x.is_deleted() for x in jax.tree.leaves(passed[2]))  # donation happened
    assert_bitwise(es.best_weights, snapshots[2])


def test_weights_donated_before_update_are_refused_naming_the_fix():
    """Weights read from a state that a later step donated cannot be copied: the error says
    so and names the fix, and the stopper state is unchanged (a pure function)."""
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=linear_params(jax.random.key(0)), tx=TX, ema=ema_jax.ema(0.5)
    )
    stale = state.params  # the state's own buffers
    state, _ = STEP(state, (jnp.ones((4, 3)), jnp.ones((4, 2))))
    stopper = ema_jax.EarlyStopping()
    es = stopper.init()
    with pytest.raises(ValueError, match=r"weights\['b'\] was deleted: .*the last step returned"):
        stopper.update(es, 1.0, stale)
    assert stopper.update(es, 1.0, state.params).best_epoch == 0


# A case built to separate the raw and the EMA monitors: training pulls the params toward
# the validation target for 3 epochs, then away from it, so the raw validation loss is
# lowest at epoch 2 and the lagging average's later.
RNG = np.random.default_rng(1)
X = [jnp.asarray(RNG.normal(size=(16, 3)), jnp.float32) for _ in range(4)]
W_VAL, W_AWAY = jnp.ones((3, 2)), -2.0 * jnp.ones((3, 2))
VAL = [(x, x @ W_VAL) for x in X[:2]]


def train_data(epoch):
    target = W_VAL if epoch < 3 else W_AWAY
    return [(x, x @ target) for x in X]


def fresh(decay):
    params = linear_params(jax.random.key(3))
    return ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.05), ema=ema_jax.ema(decay)
    )


def snapshots_by_epoch(decay, epochs):
    """Host copies of every epoch's raw and EMA weights, from a run without stopping."""
    kept = []

    def keep(epoch, record, state):
        kept.append(host_copy((state.params, state.ema_params)))

    history, _ = ema_jax.train_with_ema(
        fresh(decay), mse_loss, train_data, VAL, epochs=epochs, callback=keep
    )
    return history, kept


def assert_bitwise(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True)


def stopping_run(decay, **kwargs):
    """At most 30 epochs of the built case, with ``EarlyStopping(patience=2)``."""
    return ema_jax.train_with_ema(
        fresh(decay),
        mse_loss,
        train_data,
        VAL,
        epochs=30,
        early_stopping=ema_jax.EarlyStopping(patience=2),
        **kwargs,
    )


@pytest.fixture(scope="module")
def separated():
    out = stopping_run(0.8, monitor=("val_loss", "val_loss_ema"))
    return out, snapshots_by_epoch(0.8, 30)


def test_raw_and_ema_monitors_pick_different_weights(separated):
    """On the built case the two monitors choose different epochs, and each
    chosen set equals that epoch's weights of a run that did not stop, bitwise."""
    result, (full, kept) = separated
    history, stopping = result.history, result.stopping
    raw, ema = stopping[Raw()], stopping[Average()]
    assert raw.best_epoch == int(np.argmin(full["val_loss"][:5])) == 2
    assert ema.best_epoch > raw.best_epoch
    assert raw.stop and ema.stop
    assert_bitwise(raw.best_weights, kept[raw.best_epoch][0])
    assert_bitwise(ema.best_weights, kept[ema.best_epoch][1])
    assert not np.array_equal(ema.best_weights["w"], raw.best_weights["w"])
    # The run ran until both had stopped, and its history is that of the full run so far.
    epochs = len(history["val_loss"])
    assert epochs == max(raw.stopped_epoch, ema.stopped_epoch) + 1 < 30
    np.testing.assert_array_equal(history["val_loss_ema"], full["val_loss_ema"][:epochs])


def test_one_monitor_stops_the_run_at_its_stopped_epoch(separated):
    """One monitor has one state; training ends at its stop, and its
    best EMA weights equal those of a run of ``best_epoch + 1`` epochs."""
    _, (_, kept) = separated
    result = stopping_run(0.8)
    history, state = result
    assert list(result.stopping) == [Average()]  # the default, "val_loss_ema"
    es = result.stopping[Average()]
    assert isinstance(es, ema_jax.EarlyStoppingState) and es.stop
    assert len(history["train_loss"]) == es.stopped_epoch + 1
    _, short = ema_jax.train_with_ema(
        fresh(0.8), mse_loss, train_data, VAL, epochs=es.best_epoch + 1
    )
    assert_bitwise(es.best_weights, short.ema_params)
    assert_bitwise(state.ema_params, kept[es.stopped_epoch][1])


def test_best_ema_of_several_averages():
    """``best_ema`` picks, each epoch, the average with the lowest val_loss_ema; the weights
    kept are that average's; ``<key>[i]`` names one of them."""
    result = stopping_run((0.3, 0.9), monitor=["best_ema", "val_loss_ema[1]"])
    history, stopping = result.history, result.stopping
    per_average = np.asarray(history["val_loss_ema"])
    np.testing.assert_array_equal(history["best_ema_index"], per_average.argmin(axis=1))
    np.testing.assert_array_equal(history["best_ema"], per_average.min(axis=1))
    best, second = stopping[BestAverage()], stopping[Average(1)]
    _, kept = snapshots_by_epoch((0.3, 0.9), max(best.best_epoch, second.best_epoch) + 1)
    index = history["best_ema_index"][best.best_epoch]
    assert_bitwise(best.best_weights, kept[best.best_epoch][1][index])
    assert_bitwise(second.best_weights, kept[second.best_epoch][1][1])
    assert second.best_epoch == int(np.argmin(per_average[: second.stopped_epoch + 1, 1]))


BAD_MONITORS = {
    "unknown key": (
        "val_acc",
        0.8,
        "monitor='val_acc' is not a monitored value; choose from best_ema",
    ),
    "seconds": ("seconds", 0.8, "monitor='seconds' is not a monitored value"),
    "unindexed average of K": (
        "val_loss_ema",
        (0.3, 0.9),
        r"val_loss_ema is a list of 2.*val_loss_ema\[1\]",
    ),
    "index out of range": ("val_loss_ema[2]", (0.3, 0.9), "does not name one value"),
    "index on a number": ("val_loss[0]", 0.8, "does not name one value"),
    "typed: unknown metric": (
        Raw("val_acc"),
        0.8,
        r"reads history key 'val_acc', which this run does not record; it records train_loss",
    ),
    "typed: average out of range": (
        Average(2),
        (0.3, 0.9),
        r"names average 2, but the state keeps 2 averages \(indices 0..1\)",
    ),
    "typed: average of one decay": (Average(1), 0.8, "keeps 1 average "),
    "typed: raw of an average's key": (
        Raw("val_loss_ema"),
        0.8,
        r"val_loss_ema is the averages' value: use Average\(metric='val_loss'\)",
    ),
    "typed: best of an unknown metric": (
        BestAverage("val_acc"),
        (0.3, 0.9),
        "reads history key 'val_acc_ema'",
    ),
    "the same monitor twice": (
        ("val_loss_ema", Average()),
        0.8,
        r"monitor lists Average\(index=0, metric='val_loss'\) twice",
    ),
}
NOT_MONITORS = {"an int": 42, "None": None, "an empty tuple": (), "an int among": [Raw(), 3]}
CASES = {
    **{name: (*case[:2], ValueError, case[2]) for name, case in BAD_MONITORS.items()},
    **{name: (m, 0.8, TypeError, "monitor must be") for name, m in NOT_MONITORS.items()},
}


@pytest.mark.parametrize(("monitor", "decay", "error", "match"), CASES.values(), ids=CASES)
def test_bad_monitors_name_the_choices_before_training(monitor, decay, error, match):
    """Checked against the history the run will record before its first step (a
    ``ValueError``; a ``TypeError`` for what is no monitor): the state passed in is not
    donated."""
    state = fresh(decay)
    with pytest.raises(error, match=match):
        ema_jax.train_with_ema(
            state,
            mse_loss,
            train_data,
            VAL,
            epochs=2,
            early_stopping=ema_jax.EarlyStopping(),
            monitor=monitor,
        )
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))


def test_typed_monitors_stop_exactly_as_their_strings(separated):
    """``(Raw(), Average())`` is ``("val_loss", "val_loss_ema")``: the same stoppers, epochs
    and best weights, bitwise, keyed by the same typed monitors."""
    by_string = separated[0].stopping
    by_type = stopping_run(0.8, monitor=(Raw(), Average())).stopping
    assert list(by_type) == list(by_string) == [Raw(), Average()]
    for monitor, es in by_type.items():
        want = by_string[monitor]
        assert (es.best_epoch, es.stopped_epoch, es.best_metric) == (
            want.best_epoch,
            want.stopped_epoch,
            want.best_metric,
        )
        assert_bitwise(es.best_weights, want.best_weights)


def test_best_average_of_another_metric():
    """``BestAverage("val_mae")`` picks each epoch the average with the lowest
    ``val_mae_ema`` (history ``best_val_mae_ema`` and its ``_index``); ``Raw("train_loss")``
    watches the training loss."""

    def metrics(params, batch):
        x, y = batch
        err = x @ params["w"] + params["b"] - y
        return {"loss": jnp.mean(err**2), "mae": jnp.mean(jnp.abs(err))}

    result = ema_jax.train_with_ema(
        fresh((0.3, 0.9)),
        mse_loss,
        train_data,
        VAL,
        epochs=8,
        metric_fn=metrics,
        early_stopping=ema_jax.EarlyStopping(patience=100),
        monitor=(BestAverage("val_mae"), Raw("train_loss")),
    )
    history = result.history
    per_average = np.asarray(history["val_mae_ema"])
    np.testing.assert_array_equal(history["best_val_mae_ema_index"], per_average.argmin(axis=1))
    np.testing.assert_array_equal(history["best_val_mae_ema"], per_average.min(axis=1))
    best = result.stopping[BestAverage("val_mae")]
    assert best.best_metric == per_average.min()
    train = result.stopping[Raw("train_loss")]
    assert train.best_metric == min(history["train_loss"])


def _states(n):
    """``n`` states of one short run (distinct EMA params), non-donating steps."""
    step = ema_jax.make_train_step(mse_loss, donate=False)
    state, out = fresh(0.5), []
    for epoch in range(n):
        state, _ = step(state, train_data(epoch)[0])
        out.append(state)
    return out


@pytest.mark.parametrize(
    ("mode", "survivors", "best"), [("min", [1, 3, 5], 3), ("max", [0, 2, 4], 2)]
)
def test_orbax_keeps_the_best_n_steps(tmp_path, mode, survivors, best):
    """Real Orbax writes; with ``max_to_keep=2`` the two best-metric steps
    survive (a NaN ranks worst), and the latest step (to resume from) with them;
    ``step="best"`` loads the best one's EMA params."""
    from ema_jax import checkpoint

    metrics = [0.5, 0.2, 0.9, 0.1, NAN, 0.3] if mode == "min" else [0.5, 0.2, 0.9, 0.1, NAN]
    states = _states(len(metrics))
    with checkpoint.manager(tmp_path, max_to_keep=2, best_metric="val", best_mode=mode) as mngr:
        for i, (state, value) in enumerate(zip(states, metrics, strict=True)):
            assert checkpoint.save(mngr, i, state, metrics={"val": value, "other": 1.0})
        mngr.wait_until_finished()
        assert sorted(mngr.all_steps()) == survivors
        assert mngr.metrics(best) == {"val": metrics[best], "other": 1.0}
        with pytest.raises(ValueError, match="keeps the best steps by 'val'"):
            checkpoint.save(mngr, 10, states[0])
        with pytest.raises(ValueError, match="metrics has no 'val'"):
            checkpoint.save(mngr, 10, states[0], metrics={"loss": 1.0})
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == survivors
    assert_bitwise(checkpoint.load_ema_params(tmp_path, step="best"), states[best].ema_params)


def test_best_step_needs_a_best_metric_manager(tmp_path):
    from ema_jax import checkpoint

    with pytest.raises(ValueError, match="best_mode must be 'min' or 'max'"):
        checkpoint.manager(tmp_path / "x", best_metric="val", best_mode="auto")
    with checkpoint.manager(tmp_path, async_save=False) as mngr:
        checkpoint.save(mngr, 0, _states(1)[0])
    with pytest.raises(ValueError, match="not written by a manager with best_metric"):
        checkpoint.load_ema_params(tmp_path, step="best")
