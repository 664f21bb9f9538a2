"""A run's per-epoch history as rows: what ``history.csv`` holds and the console shows.

``ema_jax.train_with_ema`` records per epoch ``seconds``, ``train_loss`` and the validation
metrics of the raw weights and of every average; :func:`epoch_row` names them by variant
(``raw``, then ``Config.variants``' averages) and turns MSEs into RMSEs in cycles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ema_jax


def variant_weights(state: ema_jax.EmaTrainState) -> list[Any]:
    """The raw weights, then each average, in the order of ``Config.variants``."""
    return [state.params, *(state.select_params(True, i) for i in range(state.num_averages))]


def epoch_row(epoch: int, record: Mapping[str, Any], variants: Sequence[str]) -> dict[str, Any]:
    """One row of ``history.csv`` from one epoch's record of ``train_with_ema``: ``epoch``
    (from 1), ``seconds``, ``train_loss``, then per variant ``val_loss_<variant>`` and
    ``val_rmse_<variant>`` (cycles)."""
    row = {"epoch": epoch + 1, "seconds": record["seconds"], "train_loss": record["train_loss"]}
    losses = [record["val_loss"], *_each(record["val_loss_ema"])]
    mses = [record["val_mse"], *_each(record["val_mse_ema"])]
    for name, loss, mse in zip(variants, losses, mses, strict=True):
        row[f"val_loss_{name}"] = loss
        row[f"val_rmse_{name}"] = float(np.sqrt(mse))
    return row


def _each(averages: Any) -> tuple[Any, ...]:
    """One value per average: a K-tuple as it is, one average's value as a 1-tuple."""
    return tuple(averages) if isinstance(averages, (tuple, list)) else (averages,)


def history_rows(history: Mapping[str, list[Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`epoch_row` of every epoch of the ``history`` that ``train_with_ema`` returns."""
    epochs = len(history["train_loss"])
    return [epoch_row(e, {k: v[e] for k, v in history.items()}, variants) for e in range(epochs)]


def summary(row: Mapping[str, Any], variants: Sequence[str]) -> str:
    """``train 0.0123  val RMSE raw 14.21  ema0.99 13.90  ...``: every variant, not only
    the first average."""
    rmses = "  ".join(f"{name} {row[f'val_rmse_{name}']:.2f}" for name in variants)
    return f"train {row['train_loss']:.4f}  val RMSE {rmses}"


__all__ = ["epoch_row", "history_rows", "summary", "variant_weights"]
