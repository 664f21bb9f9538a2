"""NASA C-MAPSS turbofan run-to-failure data: reader, standard preprocessing, RUL metrics.

C-MAPSS (Saxena et al., PHM08) ships four subsets FD001–FD004, each as three whitespace-separated
text files: ``train_FD00x.txt`` (engines run to failure), ``test_FD00x.txt`` (engines stopped some
time before failure) and ``RUL_FD00x.txt`` (the true remaining useful life after each test engine's
last cycle). Every row is one operational cycle with 26 columns (:data:`COLUMNS`). The files
and their reader are :mod:`experiments.cmapss_files` (re-exported here); without a data folder,
:func:`load` uses the synthetic fleet of :mod:`experiments.synthetic`.

:func:`prepare` applies the preprocessing that is standard in the deep-learning RUL literature
(Babu et al. 2016; Li et al. 2018), every choice documented where it is made:

* **Operating conditions.** Rows are grouped by their rounded operational settings (one condition
  in FD001/FD003, six in FD002/FD004); scaling and the constant-sensor test are done per condition.
* **Sensors only.** The features are sensor columns; the settings only select the condition.
  Optionally (``cycle_feature``; off by default) the engine's cycle count is a feature too,
  scaled like the sensors: how long an engine has run is known at test time and tells the
  model where it sits in the life distribution, which 30–40 cycles of sensors alone do not.
* **Constant sensors dropped.** A sensor whose within-condition training std is below its recording
  resolution never moves by more than rounding flicker and carries no signal (FD001: s_1, s_5,
  s_6, s_10, s_16, s_18, s_19 go, the literature's 14 remain).
* **Min-max scaling to [−1, 1]** (as in Li et al. 2018), per condition, fitted on the training
  engines only — never on validation or test rows, whose values may therefore leave [−1, 1].
* **Piecewise-linear target** ``min(max_rul, cycles to failure)`` (Heimes 2008): early in life
  the RUL is not observable from the sensors, so it is held at ``max_rul`` = 125.
* **Sliding windows** of ``window`` = 30 cycles with stride 1, labelled with the target at their
  last cycle. A unit shorter than the window is padded at the front by repeating its first row
  (the engine is assumed to have run as at its first recorded cycle).
* **Test input** is the last window of each test engine, its label the true RUL capped at
  ``max_rul`` like the literature (so test RMSE is comparable with published numbers).
* **Optional smoothing** (``smooth`` = a > 0; off by default): each engine's scaled sensors
  are smoothed causally, ``s_t = a·s_(t−1) + (1 − a)·x_t`` from ``s_0 = x_0``, so a window
  only ever sees its own and earlier cycles (no look-ahead into the future of a test engine).
* **Optional short prefixes** (``min_prefix`` = m > 0; off by default): the *training* set
  also gets, for each training engine, the front-padded windows that end at cycles
  ``m, …, window − 1`` — what a test engine stopped that early looks like (FD001's shortest
  test engine has 31 cycles, so windows longer than 31 pad some test inputs that plain
  stride-1 training windows never show the model). Validation windows stay standard.
* **Validation** is a seeded split of the training *engines* (never of windows: windows of one
  engine overlap, so a window split would leak).

Metrics: :func:`rmse` and the asymmetric PHM08 challenge score :func:`phm08_score`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike

import numpy as np

from experiments.cmapss_files import (
    COLUMNS,
    CYCLE,
    SENSOR_OFFSET,
    SENSORS,
    SETTING_COLUMNS,
    SETTINGS,
    UNIT,
    DataFileError,
    RawSubset,
    check_subset,
    read_subset,
)
from experiments.config import COUNT, FRACTION, INDEX, POSITIVE, SUBSETS
from experiments.synthetic import generate

CONDITION_DECIMALS: tuple[int, int, int] = (0, 2, 0)
"""Rounding of (setting_1, setting_2, setting_3) that names an operating condition: the six
FD002/FD004 flight conditions sit at altitudes 0/10/20/25/35/42 kft, Mach 0/0.25/0.62/0.70/0.84
and TRA 60/100, while the recorded settings jitter by less than 0.01 around them."""


@dataclass(frozen=True)
class Dataset:
    """Windows and capped RUL targets ready for a model (see the module docstring)."""

    x_train: np.ndarray  # [N, window, F] float32: training engines minus validation engines
    y_train: np.ndarray  # [N] float32: min(max_rul, cycles to failure) at each window's end
    x_val: np.ndarray  # [Nv, window, F] float32: every window of the validation engines
    y_val: np.ndarray  # [Nv] float32
    x_test: np.ndarray  # [test units, window, F] float32: last window of each test engine
    y_test: np.ndarray  # [test units] float32: true RUL capped at max_rul
    features: tuple[str, ...]  # kept sensor names, in file order (s_2, s_3, ... for FD001)
    max_rul: float
    unit_train: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [N] engine
    unit_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [Nv] engine
    unit_test: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [test units]


def _check_table(name: str, table: np.ndarray) -> None:
    if table.ndim != 2 or table.shape[1] != len(COLUMNS):
        raise ValueError(
            f"{name} must have shape [rows, {len(COLUMNS)}] (columns {COLUMNS[0]}..{COLUMNS[-1]}),"
            f" got {table.shape}"
        )
    if table.shape[0] == 0:
        raise ValueError(f"{name} has no rows")


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    """Root-mean-square error ``sqrt(mean((pred − true)²))``, computed in float64."""
    d = _difference(pred, true)
    return float(np.sqrt(np.mean(d**2)))


def phm08_score(pred: np.ndarray, true: np.ndarray) -> float:
    """PHM08 challenge score ``Σ s(d)``, d = pred − true, lower is better (Saxena et al. 2008).

    ``s(d) = exp(−d/13) − 1`` for d < 0 (early prediction) and ``exp(d/10) − 1`` for d ≥ 0:
    late predictions, which would let an engine fly past its failure, cost more.
    """
    d = _difference(pred, true)
    return float(np.sum(np.where(d < 0, np.expm1(-d / 13.0), np.expm1(d / 10.0))))


def _difference(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same shape, got {p.shape} and {t.shape}")
    if p.size == 0:
        raise ValueError("pred and true must not be empty")
    return p - t


def operating_conditions(settings: np.ndarray) -> np.ndarray:
    """Condition keys ``[rows, 3]``: the settings rounded by :data:`CONDITION_DECIMALS`."""
    keys = np.stack([np.round(settings[:, i], d) for i, d in enumerate(CONDITION_DECIMALS)], axis=1)
    return keys + 0.0  # −0.0 → 0.0, so that a jitter around 0 gives one key


def _condition_index(keys: np.ndarray, known: np.ndarray, name: str) -> np.ndarray:
    """Index of each row's key in ``known`` (sorted unique training keys)."""
    match = np.all(keys[:, None, :] == known[None, :, :], axis=-1)
    unknown = ~match.any(axis=1)
    if unknown.any():
        raise ValueError(
            f"{name} has operating condition {tuple(keys[unknown][0].tolist())} (rounded settings)"
            f" that no training row has; training conditions: {[tuple(k) for k in known.tolist()]}"
        )
    return np.argmax(match, axis=1)


def _resolution(values: np.ndarray) -> float:
    """Smallest step between distinct recorded values (inf for a single value)."""
    steps = np.diff(np.unique(values))
    steps = steps[steps > 1e-9 * max(1.0, float(np.max(np.abs(values))))]
    return float(steps.min()) if steps.size else np.inf


def informative_sensors(sensors: np.ndarray, condition: np.ndarray) -> np.ndarray:
    """Boolean mask of the sensors that vary by more than their recording resolution.

    A sensor is constant when the std of its readings after removing each operating condition's
    mean is below the smallest step between its recorded values: it then only flickers between
    neighbouring rounded values (FD001's s_6 reads 21.61, and 21.60 in 2% of rows).
    """
    n_cond = int(condition.max()) + 1
    counts = np.bincount(condition, minlength=n_cond)[:, None]
    means = np.zeros((n_cond, sensors.shape[1]))
    np.add.at(means, condition, sensors)
    residual = sensors - (means / counts)[condition]
    std = residual.std(axis=0)
    resolution = np.array([_resolution(sensors[:, j]) for j in range(sensors.shape[1])])
    return std >= resolution


def _windows(rows: np.ndarray, window: int) -> np.ndarray:
    """All stride-1 windows ``[max(len − window + 1, 1), window, F]`` of one unit's rows.

    A unit shorter than ``window`` is padded at the front with copies of its first row.
    """
    if len(rows) < window:
        rows = np.concatenate([np.repeat(rows[:1], window - len(rows), axis=0), rows])
    view = np.lib.stride_tricks.sliding_window_view(rows, window, axis=0)  # [n, F, window]
    return view.transpose(0, 2, 1)


def exponential_smoothing(rows: np.ndarray, a: float) -> np.ndarray:
    """Causal exponential smoothing along axis 0: ``s_0 = x_0``, ``s_t = a·s_(t−1) + (1 − a)·x_t``.

    ``a = 0`` returns the rows unchanged; ``a`` must lie in [0, 1).
    """
    FRACTION.check("smooth", a)
    if a == 0.0:
        return rows
    out = np.array(rows, dtype=np.float64, copy=True)
    for t in range(1, len(out)):
        out[t] = a * out[t - 1] + (1.0 - a) * out[t]
    return out


def _units(table: np.ndarray) -> list[np.ndarray]:
    """Row indices of each unit, units ascending, rows in cycle order."""
    if not len(table):
        return []
    order = np.lexsort((table[:, CYCLE], table[:, UNIT]))  # by unit, then cycle
    _, starts = np.unique(table[order, UNIT], return_index=True)
    return np.split(order, starts[1:])


def split_units(units: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded engine-level split: ``(train_units, val_units)``, each sorted.

    ``round(val_fraction · n)`` engines (at least one when ``val_fraction > 0``) are validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    units = np.unique(units)
    n_val = max(1, round(val_fraction * len(units))) if val_fraction > 0 else 0
    if n_val >= len(units):
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training engine out of {len(units)}"
        )
    val = np.sort(np.random.default_rng(seed).choice(units, size=n_val, replace=False))
    return np.setdiff1d(units, val), val


def truncated_engines(raw: RawSubset, units: np.ndarray, min_cycles: int = 31) -> RawSubset:
    """``raw`` with its test set replaced by the given *training* engines cut off at every
    cycle ``c ≥ min_cycles``, like NASA cut its test engines: one pseudo test unit per
    ``(engine, c)`` holding cycles ``1..c``, true RUL ``L − c`` (``L`` the engine's life).

    Passed to :func:`prepare` with the same split seed, its test windows are a *test-like
    validation set*: every window length is scored on the same endpoints, short prefixes
    front-padded exactly as short test engines are (31 is FD001's shortest test engine).
    """
    is_int = isinstance(min_cycles, int | np.integer) and not isinstance(min_cycles, bool)
    if not is_int or min_cycles < 1:
        raise ValueError(f"min_cycles must be an int >= 1, got {min_cycles!r}")
    pieces: list[np.ndarray] = []
    rul: list[int] = []
    for unit in np.unique(units):
        rows = raw.train[raw.train[:, UNIT] == unit]
        if not len(rows):
            raise ValueError(f"units: engine {unit:g} is not in raw.train")
        for c in range(min_cycles, len(rows) + 1):
            piece = rows[:c].copy()
            piece[:, UNIT] = len(rul) + 1
            pieces.append(piece)
            rul.append(len(rows) - c)
    if not pieces:
        raise ValueError(f"no engine among units has min_cycles={min_cycles} cycles")
    return RawSubset(train=raw.train, test=np.concatenate(pieces), rul=np.asarray(rul, float))


def check_preprocessing(*, window: int, max_rul: float, smooth: float, min_prefix: int) -> None:
    """Raise a ``ValueError`` naming the first of :func:`prepare`'s options out of range;
    the ranges are those of the same fields of :class:`experiments.config.Config`."""
    COUNT.check("window", window)
    POSITIVE.check("max_rul", max_rul)
    FRACTION.check("smooth", smooth)
    INDEX.check("min_prefix", min_prefix)


def prepare(
    raw: RawSubset,
    *,
    window: int = 30,
    max_rul: float = 125.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    smooth: float = 0.0,
    min_prefix: int = 0,
    cycle_feature: bool = False,
) -> Dataset:
    """Standard preprocessing of one subset (each step documented in the module docstring).

    ``smooth`` > 0 adds causal exponential smoothing of each engine's scaled sensors
    (:func:`exponential_smoothing`); the default 0 leaves them as recorded. ``min_prefix`` > 0
    adds the padded training windows of each engine's first ``min_prefix … window − 1`` cycles
    (module docstring); the default 0 adds none. ``cycle_feature`` adds the cycle count as the
    first feature (named ``"cycle"``), min-max scaled on the training engines like a sensor.

    ``seed`` only chooses the validation engines. Constant sensors, the per-condition min/max and
    the condition list are all computed from the training engines (after removing the validation
    engines), so no validation or test value influences the inputs.
    """
    check_preprocessing(window=window, max_rul=max_rul, smooth=smooth, min_prefix=min_prefix)
    _check_table("raw.train", raw.train)
    _check_table("raw.test", raw.test)
    train_units, val_units = split_units(raw.train[:, UNIT], val_fraction, seed)

    fit_rows = raw.train[np.isin(raw.train[:, UNIT], train_units)]
    known = np.unique(operating_conditions(fit_rows[:, SETTING_COLUMNS]), axis=0)
    fit_cond = _condition_index(operating_conditions(fit_rows[:, SETTING_COLUMNS]), known, "train")
    sensors = slice(SENSOR_OFFSET, SENSOR_OFFSET + len(SENSORS))
    keep = informative_sensors(fit_rows[:, sensors], fit_cond)
    columns = np.arange(SENSOR_OFFSET, SENSOR_OFFSET + len(SENSORS))[keep]
    if not columns.size:
        raise ValueError("no sensor varies on the training engines: nothing to learn from")
    if cycle_feature:
        columns = np.concatenate([[CYCLE], columns])

    lo = np.full((len(known), len(columns)), np.inf)
    hi = np.full((len(known), len(columns)), -np.inf)
    np.minimum.at(lo, fit_cond, fit_rows[:, columns])
    np.maximum.at(hi, fit_cond, fit_rows[:, columns])
    span = np.where(hi > lo, hi - lo, 1.0)

    def scale(table: np.ndarray, name: str) -> np.ndarray:
        cond = _condition_index(operating_conditions(table[:, SETTING_COLUMNS]), known, name)
        return 2.0 * (table[:, columns] - lo[cond]) / span[cond] - 1.0

    def windows(
        units: np.ndarray, name: str, prefixes: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = raw.train[np.isin(raw.train[:, UNIT], units)]
        x = scale(table, name)
        xs, ys, us = [], [], []
        for rows in _units(table):
            cycles = table[rows, CYCLE]
            target = np.minimum(max_rul, cycles.max() - cycles)
            series = exponential_smoothing(x[rows], smooth)
            last_prefix = min(window, len(rows)) if prefixes and min_prefix else 0
            ends = np.arange(min_prefix, last_prefix)  # empty unless prefixes are asked for
            full = _windows(series, window)
            xs.append(np.concatenate([*(_windows(series[:c], window) for c in ends), full]))
            ys.append(np.concatenate([target[ends - 1], target[-len(full) :]]))
            us.append(np.full(len(xs[-1]), table[rows[0], UNIT], np.int32))
        if not xs:
            return np.zeros((0, window, len(columns))), np.zeros(0), np.zeros(0, np.int32)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(us)

    x_train, y_train, unit_train = windows(train_units, "training engines", prefixes=True)
    x_val, y_val, unit_val = windows(val_units, "validation engines")

    x = scale(raw.test, "test engines")
    test_rows = _units(raw.test)
    if len(test_rows) != len(raw.rul):
        raise ValueError(
            f"raw.rul must hold one value per test unit ({len(test_rows)}), got {len(raw.rul)}"
        )
    x_test = np.stack(
        [_windows(exponential_smoothing(x[rows], smooth), window)[-1] for rows in test_rows]
    )
    unit_test = np.array([raw.test[rows[0], UNIT] for rows in test_rows], np.int32)

    f32 = np.float32
    return Dataset(
        x_train=np.ascontiguousarray(x_train, f32),
        y_train=y_train.astype(f32),
        x_val=np.ascontiguousarray(x_val, f32),
        y_val=y_val.astype(f32),
        x_test=np.ascontiguousarray(x_test, f32),
        y_test=np.minimum(max_rul, raw.rul).astype(f32),
        features=tuple(COLUMNS[c] for c in columns),
        max_rul=float(max_rul),
        unit_train=unit_train,
        unit_val=unit_val,
        unit_test=unit_test,
    )


def load(
    data_dir: str | PathLike[str] | None = None,
    subset: str = "FD001",
    *,
    seed: int = 0,
    **prepare_kwargs: object,
) -> Dataset:
    """:func:`read_subset` then :func:`prepare`; ``data_dir=None`` uses the synthetic default.

    The synthetic default is one fixed FD001-like fleet (:func:`experiments.synthetic.generate`
    with seed 0), like a real data set: ``seed`` only picks the validation engines.
    """
    check_subset(subset)
    if data_dir is None:
        if subset != "FD001":
            raise ValueError(
                f"the synthetic default models FD001 only; pass data_dir for subset={subset!r}"
            )
        raw = generate(seed=0)
    else:
        raw = read_subset(data_dir, subset)
    return prepare(raw, seed=seed, **prepare_kwargs)  # type: ignore[arg-type]


__all__ = [
    "COLUMNS",
    "SENSORS",
    "SETTINGS",
    "SUBSETS",
    "DataFileError",
    "Dataset",
    "RawSubset",
    "exponential_smoothing",
    "informative_sensors",
    "load",
    "operating_conditions",
    "phm08_score",
    "prepare",
    "read_subset",
    "rmse",
    "split_units",
    "truncated_engines",
]
