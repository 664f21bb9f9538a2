"""ema_jax.monitors: the typed monitors, the strings of earlier versions they parse, and what
each measures in one epoch's record. (Checked against a real run: test_early_stopping.py.)"""

from __future__ import annotations

import math

import pytest

from ema_jax import monitors
from ema_jax.monitors import Average, BestAverage, Raw

STRINGS = {
    "val_loss": Raw(),
    "train_loss": Raw("train_loss"),
    "val_mae": Raw("val_mae"),
    "val_loss_ema": Average(),
    "val_loss_ema[0]": Average(0),
    "val_loss_ema[1]": Average(1),
    "val_mae_ema[2]": Average(2, "val_mae"),
    "best_ema": BestAverage(),
}


@pytest.mark.parametrize(("text", "monitor"), STRINGS.items(), ids=STRINGS)
def test_each_string_parses_into_its_type(text, monitor):
    assert monitors.parse(text) == monitor


def test_monitors_are_equal_and_hash_by_value():
    """So they key ``TrainResult.stopping``; ``Average(None)`` is the first average, like
    ``ema_index=None`` everywhere."""
    assert Average(None) == Average() == Average(0) != Average(1)
    assert {Raw(): 1}[Raw("val_loss")] == 1 and hash(BestAverage()) == hash(BestAverage())
    assert Raw() != Average() and BestAverage("val_mae").key == "best_val_mae_ema"
    assert BestAverage().key == "best_ema"


BAD = {
    "negative index": (lambda: Average(-1), ValueError, "index must be >= 0"),
    "bool index": (lambda: Average(True), TypeError, "index must be an int"),
    "empty metric": (lambda: Raw(""), TypeError, "metric must be a history key"),
    "metric not a str": (lambda: BestAverage(3), TypeError, "metric must be a history key"),
    "index on a number": (
        lambda: monitors.parse("val_loss[0]"),
        ValueError,
        "only an average's key",
    ),
    "string not a str": (lambda: monitors.parse(3), TypeError, "must be a str"),
}


@pytest.mark.parametrize(("make", "error", "match"), BAD.values(), ids=BAD)
def test_bad_monitors_are_refused_naming_the_field(make, error, match):
    with pytest.raises(error, match=match):
        make()


RECORD = {"train_loss": 0.5, "val_loss": 0.4, "val_loss_ema": [0.3, math.nan, 0.2, 0.6]}


@pytest.mark.parametrize(
    ("monitor", "mode", "want"),
    [
        (Raw(), "min", (0.4, None)),
        (Raw("train_loss"), "min", (0.5, None)),
        (Average(), "min", (0.3, 0)),
        (Average(3), "min", (0.6, 3)),
        (BestAverage(), "min", (0.2, 2)),
        (BestAverage(), "max", (0.6, 3)),
    ],
    ids=repr,
)
def test_measure_reads_the_value_and_the_average_it_measures(monitor, mode, want):
    """``(value, ema_index)``: ``None`` for the raw params; the best average skips NaNs."""
    assert monitors.measure(monitor, RECORD, mode) == want


def test_the_best_of_all_nan_averages_is_the_first():
    record = {"val_loss_ema": [math.nan, math.nan]}
    value, index = monitors.measure(BestAverage(), record, "min")
    assert math.isnan(value) and index == 0


def test_the_best_of_a_single_average_is_that_average():
    assert monitors.measure(BestAverage(), {"val_loss_ema": 0.7}, "min") == (0.7, 0)
