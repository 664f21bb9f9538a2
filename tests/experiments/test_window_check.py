"""experiments.window_check: window lengths scored on a test-like validation set."""

import numpy as np

from experiments import cmapss, training, window_check
from experiments.models import make_model
from experiments.synthetic import generate


def test_window_check_scores_the_truncated_validation_engines(monkeypatch) -> None:
    """``experiments.window_check`` trains like ``train_rul`` and scores every cut of the
    validation engines (cycles >= 31) — the same endpoints for every window length. The
    RMSEs it reports are those of the trained weights on those cuts (float64 NumPy)."""
    seen = []

    def run_and_keep(cfg, ds):  # the real run; keeps what it trained and scored
        result, state = training.run(cfg, ds)
        seen.append((cfg, ds, state))
        return result, state

    monkeypatch.setattr(window_check, "run", run_and_keep)
    (row,) = window_check.main(
        ["--windows", "35", "--epochs", "1", "--model", "dcnn_li", "--batch-size", "1024"]
    )
    raw = generate(seed=0)
    _, val_units = cmapss.split_units(raw.train[:, 0], 0.2, 0)
    lives = [int((raw.train[:, 0] == u).sum()) for u in val_units]
    assert row["seed"] == 0 and row["window"] == 35
    assert row["endpoints"] == sum(life - 30 for life in lives)
    assert set(row["last"]) == {"raw", "ema0.999-debiased"}
    [(cfg, ds, state)] = seen
    model = make_model(cfg.model)
    (ema,) = state.ema_params  # train_rul keeps its decays as a tuple, here of one
    for name, params in (("raw", state.params), ("ema0.999-debiased", ema)):
        pred = np.asarray(model.apply({"params": params}, ds.x_test), np.float64) * ds.max_rul
        rmse = np.sqrt(np.mean((pred - ds.y_test.astype(np.float64)) ** 2))
        np.testing.assert_allclose(row["last"][name], rmse, rtol=1e-4, atol=1e-3)
