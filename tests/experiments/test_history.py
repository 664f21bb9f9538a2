"""experiments.history: the per-epoch rows of ``history.csv``."""

import numpy as np

from experiments.history import epoch_row, history_rows


def test_history_rows_are_the_loops_history_one_row_per_epoch(record):
    """The rows come from the history the loop returns: its ``seconds`` (no clock of our
    own), the train loss, and per variant the validation loss and RMSE, in this order."""
    records = [record((20.0, 18.0), 1.5), record((15.0, 13.0), 0.25)]
    history = {k: [r[k] for r in records] for k in records[0]}
    rows = history_rows(history, ["raw", "ema0.9"])
    assert rows == [epoch_row(e, r, ["raw", "ema0.9"]) for e, r in enumerate(records)]
    assert list(rows[1]) == [
        "epoch", "seconds", "train_loss",
        "val_loss_raw", "val_rmse_raw", "val_loss_ema0.9", "val_rmse_ema0.9",
    ]  # fmt: skip
    assert (rows[1]["epoch"], rows[1]["seconds"], rows[1]["val_loss_ema0.9"]) == (2, 0.25, 0.13)
    np.testing.assert_allclose([r["val_rmse_ema0.9"] for r in rows], [18.0, 13.0])
