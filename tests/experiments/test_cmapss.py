"""experiments.cmapss: preprocessing (the metrics: ``test_cmapss_metrics.py``; the file reader:
``test_cmapss_files.py``).

Preprocessing is checked against a loop-based float64 reference written here from the documented
rules (rounded-settings conditions, per-condition min-max to [−1, 1] on training engines, stride-1
windows with front padding, capped targets), plus small hand-built cases with hand-computed values.
Tests on NASA's real FD001 read it from ``$CMAPSS_DIR`` and skip when it is unset.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from experiments import cmapss, synthetic
from experiments.cmapss import RawSubset

LITERATURE_14 = (
    "s_2", "s_3", "s_4", "s_7", "s_8", "s_9", "s_11",
    "s_12", "s_13", "s_14", "s_15", "s_17", "s_20", "s_21",
)  # fmt: skip

CMAPSS_DIR = os.environ.get("CMAPSS_DIR")
needs_real = pytest.mark.skipif(
    not CMAPSS_DIR,
    reason="real C-MAPSS data not configured: set CMAPSS_DIR to the directory holding NASA's "
    "train_FD001.txt, test_FD001.txt, RUL_FD001.txt (.ci/run sets it to ../shared/data/cmapss)",
)


@cache
def small_raw(n_conditions: int = 1) -> RawSubset:
    return synthetic.generate(n_train=8, n_test=5, seed=3, n_conditions=n_conditions)


@cache
def real_fd001() -> RawSubset:
    assert CMAPSS_DIR
    return cmapss.read_subset(CMAPSS_DIR, "FD001")


def reference(raw: RawSubset, train_units, features, window: int, max_rul: float):
    """Plain-loop float64 preprocessing from the documented rules, for given split and features."""
    cols = [cmapss.COLUMNS.index(f) for f in features]

    def key(row):
        return (round(row[2]) + 0.0, round(row[3], 2) + 0.0, round(row[4]) + 0.0)

    lo: dict = {}
    hi: dict = {}
    for row in raw.train:
        if row[0] in train_units:
            k = key(row)
            lo[k] = [
                min(a, row[c]) for a, c in zip(lo.get(k, [np.inf] * len(cols)), cols, strict=True)
            ]
            hi[k] = [
                max(a, row[c]) for a, c in zip(hi.get(k, [-np.inf] * len(cols)), cols, strict=True)
            ]

    def scaled(row):
        k = key(row)
        return [2 * (row[c] - a) / (b - a) - 1 for c, a, b in zip(cols, lo[k], hi[k], strict=True)]

    def unit_windows(table, unit):
        rows = sorted((r for r in table if r[0] == unit), key=lambda r: r[1])
        x = [scaled(r) for r in rows]
        x = [x[0]] * max(0, window - len(x)) + x
        last = max(r[1] for r in rows)
        out = []
        for end in range(window, len(x) + 1):
            rul = last - rows[max(0, end - 1 - (len(x) - len(rows)))][1]
            out.append((x[end - window : end], min(max_rul, rul)))
        return out

    def split(units):
        pairs = [p for u in sorted(units) for p in unit_windows(raw.train, u)]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    test_units = sorted(set(raw.test[:, 0]))
    x_test = np.array([unit_windows(raw.test, u)[-1][0] for u in test_units])
    return split, x_test


@needs_real
def test_real_fd001_facts():
    raw = real_fd001()
    assert raw.train.shape == (20631, 26) and raw.train.dtype == np.float64
    assert raw.test.shape == (13096, 26)
    assert raw.rul.shape == (100,)
    assert len(np.unique(raw.train[:, 0])) == 100
    assert len(np.unique(raw.test[:, 0])) == 100
    assert raw.rul[:3].tolist() == [112.0, 98.0, 69.0]  # first lines of RUL_FD001.txt
    data = cmapss.prepare(raw)
    assert data.features == LITERATURE_14  # chosen by the std rule, not a list
    assert data.x_test.shape == (100, 30, 14)
    assert len(np.unique(data.unit_val)) == 20 and len(np.unique(data.unit_train)) == 80
    assert data.y_test.max() == 125.0 and data.y_train.max() == 125.0
    # every training engine ends in failure: one window per engine has target 0
    assert (data.y_train == 0).sum() == 80 and (data.y_val == 0).sum() == 20
    assert data.x_train.min() == -1.0 and data.x_train.max() == 1.0


# --- preprocessing -------------------------------------------------------------------------------


def test_prepare_matches_loop_reference():
    raw = small_raw()
    data = cmapss.prepare(raw, window=7, max_rul=60.0, val_fraction=0.25, seed=1)
    train_units, val_units = np.unique(data.unit_train), np.unique(data.unit_val)
    split, x_test = reference(raw, set(train_units), data.features, 7, 60.0)
    x_tr, y_tr = split(train_units)
    x_va, y_va = split(val_units)
    np.testing.assert_allclose(data.x_train, x_tr, atol=2e-6)
    np.testing.assert_array_equal(data.y_train, y_tr)
    np.testing.assert_allclose(data.x_val, x_va, atol=2e-6)
    np.testing.assert_array_equal(data.y_val, y_va)
    np.testing.assert_allclose(data.x_test, x_test, atol=2e-6)
    np.testing.assert_array_equal(data.y_test, np.minimum(60.0, raw.rul))
    for x in (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test):
        assert x.dtype == np.float32


def tiny_raw(train_lengths, test_lengths, rul) -> RawSubset:
    """Hand-built subset: s_2 = 10·cycle + unit (so windows are readable), s_3 = cycle², rest 0."""

    def table(lengths):
        rows = []
        for unit, n in enumerate(lengths, start=1):
            for cycle in range(1, n + 1):
                row = np.zeros(26)
                row[:5] = unit, cycle, 0.0, 0.0, 100.0
                row[6], row[7] = 10.0 * cycle + unit, cycle**2
                rows.append(row)
        return np.array(rows)

    return RawSubset(table(train_lengths), table(test_lengths), np.array(rul, float))


def test_windows_targets_caps_and_padding_by_hand():
    raw = tiny_raw([8, 6], [2, 6], [5.0, 40.0])
    data = cmapss.prepare(raw, window=4, max_rul=3.0, val_fraction=0.0)
    assert data.features == ("s_2", "s_3")  # the 19 all-zero sensors are dropped
    # unit 1 (8 cycles): windows end at cycles 4..8 → RUL 4,3,2,1,0, capped at 3; unit 2: 6 cycles
    assert data.y_train.tolist() == [3, 3, 2, 1, 0, 2, 1, 0]
    assert data.unit_train.tolist() == [1] * 5 + [2] * 3
    # s_2 spans 11..81 on the training rows; invert the [−1, 1] scaling to read raw values back
    s2 = (data.x_train[..., 0] + 1) / 2 * (81 - 11) + 11
    np.testing.assert_allclose(s2[0], [11, 21, 31, 41], atol=1e-4)  # first window of unit 1
    np.testing.assert_allclose(s2[-1], [32, 42, 52, 62], atol=1e-4)  # last window of unit 2
    # test: unit 1 has 2 cycles → padded at the front with its first row; unit 2: last 4 cycles
    t2 = (data.x_test[..., 0] + 1) / 2 * (81 - 11) + 11
    np.testing.assert_allclose(t2[0], [11, 11, 11, 21], atol=1e-4)
    np.testing.assert_allclose(t2[1], [32, 42, 52, 62], atol=1e-4)
    assert data.y_test.tolist() == [3.0, 3.0]  # true RUL 5 and 40, capped at max_rul = 3
    assert data.x_val.shape == (0, 4, 2) and data.y_val.shape == (0,)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    window=st.integers(1, 8),
    max_rul=st.floats(0.5, 20.0),
)
def test_window_counts_and_targets_property(lengths, window, max_rul):
    assume(sum(lengths) >= 4)  # fewer rows: every sensor is within its resolution (flicker)
    raw = tiny_raw(lengths, lengths, [3.0] * len(lengths))
    data = cmapss.prepare(raw, window=window, max_rul=max_rul, val_fraction=0.0)
    per_unit = [max(n - window + 1, 1) for n in lengths]
    assert data.unit_train.tolist() == [u for u, k in enumerate(per_unit, 1) for _ in range(k)]
    assert data.x_train.shape == (sum(per_unit), window, len(data.features))
    ends = np.cumsum(per_unit) - 1
    assert (data.y_train[ends] == 0).all()  # each engine's last window ends at failure
    expected = [min(max_rul, n - 1 - i) for n, k in zip(lengths, per_unit, strict=True)
                for i in range(n - k, n)]  # fmt: skip
    np.testing.assert_allclose(data.y_train, expected, rtol=1e-6)
    # the test input's last row is each test engine's last (scaled) row
    np.testing.assert_array_equal(data.x_test[:, -1], data.x_train[ends, -1])


def test_min_prefix_adds_padded_training_windows_by_hand():
    raw = tiny_raw([8, 6], [2, 6], [5.0, 40.0])
    plain = cmapss.prepare(raw, window=4, max_rul=10.0, val_fraction=0.0)
    data = cmapss.prepare(raw, window=4, max_rul=10.0, val_fraction=0.0, min_prefix=2)
    # each engine gains the windows ending at cycles 2 and 3 (RUL = life − cycle), before its own
    assert data.y_train.tolist() == [6, 5, 4, 3, 2, 1, 0, 4, 3, 2, 1, 0]
    assert data.unit_train.tolist() == [1] * 7 + [2] * 5
    s2 = (data.x_train[..., 0] + 1) / 2 * (81 - 11) + 11
    np.testing.assert_allclose(s2[:2], [[11, 11, 11, 21], [11, 11, 21, 31]], atol=1e-4)
    np.testing.assert_array_equal(data.x_train[2:7], plain.x_train[:5])  # then the usual ones
    np.testing.assert_array_equal(data.x_test, plain.x_test)  # test input is untouched


def test_min_prefix_leaves_validation_and_test_alone():
    raw = small_raw()
    plain = cmapss.prepare(raw, window=40, val_fraction=0.25, seed=1)
    data = cmapss.prepare(raw, window=40, val_fraction=0.25, seed=1, min_prefix=31)
    for name in ("x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(data, name), getattr(plain, name))
    assert len(data.x_train) == len(plain.x_train) + 9 * len(np.unique(plain.unit_train))


def test_cycle_feature_by_hand():
    raw = tiny_raw([8, 6], [2, 6], [5.0, 40.0])
    plain = cmapss.prepare(raw, window=4, max_rul=3.0, val_fraction=0.0)
    data = cmapss.prepare(raw, window=4, max_rul=3.0, val_fraction=0.0, cycle_feature=True)
    assert data.features == ("cycle", "s_2", "s_3")
    np.testing.assert_array_equal(data.x_train[..., 1:], plain.x_train)  # sensors unchanged
    cycle = (data.x_train[..., 0] + 1) / 2 * (8 - 1) + 1  # training cycles span 1..8
    np.testing.assert_allclose(cycle[0], [1, 2, 3, 4], atol=1e-5)  # unit 1's first window
    np.testing.assert_allclose(cycle[-1], [3, 4, 5, 6], atol=1e-5)  # unit 2's last window
    test_cycle = (data.x_test[..., 0] + 1) / 2 * (8 - 1) + 1
    np.testing.assert_allclose(test_cycle, [[1, 1, 1, 2], [3, 4, 5, 6]], atol=1e-5)  # padded
    assert data.y_train.tolist() == plain.y_train.tolist()


def test_short_training_unit_gives_one_padded_window():
    data = cmapss.prepare(tiny_raw([3, 9], [5], [1.0]), window=5, val_fraction=0.0)
    assert data.unit_train.tolist() == [1] + [2] * 5
    assert data.y_train[0] == 0.0  # its only window ends at its last (failure) cycle


def test_scaling_is_fitted_on_training_engines_only():
    raw = small_raw()
    data = cmapss.prepare(raw, val_fraction=0.25, seed=0)
    val = np.isin(raw.train[:, 0], np.unique(data.unit_val))
    train = raw.train.copy()
    train[np.ix_(val, range(5, 26))] *= 3.0  # wild validation engines
    test = raw.test.copy()
    test[test[:, 0] == 1, 5:] *= 3.0  # a test unit far out of range
    wild = cmapss.prepare(RawSubset(train, test, raw.rul), val_fraction=0.25, seed=0)
    assert wild.features == data.features
    np.testing.assert_array_equal(wild.x_train, data.x_train)
    np.testing.assert_array_equal(wild.x_test[1:], data.x_test[1:])
    assert np.abs(wild.x_test[0]).max() > 10  # out-of-range values pass through unclipped
    assert np.abs(wild.x_val).max() > 10
    # the training engines span exactly [−1, 1] per feature
    np.testing.assert_array_equal(data.x_train.min(axis=(0, 1)), -1.0)
    np.testing.assert_array_equal(data.x_train.max(axis=(0, 1)), 1.0)


def test_validation_split_is_by_engine_and_seeded():
    raw = synthetic.generate(n_train=20, n_test=2, seed=5)
    data = cmapss.prepare(raw, val_fraction=0.2, seed=7)
    train, val = set(data.unit_train.tolist()), set(data.unit_val.tolist())
    assert not train & val
    assert train | val == set(range(1, 21)) and len(val) == 4
    again = cmapss.prepare(raw, val_fraction=0.2, seed=7)
    np.testing.assert_array_equal(again.unit_val, data.unit_val)
    np.testing.assert_array_equal(again.x_val, data.x_val)
    vals = {tuple(np.unique(cmapss.prepare(raw, seed=s).unit_val)) for s in range(5)}
    assert len(vals) > 1  # the seed chooses the validation engines
    # every window of a validation engine is in the validation split
    lengths = {u: (raw.train[:, 0] == u).sum() for u in val}
    assert len(data.y_val) == sum(n - 30 + 1 for n in lengths.values())


def test_split_units_sizes():
    units = np.arange(1, 11)
    assert [len(p) for p in cmapss.split_units(units, 0.0, 0)] == [10, 0]
    assert [len(p) for p in cmapss.split_units(units, 0.01, 0)] == [9, 1]  # at least one
    assert [len(p) for p in cmapss.split_units(units, 0.5, 0)] == [5, 5]


@pytest.mark.parametrize(
    ("units", "fraction", "match"),
    [
        (np.arange(1, 11), -0.1, r"val_fraction must be in \[0, 1\)"),
        (np.arange(1, 11), 1.0, r"val_fraction must be in \[0, 1\)"),
        (np.array([1.0]), 0.5, "leaves no training engine"),
    ],
)
def test_split_units_rejects_bad_fractions(units, fraction, match):
    with pytest.raises(ValueError, match=match):
        cmapss.split_units(units, fraction, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "window must be an integer >= 1"),
        ({"window": 2.5}, "window must be an integer >= 1"),
        ({"max_rul": 0.0}, "max_rul must be a finite number > 0"),
        ({"max_rul": float("nan")}, "max_rul must be a finite number > 0"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"min_prefix": -1}, "min_prefix must be an integer >= 0"),
        ({"min_prefix": 2.0}, "min_prefix must be an integer >= 0"),
    ],
)
def test_prepare_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cmapss.prepare(small_raw(), **kwargs)


def test_constant_sensor_rule():
    rng = np.random.default_rng(0)
    n = 2000
    flicker = np.where(rng.random(n) < 0.02, 21.60, 21.61)  # like FD001's s_6
    integer = np.round(392 + 1.5 * rng.normal(size=n))  # like s_17: resolution 1, std ≈ 1.5
    fine = np.round(8.42 + 0.02 * rng.normal(size=n), 4)  # like s_15
    constant = np.full(n, 518.67)
    sensors = np.stack([flicker, integer, fine, constant], axis=1)
    keep = cmapss.informative_sensors(sensors, np.zeros(n, int))
    assert keep.tolist() == [False, True, True, False]
    # a sensor that differs between conditions but is constant within each is still constant
    cond = rng.integers(0, 3, size=n)
    by_condition = np.array([10.0, 20.0, 30.0])[cond]
    assert not cmapss.informative_sensors(by_condition[:, None], cond)[0]


def test_synthetic_default_keeps_the_literature_sensors():
    data = cmapss.load(None, seed=0)
    assert data.features == LITERATURE_14
    assert data.x_train.shape[1:] == (30, 14) and data.x_test.shape == (100, 30, 14)
    same = cmapss.prepare(synthetic.generate(seed=0), seed=0)
    np.testing.assert_array_equal(data.x_train, same.x_train)
    other = cmapss.load(None, seed=1, window=20)  # prepare kwargs pass through
    assert other.x_train.shape[1] == 20
    assert not np.array_equal(np.unique(other.unit_val), np.unique(data.unit_val))
    with pytest.raises(ValueError, match="synthetic default models FD001 only"):
        cmapss.load(None, "FD002")


def test_six_conditions_are_normalised_per_condition():
    raw = small_raw(n_conditions=6)
    keys = cmapss.operating_conditions(raw.train[:, 2:5])
    assert len(np.unique(keys, axis=0)) == 6
    data = cmapss.prepare(raw, window=7, max_rul=60.0, val_fraction=0.25, seed=1)
    assert data.features == LITERATURE_14  # constants per condition are still constant
    split, x_test = reference(raw, set(np.unique(data.unit_train)), data.features, 7, 60.0)
    np.testing.assert_allclose(data.x_train, split(np.unique(data.unit_train))[0], atol=2e-6)
    np.testing.assert_allclose(data.x_test, x_test, atol=2e-6)
    # per-condition scaling removes the condition effect: the scaled inputs track RUL, while a
    # single global min-max would leave them dominated by which condition the cycle flew in
    x_last = data.x_train[:, -1, :]
    corr = [abs(np.corrcoef(x_last[:, j], data.y_train)[0, 1]) for j in range(14)]
    assert np.median(corr) > 0.5
    rows = raw.train[np.isin(raw.train[:, 0], np.unique(data.unit_train))]
    life = np.array([rows[rows[:, 0] == r[0], 1].max() - r[1] for r in rows])
    cols = [cmapss.COLUMNS.index(f) for f in data.features]
    corr_global = [abs(np.corrcoef(rows[:, c], np.minimum(60, life))[0, 1]) for c in cols]
    assert np.median(corr_global) < 0.2


def test_all_constant_sensors_are_rejected():
    raw = tiny_raw([8, 6], [4], [1.0])
    train = raw.train.copy()
    train[:, 5:] = 1.0
    with pytest.raises(ValueError, match="no sensor varies"):
        cmapss.prepare(RawSubset(train, raw.test, raw.rul), window=3, val_fraction=0.0)


def test_unknown_test_condition_is_rejected():
    raw = small_raw()
    test = raw.test.copy()
    test[0, 2] = 42.0  # a flight condition no training row has
    with pytest.raises(ValueError, match=r"test engines has operating condition \(42\.0"):
        cmapss.prepare(RawSubset(raw.train, test, raw.rul))


def test_truncated_engines_is_a_test_like_validation_set_by_hand():
    """Training engines 1 (8 cycles) and 2 (6 cycles) cut at every cycle >= 3: one pseudo test
    unit per cut holding cycles 1..c, true RUL L - c; ``prepare`` then scores the last window of
    each cut, front-padded like a short test engine."""
    raw = tiny_raw([8, 6], [2, 6], [5.0, 40.0])
    pseudo = cmapss.truncated_engines(raw, np.array([2.0, 1.0]), min_cycles=3)
    assert pseudo.train is raw.train
    assert pseudo.rul.tolist() == [5, 4, 3, 2, 1, 0, 3, 2, 1, 0]  # engine 1: c = 3..8, then 2
    units, counts = np.unique(pseudo.test[:, 0], return_counts=True)
    assert units.tolist() == list(range(1, 11))
    assert counts.tolist() == [3, 4, 5, 6, 7, 8, 3, 4, 5, 6]
    np.testing.assert_array_equal(pseudo.test[pseudo.test[:, 0] == 4][:, 1:], raw.train[:6, 1:])
    data = cmapss.prepare(pseudo, window=4, max_rul=3.0, val_fraction=0.0)
    assert data.y_test.tolist() == [3, 3, 3, 2, 1, 0, 3, 2, 1, 0]
    t2 = (data.x_test[..., 0] + 1) / 2 * (81 - 11) + 11  # s_2 = 10·cycle + unit, unscaled
    np.testing.assert_allclose(t2[0], [11, 11, 21, 31], atol=1e-4)  # engine 1 cut at 3: padded
    np.testing.assert_allclose(t2[5], [51, 61, 71, 81], atol=1e-4)  # engine 1, full life
    np.testing.assert_allclose(t2[-1], [32, 42, 52, 62], atol=1e-4)  # engine 2, full life


@pytest.mark.parametrize(
    ("units", "min_cycles", "match"),
    [
        ([1.0], 0, "min_cycles must be an int >= 1"),
        ([7.0], 31, r"engine 7 is not in raw\.train"),
        ([1.0, 2.0], 9, "no engine among units has min_cycles=9"),
    ],
)
def test_truncated_engines_rejects_bad_arguments(units, min_cycles, match):
    raw = tiny_raw([8, 6], [2, 6], [5.0, 40.0])
    with pytest.raises(ValueError, match=match):
        cmapss.truncated_engines(raw, np.array(units), min_cycles=min_cycles)
