"""experiments.cmapss's metrics, RMSE and the PHM08 score, against hand-computed values."""

import math

import numpy as np
import pytest

from experiments import cmapss


def test_phm08_score_hand_computed():
    # d = pred − true = −13, +10, 0, +2  →  (e − 1) + (e − 1) + 0 + (e^0.2 − 1)
    pred, true = [7.0, 30.0, 20.0, 22.0], [20.0, 20.0, 20.0, 20.0]
    assert cmapss.phm08_score(pred, true) == pytest.approx(
        2 * 1.718281828459045 + 0.221402758160170
    )
    assert cmapss.phm08_score([10.0], [20.0]) == pytest.approx(1.1581055339484458)  # e^(10/13) − 1
    assert cmapss.phm08_score([5.0], [5.0]) == 0.0
    # late predictions cost more than early ones of the same size
    assert cmapss.phm08_score([30.0], [20.0]) > cmapss.phm08_score([10.0], [20.0])


def test_rmse_hand_computed():
    assert cmapss.rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])) == pytest.approx(
        math.sqrt(5 / 3)
    )
    assert isinstance(cmapss.rmse(np.float32([1.0]), np.float32([1.0])), float)


@pytest.mark.parametrize("metric", [cmapss.rmse, cmapss.phm08_score])
@pytest.mark.parametrize(
    ("pred", "true", "match"),
    [(np.zeros(3), np.zeros(4), "same shape"), (np.zeros(0), np.zeros(0), "empty")],
    ids=["shapes differ", "empty"],
)
def test_metrics_reject_bad_shapes(metric, pred, true, match):
    with pytest.raises(ValueError, match=match):
        metric(pred, true)
