"""experiments.stats: the t-interval and the paired differences, against tables and by hand."""

import numpy as np
import pytest

from experiments import stats


def test_mean_ci_is_the_t_interval():
    m, h = stats.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{0.975, 4} = 2.776445 (tables); s = sqrt(2.5)
    assert m == 3.0
    np.testing.assert_allclose(h, 2.776445 * np.sqrt(2.5) / np.sqrt(5), rtol=1e-6)
    assert np.isnan(stats.mean_ci([4.0])[1])
    with pytest.raises(ValueError, match="at least one value"):
        stats.mean_ci([])


def test_paired_differences_ratios_and_the_interval_text():
    values, base = [12.0, 9.0, 15.0], [10.0, 12.0, 15.0]
    assert stats.differences(values, base) == [2.0, -3.0, 0.0]
    assert stats.percent_differences(values, base) == [20.0, -25.0, 0.0]
    assert stats.ratios(values, base) == [1.2, 0.75, 1.0]
    # t_{0.975, 2} = 4.302653 (tables); s = 1
    assert stats.fmt([1.0, 2.0, 3.0]) == f"2.00 ± {4.302653 / np.sqrt(3):.2f}"
    assert stats.fmt([1.0, 2.0, 3.0], 1) == "2.0 ± 2.5"


@pytest.mark.parametrize("pair", [stats.differences, stats.percent_differences, stats.ratios])
def test_paired_lists_must_be_aligned(pair):
    with pytest.raises(ValueError, match=r"argument 2 is shorter"):
        pair([1.0, 2.0], [1.0])
