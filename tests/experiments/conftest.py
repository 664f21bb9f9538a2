"""Shared fixtures of the experiments' tests: a tiny NASA-format data folder, and one epoch's
record as ``ema_jax.train_with_ema`` hands it to a callback."""

import pytest

from experiments import synthetic


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """12 training and 6 test engines of the synthetic fleet (seed 0), written as NASA's
    three files: a data folder that trains in seconds."""
    raw = synthetic.generate(n_train=12, n_test=6, seed=0)
    data = tmp_path_factory.mktemp("data")
    synthetic.write(data, raw)
    return data


def epoch_record(rmses, seconds=0.5):
    """One epoch's record as ``ema_jax.train_with_ema`` passes it to a callback (and stores it
    in its history): raw metrics, then one entry per average."""
    raw, *emas = rmses
    return {
        "train_loss": 0.1,
        "val_loss": raw / 100,
        "val_loss_ema": [e / 100 for e in emas],
        "val_mse": raw**2,
        "val_mse_ema": [e**2 for e in emas],
        "seconds": seconds,
    }


@pytest.fixture
def record():
    """:func:`epoch_record`: ``record((raw RMSE, average RMSEs...), seconds)``."""
    return epoch_record


class StateStub:
    """What the callbacks read of an ``EmaTrainState``."""

    def __init__(self, params, ema_params):
        self.params, self.ema_params = params, tuple(ema_params)
        self.num_averages = len(self.ema_params)

    def select_params(self, use_ema, ema_index=None):
        return self.ema_params[ema_index or 0] if use_ema else self.params


@pytest.fixture
def state_stub():
    """:class:`StateStub`: ``state_stub(params, ema_params)``."""
    return StateStub
