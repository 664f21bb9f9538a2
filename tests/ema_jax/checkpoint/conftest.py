"""Fixtures of the checkpoint tests: a trained state and a directory it is saved in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ckpt_worker as w
import pytest
from ckpt_support import saved

import ema_jax


@pytest.fixture(scope="module")
def trained() -> ema_jax.EmaTrainState:
    """3 Adam steps with two averages; never donated by the tests."""
    return w.train(w.make_state(), 0, 3)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: Any, trained: Any) -> Path:
    directory = tmp_path_factory.mktemp("saved")
    saved(directory, trained)
    return directory  # type: ignore[no-any-return]
