"""``train_with_ema``: the seed's epoch loop, functional, with optional early stopping.

Train with the jitted steps of :mod:`ema_jax.steps`, evaluate raw and EMA weights after each
epoch, and return one :class:`TrainResult`. Every check that can be made before training
(arguments, data, the state, the monitors against the history the run will record) is made
before the first step, so a mistake never costs a donated state.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ema_jax import _checks, monitors
from ema_jax.early_stopping import EarlyStopping, EarlyStoppingState
from ema_jax.monitors import BestAverage, Monitor
from ema_jax.steps import (
    Batch,
    check_not_donated,
    evaluate_dataset,
    evaluate_dataset_layout,
    make_paired_eval_step,
    make_train_step,
)
from ema_jax.train_state import EmaTrainState

Callback = Callable[[int, dict[str, Any], EmaTrainState], None]
"""``callback(epoch, record, state)``, called after each epoch."""


@dataclasses.dataclass(frozen=True, eq=False)
class TrainResult:
    """What :func:`train_with_ema` returns, with or without early stopping.

    It unpacks as ``(history, state)``, so ``history, state = train_with_ema(...)`` reads
    the same as before early stopping existed; the stoppers' states are
    ``result.stopping``.

    Attributes:
      history: per epoch (one entry each), ``train_loss``, ``val_<name>`` and
        ``val_<name>_ema`` for every metric (``val_loss`` for the loss; a list over averages
        for K decays), ``seconds`` (the epoch's wall time, training and evaluation; the
        first includes compilation), and per :class:`~ema_jax.monitors.BestAverage` monitor
        its ``key`` and ``<key>_index``.
      state: the final :class:`EmaTrainState`; its ``ema_params`` are the weights to deploy.
      stopping: ``{monitor: EarlyStoppingState}``, one per monitor in the order given, keyed
        by the typed monitor (a string is keyed by :func:`ema_jax.monitors.parse` of it);
        empty without ``early_stopping``. Each state's ``best_weights`` (at ``best_epoch``,
        epochs from 0) are the weights its monitor measured, ``(params, model_state)`` with
        ``with_model_state``.
    """

    history: dict[str, list[Any]]
    state: EmaTrainState
    stopping: dict[Monitor, EarlyStoppingState] = dataclasses.field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.history, self.state))


class DataError(ValueError):
    """``train_data`` or ``val_data`` failed in an epoch (no batches, a malformed batch):
    found only when that epoch ran, so after the state passed in was donated.

    Attributes:
      result: the :class:`TrainResult` so far: the history of the finished epochs and the
        state after the failing epoch's train steps (alive: continue from it, or save it).
    """

    def __init__(self, message: str, result: TrainResult) -> None:
        super().__init__(
            f"{message}; the state trained so far is this error's .result.state "
            "(ema_jax.loop.DataError)"
        )
        self.result = result


def train_with_ema(
    state: EmaTrainState,
    loss_fn: Callable[..., Any],
    train_data: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    val_data: Iterable[Batch],
    *,
    epochs: int,
    metric_fn: Callable[..., Any] | None = None,
    rng: jax.Array | None = None,
    callback: Callback | None = None,
    with_model_state: bool = False,
    early_stopping: EarlyStopping | None = None,
    monitor: Monitor | str | Sequence[Monitor | str] = "val_loss_ema",
    switch_every: int | None = None,
) -> TrainResult:
    """The seed's ``train_with_ema`` loop, functional: train, then evaluate raw and EMA.

    Args:
      state: an :class:`EmaTrainState` (optimizer and EMA already configured). It is
        donated to the train step: its arrays (and so the ``params`` it was created from)
        are consumed; use ``result.state``.
      loss_fn: ``loss_fn(params, batch[, rng])`` -> scalar; used for training, and for
        validation (called without ``rng``) unless ``metric_fn`` is given.
      train_data: an iterable of batches re-iterated every epoch, or ``epoch -> iterable``
        (e.g. to reshuffle per epoch).
      val_data: a re-iterable of batches (a one-shot iterator only with ``epochs=1``).
      epochs: number of epochs (>= 1).
      metric_fn: ``metric_fn(params, batch)`` -> scalar (the loss) or dict of scalars.
      rng: base key for stochastic layers (dropout); folded with the step.
      callback: ``callback(epoch, record, state)`` after each epoch (print, progress bar).
      with_model_state: BatchNorm & co., see :mod:`ema_jax.steps` for the signatures.
      early_stopping: an :class:`~ema_jax.EarlyStopping`, updated after each epoch with the
        ``monitor`` value and the weights it measures; training ends once it stops (at
        most ``epochs`` epochs).
      monitor: what ``early_stopping`` watches (see :mod:`ema_jax.monitors`):
        ``monitors.Raw()`` (the raw weights' ``val_loss``), ``monitors.Average(i)``
        (average ``i``'s), ``monitors.BestAverage()`` (each epoch the best average's, and
        its weights), or a string of earlier versions (``"val_loss"``, ``"val_loss_ema"``,
        ``"val_loss_ema[1]"``, ``"best_ema"``). The default, ``"val_loss_ema"``, is the
        average of a single decay; with K decays name one. A sequence of monitors runs one
        stopper state per monitor on the same training run (training uses only the raw
        params, so they cannot interact) and ends when all have stopped.
      switch_every: Switch EMA: at the end of every ``switch_every``-th epoch (epochs
        ``switch_every``, ``2·switch_every``, ... counting from 1) the state is switched,
        ``state.switch()`` (:meth:`~ema_jax.EmaTrainState.switch`: the params become the
        first average's shadow, the EMA and the optimizer going on). It happens after that
        epoch's validation, early-stopping update and callback, so the history and the
        callback see what the raw weights reached, and the next epoch trains from the
        shadow. ``None`` (the default): never.

    Returns:
      A :class:`TrainResult`: ``history``, ``state`` and ``stopping``. It unpacks as
      ``history, state``.

    Raises:
      TypeError / ValueError: before the first step, for a bad ``epochs``, a one-shot
        iterator with ``epochs > 1``, an empty ``val_data``, a ``state`` that is no
        ``EmaTrainState`` or was donated already, a non-scalar metric, an
        ``early_stopping`` that is no ``EarlyStopping``, a ``switch_every`` that is not
        ``None`` or an int >= 1, or a ``monitor`` that does not name
        one value of the history (a typo, an unindexed average with K decays, an index out
        of range; the message lists the choices).
      DataError: a ``ValueError`` for a data set found empty or malformed in an epoch (an
        epoch's ``train_data`` or ``val_data`` that yields no batches, a batch whose arrays
        disagree on their size); it carries the state trained so far (``error.result``), so
        the state passed in, donated by then, is not lost.
    """
    if not isinstance(state, EmaTrainState):
        raise TypeError(f"state must be an ema_jax.EmaTrainState, got {type(state).__name__}")
    check_not_donated(state)
    try:
        epochs = _checks.integer("epochs", epochs, 1)  # type: ignore[assignment]
    except TypeError:  # a ValueError, as epochs < 1
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}") from None
    switch_every = _checks.integer("switch_every", switch_every, 1, allow_none=True)
    _check_reiterable("train_data", train_data, epochs)
    _check_reiterable("val_data", val_data, epochs)
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError(
            f"early_stopping must be an ema_jax.EarlyStopping, got {type(early_stopping).__name__}"
        )
    train_step = make_train_step(loss_fn, with_model_state=with_model_state)
    paired_eval = make_paired_eval_step(
        metric_fn if metric_fn is not None else loss_fn, with_model_state=with_model_state
    )
    first, val_data = _first_batch(val_data)
    layout = {"train_loss": None, **evaluate_dataset_layout(paired_eval, state, first)}
    watched = monitors.resolve_all(monitor, layout) if early_stopping is not None else ()
    mode = early_stopping.mode if early_stopping is not None else "min"
    stoppers = [early_stopping.init() for _ in watched] if early_stopping is not None else []

    history: dict[str, list[Any]] = {"train_loss": []}
    for epoch in range(epochs):
        start = time.perf_counter()
        batches = train_data(epoch) if callable(train_data) else train_data
        losses = []
        for batch in batches:
            state, metrics = train_step(state, batch, rng)
            losses.append(metrics["loss"])
        so_far = TrainResult(history, state, dict(zip(watched, stoppers, strict=True)))
        if not losses:
            raise DataError(
                f"train_data yielded no batches in epoch {epoch} (counting from 0)", so_far
            )
        record: dict[str, Any] = {"train_loss": float(jnp.mean(jnp.stack(losses)))}
        try:
            record.update(evaluate_dataset(paired_eval, state, val_data))
        except ValueError as error:
            raise DataError(f"{error} in epoch {epoch} (counting from 0)", so_far) from error
        for m in watched:
            if isinstance(m, BestAverage):
                record[m.key], record[f"{m.key}_index"] = monitors.measure(m, record, mode)
        record["seconds"] = time.perf_counter() - start
        if early_stopping is not None:
            stoppers = [
                _update(early_stopping, es, m, record, state, with_model_state)
                for m, es in zip(watched, stoppers, strict=True)
            ]
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        if callback is not None:
            callback(epoch, record, state)
        if switch_every is not None and (epoch + 1) % switch_every == 0:
            state = _switch(state)
        if stoppers and all(es.stop for es in stoppers):
            break
    return TrainResult(history, state, dict(zip(watched, stoppers, strict=True)))


#: ``state.switch()``, jitted (compiled once per state layout) and donating the state, so
#: the switch holds no second copy of the params.
_switch = jax.jit(EmaTrainState.switch, donate_argnums=0)


def _update(
    stopper: EarlyStopping,
    es: EarlyStoppingState,
    monitor: Monitor,
    record: Mapping[str, Any],
    state: EmaTrainState,
    with_model_state: bool,
) -> EarlyStoppingState:
    """``stopper.update`` with ``monitor``'s value and the weights it measured."""
    if es.stop:
        return es
    value, ema_index = monitors.measure(monitor, record, stopper.mode)
    use_ema = ema_index is not None
    weights = state.select_params(use_ema, ema_index)
    if with_model_state:
        weights = (weights, state.select_model_state(use_ema, ema_index))
    return stopper.update(es, value, weights)


def _check_reiterable(name: str, data: Any, epochs: int) -> None:
    """Refuses a one-shot iterator (a generator) for several epochs before any state is
    donated: its second pass would be empty and the first epoch's state lost."""
    if epochs > 1 and not callable(data) and iter(data) is data:
        raise TypeError(
            f"{name} is a one-shot iterator ({type(data).__name__}), so epochs 2..{epochs} "
            "would see no batches: pass a re-iterable (a list, a tf.data / grain dataset) or "
            "a function epoch -> iterable"
        )


def _first_batch(val_data: Iterable[Batch]) -> tuple[Batch, Iterable[Batch]]:
    """``val_data``'s first batch (for the checks before training) and ``val_data`` to
    evaluate with: unchanged, or for a one-shot iterator the batch put back in front."""
    iterator = iter(val_data)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("val_data yielded no batches") from None
    if iterator is val_data:
        return first, itertools.chain([first], iterator)
    return first, val_data


__all__ = ["DataError", "TrainResult", "train_with_ema"]
