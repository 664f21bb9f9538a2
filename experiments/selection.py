"""Selection rules: which weights each rule deploys, chosen on validation only, and the one
reading of the test split.

* ``last``: the weights at the end of training (no selection);
* ``best``: per variant, the epoch with the lowest validation RMSE (:class:`KeepBest`);
* ``early``: per monitor, the best weights of an ``ema_jax.EarlyStopping`` on that value
  (:func:`early_choices`).

:func:`evaluate` scores every rule's :class:`Choice` on the test split, once, after training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

import ema_jax
from experiments import cmapss
from experiments.config import Config
from experiments.history import epoch_row, variant_weights


class Predictor(Protocol):
    """What :func:`evaluate` needs of a run's model (``training.Scoring`` is one)."""

    def predict(self, params: Any, x: jax.Array) -> jax.Array:
        """The RUL in cycles."""
        ...


@dataclass(frozen=True)
class Choice:
    """The weights a selection rule deploys for one variant, and the epoch and validation
    RMSE it chose them at."""

    params: Any
    epoch: int
    val_rmse: float


class KeepBest:
    """A ``train_with_ema`` callback (the loop's extension point) for the ``best`` rule:
    per variant, the epoch with the lowest validation RMSE so far, as a :class:`Choice`
    in :attr:`best`. The weights are copied to the host: the train step donates the state,
    so its arrays do not outlive the next step."""

    def __init__(self, variants: Sequence[str]) -> None:
        self.variants = list(variants)
        self.best: dict[str, Choice] = {}

    def __call__(self, epoch: int, record: dict[str, Any], state: ema_jax.EmaTrainState) -> None:
        row = epoch_row(epoch, record, self.variants)
        for name, params in zip(self.variants, variant_weights(state), strict=True):
            rmse = row[f"val_rmse_{name}"]
            if name not in self.best or rmse < self.best[name].val_rmse:
                self.best[name] = Choice(jax.device_get(params), epoch + 1, rmse)


def early_choices(
    cfg: Config,
    history: Mapping[str, list[Any]],
    rows: Sequence[Mapping[str, Any]],
    stopping: Mapping[str, tuple[ema_jax.monitors.Monitor, ema_jax.EarlyStoppingState]],
) -> tuple[dict[str, Choice], dict[str, dict[str, Any]]]:
    """The ``early`` rule: per monitor, its stopper's best weights as a :class:`Choice`, and
    what ``history.json`` records of it: ``variant`` (whose weights), ``best_epoch`` and
    ``stopped_epoch`` (from 1, like the rows; ``None``: never stopped), ``epochs_trained``
    (the run's, shared by all monitors), ``best_metric``, ``patience``."""
    choices, record = {}, {}
    for name, (monitor, es) in stopping.items():
        best = es.best_epoch
        if best is None:  # every monitored value was NaN: nothing to choose
            continue
        if isinstance(monitor, ema_jax.monitors.BestAverage):
            variant = cfg.variants[1 + int(history[f"{monitor.key}_index"][best])]
        elif isinstance(monitor, ema_jax.monitors.Average):
            variant = cfg.variants[1 + monitor.index]
        else:
            variant = "raw"
        val_rmse = rows[best][f"val_rmse_{variant}"]
        choices[name] = Choice(es.best_weights, best + 1, val_rmse)
        record[name] = {
            "variant": variant,
            "best_epoch": best + 1,
            "stopped_epoch": None if es.stopped_epoch is None else es.stopped_epoch + 1,
            "epochs_trained": len(rows),
            "best_metric": es.best_metric,
            "patience": cfg.early_stopping,
        }
    return choices, record


def evaluate(
    scoring: Predictor, ds: Any, choices: Mapping[str, Mapping[str, Choice]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{rule: {variant: {"rmse", "score", "val_rmse", "epoch"}}}``: test RMSE and PHM08
    score of each rule's weights. The only reader of the test split, after training."""
    predict = jax.jit(scoring.predict)
    x_test, y_test = jnp.asarray(ds.x_test), np.asarray(ds.y_test)
    test: dict[str, dict[str, dict[str, Any]]] = {}
    for rule, chosen in choices.items():
        test[rule] = {}
        for name, choice in chosen.items():
            pred = np.asarray(predict(choice.params, x_test))
            test[rule][name] = {
                "rmse": cmapss.rmse(pred, y_test),
                "score": cmapss.phm08_score(pred, y_test),
                "val_rmse": float(choice.val_rmse),
                "epoch": int(choice.epoch),
            }
    return test


__all__ = ["Choice", "KeepBest", "Predictor", "early_choices", "evaluate"]
