"""experiments.selection: the ``best`` rule's keeper."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.selection import KeepBest


def test_keep_best_keeps_each_variants_lowest_validation_epoch_on_the_host(record, state_stub):
    """Per variant, the first epoch with the lowest validation RMSE (a tie keeps the earlier
    one), with a host copy of that variant's weights at that epoch."""
    keep = KeepBest(["raw", "ema0.9"])
    curves = [(20.0, 18.0), (15.0, 13.0), (16.0, 13.0), (14.0, 13.5)]
    for epoch, rmses in enumerate(curves):
        state = state_stub({"w": jnp.full(2, epoch)}, [{"w": jnp.full(2, 10 + epoch)}])
        keep(epoch, record(rmses), state)
    assert (keep.best["raw"].epoch, keep.best["ema0.9"].epoch) == (4, 2)
    assert keep.best["raw"].val_rmse == pytest.approx(14.0)
    assert keep.best["ema0.9"].val_rmse == pytest.approx(13.0)
    weights = keep.best["ema0.9"].params["w"]
    assert isinstance(weights, np.ndarray)  # a host copy: the train step donates the state
    np.testing.assert_array_equal(weights, [11, 11])
    np.testing.assert_array_equal(keep.best["raw"].params["w"], [3, 3])
