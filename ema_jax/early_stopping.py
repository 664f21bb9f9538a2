"""Early stopping with Keras's rule, on any monitored value (raw or EMA), keeping the best weights.

:class:`EarlyStopping` holds the settings (frozen, hashable); its state,
:class:`EarlyStoppingState`, is a pure pytree that :meth:`EarlyStopping.update` replaces once
per epoch. The rule is ``keras.callbacks.EarlyStopping``'s (Keras 3), see
``docs/early-stopping.md`` for the comparison table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ema_jax import _checks


class EarlyStoppingState(NamedTuple):
    """The state of an :class:`EarlyStopping`: a pytree of Python scalars and the best weights.

    Attributes:
      epoch: epochs seen (calls to ``update``); the next one is epoch ``epoch``, from 0.
      wait: monitored epochs since the wait was last reset (Keras's ``wait``).
      best_metric: the best monitored value so far (``inf`` in ``"min"`` mode, ``-inf`` in
        ``"max"`` mode before any improvement).
      best_epoch: the epoch (from 0) of ``best_metric``; ``None`` before any improvement.
      best_weights: an on-device copy of the weights passed at ``best_epoch``; ``None``
        before any improvement.
      stop: whether the rule has stopped; later updates return the state unchanged.
      stopped_epoch: the epoch (from 0) at which it stopped, ``None`` while running.
    """

    epoch: int = 0
    wait: int = 0
    best_metric: float = math.inf
    best_epoch: int | None = None
    best_weights: Any = None
    stop: bool = False
    stopped_epoch: int | None = None


def _copy(leaf: Any) -> Any:
    # A fresh device buffer (same sharding): the caller may donate ``leaf`` right after.
    return jnp.array(leaf, copy=True)


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when a monitored value has stopped improving; keep the weights of its best epoch.

    ``stopper.init()``, then ``es = stopper.update(es, metric, weights)`` once per epoch
    (epochs are counted by the state, from 0); stop training when ``es.stop``. The rule is
    Keras's: every monitored epoch adds one to the wait; ``metric`` improves when
    ``metric < best_metric − |min_delta|`` (``>`` ``best_metric + |min_delta|`` in ``"max"``
    mode), which records the metric, the epoch and a copy of ``weights``, and resets the wait
    to 0 if ``baseline`` is ``None`` or ``metric`` also improves on ``baseline``; otherwise,
    ``wait >= patience`` at an epoch > 0 stops. Epochs before ``start_from_epoch`` are not
    monitored. A NaN metric is never an improvement (it only adds to the wait).

    ``best_weights`` is a copy *on device* (``jnp.array(leaf, copy=True)``, same shardings):
    the copy is made only when the metric improves, needs no host transfer or sync (it also
    works for arrays spread over several processes), and is a separate buffer, so the train
    step may donate the arrays passed in. It costs one extra set of weights in device memory;
    ``jax.device_get(es.best_weights)`` moves it to the host.

    Args:
      patience: epochs without improvement after which training stops (>= 0).
      min_delta: the least change that counts as an improvement (its sign is ignored).
      mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
      baseline: a value the metric must also beat to reset the wait (``None``: none).
      start_from_epoch: epochs ``0 .. start_from_epoch − 1`` are not monitored (warm-up).
    """

    patience: int = 0
    min_delta: float = 0.0
    mode: str = "min"
    baseline: float | None = None
    start_from_epoch: int = 0

    def __post_init__(self) -> None:
        _checks.integer("patience", self.patience, 0)
        _checks.integer("start_from_epoch", self.start_from_epoch, 0)
        object.__setattr__(self, "min_delta", abs(_checks.real("min_delta", self.min_delta)))
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.baseline is not None:
            object.__setattr__(self, "baseline", _checks.real("baseline", self.baseline))

    def improves(self, metric: float, reference: float) -> bool:
        """Whether ``metric`` beats ``reference`` by more than ``min_delta`` (False for NaN)."""
        if self.mode == "min":
            return metric + self.min_delta < reference
        return metric - self.min_delta > reference

    def init(self) -> EarlyStoppingState:
        """The state before the first epoch."""
        return EarlyStoppingState(best_metric=math.inf if self.mode == "min" else -math.inf)

    def update(self, state: EarlyStoppingState, metric: Any, weights: Any) -> EarlyStoppingState:
        """The state after epoch ``state.epoch``, whose monitored value is ``metric`` (a real
        number or a 0-d array) for ``weights`` (a pytree of arrays, copied if they become the
        best). After a stop the state is returned unchanged.

        Pass weights read from the state after its last train step: a donating step
        (``make_train_step``'s default) deletes the arrays of the state it was given, and
        copying deleted weights raises a ``ValueError`` that says so."""
        if not isinstance(state, EarlyStoppingState):
            raise TypeError(
                f"state must be the EarlyStoppingState of init(), got {type(state).__name__}"
            )
        if state.stop:
            return state
        epoch = state.epoch
        state = state._replace(epoch=epoch + 1)
        if epoch < self.start_from_epoch:
            return state
        value = _metric_value(metric)
        wait = state.wait + 1
        if self.improves(value, state.best_metric):
            _check_alive(weights)
            beats_baseline = self.baseline is None or self.improves(value, self.baseline)
            return state._replace(
                wait=0 if beats_baseline else wait,
                best_metric=value,
                best_epoch=epoch,
                best_weights=jax.tree.map(_copy, weights),
            )
        if wait >= self.patience and epoch > 0:
            return state._replace(wait=wait, stop=True, stopped_epoch=epoch)
        return state._replace(wait=wait)


def _check_alive(weights: Any) -> None:
    path = _checks.deleted_leaf(weights)
    if path is not None:
        raise ValueError(
            f"weights{path} was deleted: it was donated to a train step after it was read "
            "(make_train_step donates its input state): pass the weights of the state the "
            "last step returned, or copy them before the next step (jax.tree.map(jnp.copy, "
            "...))"
        )


def _metric_value(metric: Any) -> float:
    try:
        return float(metric)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric must be a real number or a 0-d array, got {metric!r}") from e


__all__ = ["EarlyStopping", "EarlyStoppingState"]
