"""experiments.training: batches, the optimizer's schedules, the data a run loads, and the
progress it shows."""

import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax
from experiments import cmapss
from experiments.config import Config
from experiments.training import batches, load_data, optimizer, show_progress


def test_progress_shows_every_average(record, state_stub):
    """The bar and the per-epoch line name every variant's validation RMSE, not only the first
    average's."""

    class Bar:
        def __init__(self):
            self.postfix, self.lines, self.n = [], [], 0

        def set_postfix_str(self, text):
            self.postfix.append(text)

        def update(self, n):
            self.n += n

        def write(self, text):
            self.lines.append(text)

    bar = Bar()
    show = show_progress(bar, ["raw", "ema0.9", "ema0.99-debiased"])
    show(0, record((20.0, 18.0, 17.0)), state_stub({}, [{}, {}]))
    summary = "train 0.1000  val RMSE raw 20.00  ema0.9 18.00  ema0.99-debiased 17.00"
    assert bar.postfix == [summary] and bar.n == 1
    assert bar.lines == [f"epoch   1  {summary}  (0.5s)"]


def test_batches_shuffle_full_batches_or_keep_order():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.float32)
    shuffled = list(batches(x, y, 4, np.random.default_rng(0)))
    assert [len(b[1]) for b in shuffled] == [4, 4]  # the partial batch is dropped
    seen = np.concatenate([b[1] for b in shuffled])
    assert len(set(seen.tolist())) == 8
    np.testing.assert_array_equal(np.concatenate([b[0][:, 0] for b in shuffled]), seen)
    ordered = list(batches(x, y, 4, None))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in ordered]), y)


def _step_sizes(cfg, steps_per_epoch, n):
    """How far each of the first ``n`` steps moves a weight under a constant gradient: Adam's
    m̂/√v̂ is then 1, so each step moves it by the learning rate of that step."""
    tx = optimizer(cfg, steps_per_epoch=steps_per_epoch)
    params = jnp.zeros(2)
    state = tx.init(params)
    sizes = []
    for _ in range(n):
        updates, state = tx.update(jnp.ones(2), state, params)
        sizes.append(float(-updates[0]))
    return sizes


def test_lr_drop_multiplies_the_step_size_from_the_given_epoch():
    """lr for the first ``lr_drop_epoch`` epochs, lr·factor afterwards."""
    steps = _step_sizes(Config(lr=1e-2, lr_drop_epoch=2, lr_drop_factor=0.1), 3, 9)
    np.testing.assert_allclose(steps[:6], 1e-2, rtol=1e-4)
    np.testing.assert_allclose(steps[6:], 1e-3, rtol=1e-4)


def test_cosine_decays_the_step_size_to_zero_over_all_epochs():
    """``lr·½(1 + cos(π·t/T))`` with T = epochs · steps_per_epoch = 8 (closed form)."""
    steps = _step_sizes(Config(lr=1e-2, cosine=True, epochs=2), 4, 8)
    want = [1e-2 * 0.5 * (1 + np.cos(np.pi * t / 8)) for t in range(8)]
    np.testing.assert_allclose(steps, want, rtol=1e-4, atol=1e-9)


def test_load_data_applies_window_cap_and_smoothing(tiny_data_dir):
    """``window``/``max_rul``/``smooth`` reach ``cmapss.prepare``: window length, capped targets
    (test labels too), and causal smoothing (a window's smoothed values depend on its own and
    earlier cycles only, so its last row matches the hand recursion over the engine's past)."""
    data = str(tiny_data_dir)
    plain = cmapss.load(data, seed=0)
    ds = load_data(Config(data_dir=data, model="dcnn", window=12, max_rul=80.0, smooth=0.6))
    assert ds.x_train.shape[1:] == (12, plain.x_train.shape[2])
    assert ds.y_train.max() == 80.0 and ds.y_test.max() <= 80.0
    same = load_data(Config(data_dir=data, model="dcnn"))
    np.testing.assert_array_equal(same.x_train, plain.x_train)  # defaults: unchanged
    padded = load_data(Config(data_dir=data, model="dcnn", min_prefix=25))  # windows of 30
    assert len(padded.x_train) == len(plain.x_train) + 5 * len(np.unique(plain.unit_train))
    np.testing.assert_array_equal(padded.x_val, plain.x_val)
    aged = load_data(Config(data_dir=data, model="dcnn", cycle_feature=True))
    assert aged.features == ("cycle", *plain.features)
    np.testing.assert_array_equal(aged.x_train[..., 1:], plain.x_train)
    # the first engine's windows: the unsmoothed last rows are its scaled cycles
    unsmoothed = load_data(Config(data_dir=data, model="dcnn", window=12, max_rul=80.0))
    first = unsmoothed.unit_train == unsmoothed.unit_train[0]
    rows = np.concatenate([unsmoothed.x_train[first][0], unsmoothed.x_train[first][1:, -1]])
    expect = rows.astype(np.float64).copy()
    for t in range(1, len(expect)):
        expect[t] = 0.6 * expect[t - 1] + 0.4 * rows[t]
    got = ds.x_train[ds.unit_train == ds.unit_train[0]][:, -1]
    np.testing.assert_allclose(got, expect[11:], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cmapss.exponential_smoothing(rows, 0.0), rows)


def test_exponential_smoothing_rejects_a_factor_of_one():
    rows = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"smooth must be a number in \[0, 1\)"):
        cmapss.exponential_smoothing(rows, 1.0)


def test_bema_and_switch_runs_build_their_rules_and_name_their_variants():
    """``--bema`` trains with BEMA (variants raw, bema; its burn-in from
    ``bema_start_step``), ``--switch-ema`` keeps the decays' averages."""
    from experiments import training
    from experiments.config import Config

    cfg = Config(bema=True, bema_start_step=7, epochs=1, progress=False)
    assert cfg.variants == ["raw", "bema"]
    ds = training.load_data(cfg)
    _, state = training.build(cfg, ds, training.run_keys(0).init)
    assert isinstance(state.ema, ema_jax.BemaTransform)
    assert state.ema.decay.start_step == 7
    switch = Config(switch_ema=True, epochs=1, progress=False)
    assert switch.variants == ["raw", "ema0.999-debiased"]
