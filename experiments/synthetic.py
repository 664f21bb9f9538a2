"""Synthetic C-MAPSS-like run-to-failure fleet, the default data set when no real data is given.

Modelled on how C-MAPSS itself was made (Saxena et al., PHM08): every engine starts with its own
initial wear and manufacturing variation, its health degrades exponentially until a failure
threshold, and each sensor reads a baseline plus a degradation signature plus noise.

For engine i at cycle t = 1, 2, …::

    δᵢ(t) = w₀ᵢ + Aᵢ·(exp(t/τᵢ) − 1)                                   (degradation, 1 = failure)
    sensorⱼ = baseⱼ(condition) + mᵢⱼ + sigⱼ·δᵢ(t) + noise,  noise ~ N(0, σⱼ²)

with initial wear w₀ ~ U(0, 0.4), onset A = exp(N(−3.85, 0.3²)), time constant
τ = exp(N(ln 55, 0.2²)) and manufacturing offsets mᵢⱼ ~ N(0, (0.1·sigⱼ)²). The engine's last cycle
is the first with δ ≥ 1, so its last row has RUL 0 and its life is ⌈τ·ln(1 + (1 − w₀)/A)⌉: more
initial wear, shorter life. Calibration on NASA's FD001 (per sensor: early-life mean, shift from
early life to failure, cycle-to-cycle noise σ; fleet: lifetimes 128–362 cycles, mean 206, std 46):
averaged over seeds the synthetic fleet has lifetimes ≈ 116–358 cycles, mean ≈ 206, std ≈ 45, and
it reproduces the shift-to-noise ratios, the spread of
early-life readings (≈ 0.2 of the shift) and their correlation with life (≈ −0.2), and the shape of
the degradation knee (a sensor has moved ≈ 17% of its total shift 100 cycles before failure, ≈ 40%
at 50). 14 sensors are informative and 7 constant (s_6 flickers between 21.61 and 21.60 in 2% of
cycles, like FD001's). Values are rounded to the decimals NASA's files use. Test engines are
independent draws from the same fleet, stopped with a remaining life drawn uniformly from
5..min(150, 0.8·life) cycles (FD001's test RUL spans 7–145 and at least a fifth of each test
engine's life is observed); ``rul`` holds those remaining cycles.

``n_conditions=6`` places each cycle at one of FD002/FD004's six flight conditions (drawn
uniformly per cycle, as in those subsets), scaling each sensor's baseline by a fixed smooth
function of altitude, Mach and throttle: data for testing per-condition normalisation.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np

from experiments.cmapss_files import COLUMNS, RawSubset, check_subset

# Per sensor s_1..s_21, measured on FD001: early-life mean (first 20 cycles), shift from early life
# to failure, cycle-to-cycle noise std (std of first differences / √2), decimals in NASA's files.
_BASE = np.array(
    [518.67, 642.38, 1586.84, 1402.76, 14.62, 21.61, 553.95, 2388.058, 9056.0, 1.30, 47.35,
     521.91, 2388.056, 8137.37, 8.4183, 0.03, 392.26, 2388.0, 100.0, 38.933, 23.360]
)  # fmt: skip
_SHIFT = np.array(
    [0.0, 1.22, 14.6, 24.6, 0.0, 0.0, -2.32, 0.162, 39.5, 0.0, 0.747,
     -1.98, 0.166, 27.8, 0.0968, 0.0, 3.78, 0.0, 0.0, -0.462, -0.276]
)  # fmt: skip
_NOISE = np.array(
    [0.0, 0.30, 4.0, 4.0, 0.0, 0.0, 0.41, 0.030, 4.2, 0.0, 0.100,
     0.30, 0.030, 3.1, 0.020, 0.0, 0.90, 0.0, 0.0, 0.101, 0.061]
)  # fmt: skip
# The signature is the FD001 shift divided by the mean δ change between early life and the last
# 10 cycles under this model (≈ 0.77), so that the synthetic fleet shows FD001's shifts.
_SIGNATURE = _SHIFT * 1.3
_WEAR = 0.4  # w₀ ~ U(0, _WEAR)
_ONSET = (-3.85, 0.3)  # log A ~ N(mean, std)
_TAU = (float(np.log(55.0)), 0.2)  # log τ ~ N(mean, std)
_MAKE = 0.1  # manufacturing offset std, as a fraction of the signature
_RUL = (5, 150, 0.8)  # test RUL ~ U{5, …, min(150, 0.8·life)}
_SENSOR_DECIMALS = np.array([2] * 14 + [4, 2, 0, 0, 2, 2, 4])
_SETTING_DECIMALS = np.array([4, 4, 1])
_SETTING_JITTER = np.array([0.0022, 0.0003, 0.0])
_FLICKER = 5, 0.02, -0.01  # s_6 reads 0.01 lower in 2% of cycles
# FD002/FD004 flight conditions: altitude (kft), Mach, throttle resolver angle.
_CONDITIONS = np.array(
    [[0.0, 0.0, 100.0], [10.0, 0.25, 100.0], [20.0, 0.70, 100.0],
     [25.0, 0.62, 60.0], [35.0, 0.84, 100.0], [42.0, 0.84, 100.0]]
)  # fmt: skip


def _condition_factors() -> np.ndarray:
    """[6, 21] baseline multipliers: a fixed smooth response to altitude, Mach and throttle."""
    response = np.random.default_rng(20080101).uniform(-0.3, 0.3, size=(3, 21))
    x = np.stack([_CONDITIONS[:, 0] / 42.0, _CONDITIONS[:, 1], _CONDITIONS[:, 2] / 100.0 - 1.0], 1)
    return 1.0 + x @ response


_FACTORS = _condition_factors()


def _engine(rng: np.random.Generator, unit: int, n_conditions: int) -> np.ndarray:
    """One engine run to failure: [cycles, 26] float64, unrounded."""
    w0 = rng.uniform(0.0, _WEAR)
    onset = np.exp(rng.normal(*_ONSET))
    tau = np.exp(rng.normal(*_TAU))
    life = int(np.ceil(tau * np.log1p((1.0 - w0) / onset)))
    t = np.arange(1, life + 1, dtype=np.float64)
    health = w0 + onset * np.expm1(t / tau)
    offset = rng.normal(0.0, _MAKE, size=21) * _SIGNATURE
    cond = rng.integers(0, n_conditions, size=life) if n_conditions > 1 else np.zeros(life, int)
    base = _BASE * _FACTORS[cond] if n_conditions > 1 else _BASE[None, :]
    sensors = base + offset + health[:, None] * _SIGNATURE + rng.normal(size=(life, 21)) * _NOISE
    j, p, step = _FLICKER
    sensors[:, j] += step * (rng.random(life) < p)
    settings = _CONDITIONS[cond] if n_conditions > 1 else np.array([[0.0, 0.0, 100.0]])
    settings = settings + rng.normal(size=(life, 3)) * _SETTING_JITTER
    return np.column_stack([np.full(life, unit), t, settings, sensors])


def _round(table: np.ndarray) -> np.ndarray:
    decimals = np.concatenate([[0, 0], _SETTING_DECIMALS, _SENSOR_DECIMALS])
    scale = 10.0**decimals
    return np.rint(table * scale) / scale


def generate(
    *, n_train: int = 100, n_test: int = 100, seed: int = 0, n_conditions: int = 1
) -> RawSubset:
    """A synthetic FD001-like subset (see the module docstring); deterministic for a seed."""
    for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if n_conditions not in (1, 6):
        raise ValueError(
            f"n_conditions must be 1 (FD001/FD003) or 6 (FD002/FD004), got {n_conditions!r}"
        )
    rng = np.random.default_rng(seed)
    train = np.concatenate([_engine(rng, u, n_conditions) for u in range(1, n_train + 1)])
    tests, rul = [], []
    for u in range(1, n_test + 1):
        engine = _engine(rng, u, n_conditions)
        low, high, most = _RUL
        left = int(rng.integers(low, max(low, min(high, int(most * len(engine)))) + 1))
        tests.append(engine[: len(engine) - left])
        rul.append(left)
    return RawSubset(
        train=_round(train), test=_round(np.concatenate(tests)), rul=np.array(rul, np.float64)
    )


def write(directory: str | PathLike[str], raw: RawSubset, subset: str = "FD001") -> None:
    """Write ``raw`` as NASA's three files ``{train,test,RUL}_<subset>.txt`` in ``directory``.

    Same format as NASA's: space-separated, integer unit, cycle and RUL, each other column with
    the fixed decimals NASA's files use, rows ending in two spaces (RUL rows in one). Values are
    rounded to those decimals, so the round trip through
    :func:`experiments.cmapss_files.read_subset` is exact for data on NASA's grid
    (:func:`generate`'s output; NASA's FD001 files are even reproduced byte for byte). Creates
    the directory.
    """
    check_subset(subset)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    formats = ["%d", "%d", *(f"%.{d}f" for d in _SETTING_DECIMALS)]
    formats += [f"%.{d}f" for d in _SENSOR_DECIMALS]
    assert len(formats) == len(COLUMNS)
    for part, table in (("train", raw.train), ("test", raw.test)):
        np.savetxt(
            directory / f"{part}_{subset}.txt", table, fmt=formats, delimiter=" ", newline="  \n"
        )
    np.savetxt(directory / f"RUL_{subset}.txt", raw.rul, fmt="%d", newline=" \n")
