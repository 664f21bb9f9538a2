"""The synthetic C-MAPSS-like fleet: determinism, file round trip, structure, calibration, and a
learnability probe (ridge regression on window summaries).

With ``$CMAPSS_DIR`` set, the synthetic fleet's statistics are printed beside NASA's FD001 and
compared with it (run with ``-s`` to see the table).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from experiments import cmapss, synthetic
from experiments.cmapss import RawSubset

CONSTANT = ("s_1", "s_5", "s_6", "s_10", "s_16", "s_18", "s_19")


@cache
def default() -> RawSubset:
    return synthetic.generate(seed=0)


def lifetimes(table: np.ndarray) -> np.ndarray:
    return np.array([(table[:, 0] == u).sum() for u in np.unique(table[:, 0])])


def fleet_stats(raw: RawSubset) -> dict[str, float]:
    """Summary statistics that describe a C-MAPSS-like subset (computed the same way for both)."""
    life = lifetimes(raw.train)
    seen = lifetimes(raw.test)
    units = np.unique(raw.train[:, 0])
    cols = [cmapss.COLUMNS.index(f"s_{i}") for i in (2, 3, 4, 7, 11, 12, 15, 17, 20, 21)]
    early = np.array([raw.train[raw.train[:, 0] == u][:20, cols].mean(0) for u in units])
    late = np.array([raw.train[raw.train[:, 0] == u][-10:, cols].mean(0) for u in units])
    noise = np.mean(
        [np.diff(raw.train[raw.train[:, 0] == u][:100, cols], axis=0).std(0) for u in units], 0
    ) / np.sqrt(2)
    shift = late.mean(0) - early.mean(0)
    corr = [np.corrcoef(early[:, k] * np.sign(shift[k]), life)[0, 1] for k in range(len(cols))]
    return {
        "train rows": len(raw.train),
        "test rows": len(raw.test),
        "life min": life.min(),
        "life max": life.max(),
        "life mean": life.mean(),
        "life std": life.std(),
        "test cycles mean": seen.mean(),
        "test RUL min": raw.rul.min(),
        "test RUL max": raw.rul.max(),
        "test RUL mean": raw.rul.mean(),
        "median |shift|/noise": float(np.median(np.abs(shift) / noise)),
        "median early spread/|shift|": float(np.median(early.std(0) / np.abs(shift))),
        "median corr(early wear, life)": float(np.median(corr)),
    }


def linear_rmse(data: cmapss.Dataset) -> tuple[float, float]:
    """Validation and test RMSE of ridge regression on window summaries: a learnability probe."""

    def feats(x):
        last, first = x[:, -10:].mean(1), x[:, :10].mean(1)
        return np.concatenate([last, x.mean(1), last - first, np.ones((len(x), 1))], 1)

    a = feats(data.x_train).astype(np.float64)
    w = np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ data.y_train)
    return (
        cmapss.rmse(feats(data.x_val) @ w, data.y_val),
        cmapss.rmse(feats(data.x_test) @ w, data.y_test),
    )


def test_generate_is_deterministic_for_a_seed():
    a, b = (
        synthetic.generate(n_train=5, n_test=3, seed=11),
        synthetic.generate(n_train=5, n_test=3, seed=11),
    )
    for x, y in ((a.train, b.train), (a.test, b.test), (a.rul, b.rul)):
        np.testing.assert_array_equal(x, y)
    c = synthetic.generate(n_train=5, n_test=3, seed=12)
    assert c.train.shape != a.train.shape or not np.array_equal(c.train, a.train)


@pytest.mark.parametrize("n_conditions", [1, 6])
def test_round_trip_through_nasa_files_is_exact(tmp_path: Path, n_conditions: int):
    raw = synthetic.generate(n_train=12, n_test=9, seed=4, n_conditions=n_conditions)
    subset = "FD001" if n_conditions == 1 else "FD002"
    synthetic.write(tmp_path / "data", raw, subset)
    back = cmapss.read_subset(tmp_path / "data", subset)
    for x, y in ((raw.train, back.train), (raw.test, back.test), (raw.rul, back.rul)):
        assert x.dtype == y.dtype == np.float64
        np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(
    not os.environ.get("CMAPSS_DIR"),
    reason="real C-MAPSS data not configured: set CMAPSS_DIR to round-trip NASA's FD001",
)
def test_real_fd001_round_trips_through_write(tmp_path: Path):
    real = cmapss.read_subset(os.environ["CMAPSS_DIR"], "FD001")
    synthetic.write(tmp_path, real)
    for part in ("train", "test", "RUL"):  # byte for byte NASA's files
        name = f"{part}_FD001.txt"
        assert (tmp_path / name).read_bytes() == (
            Path(os.environ["CMAPSS_DIR"]) / name
        ).read_bytes()
    back = cmapss.read_subset(tmp_path)
    for x, y in ((real.train, back.train), (real.test, back.test), (real.rul, back.rul)):
        np.testing.assert_array_equal(x, y)


def test_written_files_look_like_nasas(tmp_path: Path):
    synthetic.write(tmp_path, default())
    first = (tmp_path / "train_FD001.txt").read_text().splitlines()[0].split(" ")
    assert len(first) == 28 and first[-2:] == ["", ""]  # 26 fields, NASA's two trailing spaces
    assert first[:2] == ["1", "1"] and first[4] == "100.0" and first[5] == "518.67"
    assert len(first[24].split(".")[1]) == 2 and len(first[25].split(".")[1]) == 4
    rul = (tmp_path / "RUL_FD001.txt").read_text().splitlines()
    assert len(rul) == 100 and all(line.strip().isdigit() for line in rul)


def test_structure_of_the_default_fleet():
    raw = default()
    assert len(np.unique(raw.train[:, 0])) == 100 and len(np.unique(raw.test[:, 0])) == 100
    assert raw.rul.shape == (100,)
    for table in (raw.train, raw.test):
        for u in np.unique(table[:, 0]):
            cycles = table[table[:, 0] == u, 1]
            np.testing.assert_array_equal(cycles, np.arange(1, len(cycles) + 1))
    assert raw.rul.min() >= 1  # test engines stop before failure
    # 7 constant sensors (s_6 flickers by one recorded step, as in FD001), 14 informative
    for name in CONSTANT:
        values = np.unique(raw.train[:, cmapss.COLUMNS.index(name)])
        assert len(values) <= 2 and np.ptp(values) <= 0.01 + 1e-9, name
    assert cmapss.prepare(raw).features == tuple(c for c in cmapss.SENSORS if c not in CONSTANT)
    # test engines are cut from the same fleet: observed + remaining ≈ a training lifetime
    full = lifetimes(raw.test) + raw.rul
    assert abs(full.mean() - lifetimes(raw.train).mean()) < 0.15 * lifetimes(raw.train).mean()


def test_calibrated_to_fd001_published_statistics():
    stats = fleet_stats(default())
    # FD001: lifetimes 128–362 cycles, mean 206.3; test RUL 7–145, mean 75.5
    assert 100 <= stats["life min"] <= 160 and 280 <= stats["life max"] <= 420
    assert 190 <= stats["life mean"] <= 225
    assert 55 <= stats["test RUL mean"] <= 95
    assert stats["median corr(early wear, life)"] < -0.05  # more initial wear, shorter life


def test_learnable_with_realistic_noise():
    val, test = linear_rmse(cmapss.prepare(default()))
    # predicting the mean would give ≈ 40; a noiseless fleet would give ≈ 0. FD001's probe: 17/15
    assert 8.0 < val < 25.0 and 8.0 < test < 25.0


def test_six_conditions_fleet():
    raw = synthetic.generate(n_train=10, n_test=4, seed=2, n_conditions=6)
    keys = np.unique(cmapss.operating_conditions(raw.train[:, 2:5]), axis=0)
    assert keys.tolist() == [
        [0.0, 0.0, 100.0],
        [10.0, 0.25, 100.0],
        [20.0, 0.7, 100.0],
        [25.0, 0.62, 60.0],
        [35.0, 0.84, 100.0],
        [42.0, 0.84, 100.0],
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train must be an integer >= 1"),
        ({"n_test": 1.5}, "n_test must be an integer >= 1"),
        ({"n_conditions": 3}, "n_conditions must be 1"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.generate(**kwargs)


def test_write_rejects_unknown_subset(tmp_path: Path):
    with pytest.raises(ValueError, match="subset must be one of"):
        synthetic.write(tmp_path, default(), "FD9")


@pytest.mark.skipif(
    not os.environ.get("CMAPSS_DIR"),
    reason="real C-MAPSS data not configured: set CMAPSS_DIR to compare with NASA's FD001",
)
def test_statistics_resemble_real_fd001():
    real_raw = cmapss.read_subset(os.environ["CMAPSS_DIR"], "FD001")
    real, syn = fleet_stats(real_raw), fleet_stats(default())
    real_probe = linear_rmse(cmapss.prepare(real_raw))
    syn_probe = linear_rmse(cmapss.prepare(default()))
    print(f"\n{'statistic':<30} {'FD001':>9} {'synthetic':>10}")
    for key in real:
        print(f"{key:<30} {real[key]:>9.3f} {syn[key]:>10.3f}")
    print(f"{'linear probe RMSE val / test':<30} {real_probe[0]:>4.1f}/{real_probe[1]:<4.1f}"
          f" {syn_probe[0]:>5.1f}/{syn_probe[1]:<4.1f}")  # fmt: skip
    for key in ("train rows", "test rows", "life mean", "life std", "test RUL mean"):
        assert syn[key] == pytest.approx(real[key], rel=0.25), key
    for key in ("median |shift|/noise", "median early spread/|shift|"):
        assert syn[key] == pytest.approx(real[key], rel=0.25), key
    assert syn["median corr(early wear, life)"] == pytest.approx(
        real["median corr(early wear, life)"], abs=0.15
    )
    for s, r in zip(syn_probe, real_probe, strict=True):
        assert s == pytest.approx(r, rel=0.3)


def test_generate_takes_numpy_integer_counts():
    """Counts computed with NumPy (``np.int64``) are integers too: the same fleet."""
    numpy_counts = synthetic.generate(n_train=np.int64(5), n_test=np.int32(3), seed=11)
    plain = synthetic.generate(n_train=5, n_test=3, seed=11)
    for x, y in ((numpy_counts.train, plain.train), (numpy_counts.test, plain.test)):
        np.testing.assert_array_equal(x, y)
