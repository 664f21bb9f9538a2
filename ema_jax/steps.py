"""Jitted train / eval steps for :class:`EmaTrainState`, and the seed's loop, functional.

Function conventions (the same function can serve as loss and metric):

* ``loss_fn(params, batch)`` or, when the step is given an ``rng``,
  ``loss_fn(params, batch, rng)``; returns a scalar loss, or ``(loss, aux)`` with
  ``has_aux=True``.
* ``with_model_state=True`` (BatchNorm & co.): ``loss_fn(params, model_state, batch[, rng])``
  returns ``(loss, new_model_state)``, or ``(loss, (aux, new_model_state))`` with ``has_aux``;
  ``metric_fn(params, model_state, batch)``.
* ``metric_fn(params, batch)`` returns a scalar or a dict of scalars (a pytree of arrays).

Eval steps choose raw or EMA weights *inside* the jitted function (``use_ema`` is
static): the state is never modified, so there is nothing to swap in or restore.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax.early_stopping import EarlyStopping, EarlyStoppingState
from ema_jax.train_state import EmaTrainState

Batch = Any
Metrics = Any


def _metrics_dict(loss: jax.Array, aux: Any) -> dict[str, Any]:
    if aux is None:
        return {"loss": loss}
    if isinstance(aux, Mapping):
        return {"loss": loss, **aux}
    return {"loss": loss, "aux": aux}


def _loss_and_aux(out: Any, shape: str = "(loss, aux)") -> tuple[Any, Any]:
    """``out`` split as ``has_aux=True`` promises; a clear error when it is not a pair."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = type(out).__name__ + (f" of shape {np.shape(out)}" if hasattr(out, "shape") else "")
        raise TypeError(
            f"with has_aux=True, loss_fn must return a pair {shape}, got a {got} (use "
            "has_aux=False for a loss alone)"
        )
    return out[0], out[1]


def make_train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    with_model_state: bool = False,
    donate: bool = True,
) -> Callable[..., tuple[EmaTrainState, dict[str, Any]]]:
    """``train_step(state, batch, rng=None) -> (state, metrics)``, jitted, donating ``state``.

    Gradients are taken with respect to ``state.params`` only; the EMA is then updated by
    ``state.apply_gradients``. ``rng`` (optional) is folded with ``state.step`` so one base
    key can be passed to every step. ``metrics`` is ``{"loss": loss}`` plus ``aux`` (merged
    when it is a dict).
    """

    def train_step(
        state: EmaTrainState, batch: Batch, rng: jax.Array | None = None
    ) -> tuple[EmaTrainState, dict[str, Any]]:
        extra = () if rng is None else (jax.random.fold_in(rng, state.step),)

        def objective(params: Any) -> tuple[jax.Array, tuple[Any, Any]]:
            if with_model_state:
                out = loss_fn(params, state.model_state, batch, *extra)
                if has_aux:
                    loss, (aux, model_state) = _loss_and_aux(out, "(loss, (aux, model_state))")
                else:
                    loss, model_state = out
                    aux = None
                return loss, (aux, model_state)
            out = loss_fn(params, batch, *extra)
            loss, aux = _loss_and_aux(out) if has_aux else (out, None)
            return loss, (aux, None)

        (loss, (aux, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params
        )
        kwargs = {"model_state": model_state} if with_model_state else {}
        return state.apply_gradients(grads=grads, **kwargs), _metrics_dict(loss, aux)

    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def _evaluate(
    metric_fn: Callable[..., Any],
    state: EmaTrainState,
    batch: Batch,
    use_ema: bool,
    ema_index: int | None,
    with_model_state: bool,
) -> Metrics:
    params = state.select_params(use_ema, ema_index)
    if with_model_state:
        return metric_fn(params, state.select_model_state(use_ema, ema_index), batch)
    return metric_fn(params, batch)


def make_eval_step(
    metric_fn: Callable[..., Any], *, with_model_state: bool = False
) -> Callable[..., Metrics]:
    """``eval_step(state, batch, use_ema=True, ema_index=None) -> metrics``, jitted.

    ``use_ema`` and ``ema_index`` are static: each choice compiles once. With several
    decays, ``ema_index`` picks one (default: the first).
    """

    def eval_step(
        state: EmaTrainState, batch: Batch, use_ema: bool = True, ema_index: int | None = None
    ) -> Metrics:
        return _evaluate(metric_fn, state, batch, use_ema, ema_index, with_model_state)

    return jax.jit(eval_step, static_argnames=("use_ema", "ema_index"))


def make_paired_eval_step(
    metric_fn: Callable[..., Any], *, with_model_state: bool = False
) -> Callable[..., dict[str, Metrics]]:
    """``paired_eval_step(state, batch) -> {"raw": m, "ema": m}`` in one jitted call.

    With K decays ``"ema"`` is a K-tuple of metrics, one per decay.
    """

    def paired_eval_step(state: EmaTrainState, batch: Batch) -> dict[str, Metrics]:
        raw = _evaluate(metric_fn, state, batch, False, None, with_model_state)
        if not state.ema.stacked:
            averaged: Metrics = _evaluate(metric_fn, state, batch, True, None, with_model_state)
        else:
            averaged = tuple(
                _evaluate(metric_fn, state, batch, True, i, with_model_state)
                for i in range(state.num_averages)
            )
        return {"raw": raw, "ema": averaged}

    return jax.jit(paired_eval_step)


def _batch_size(batch: Batch) -> int:
    """The leading dimension that every non-scalar leaf of ``batch`` shares (1 if none)."""
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch) if np.ndim(x)}
    if len(sizes) > 1:
        raise ValueError(
            "evaluate_dataset weights each batch by its size, the leading dimension of its "
            f"arrays, but this batch's arrays have leading dimensions {sorted(sizes)}"
        )
    return sizes.pop() if sizes else 1


def _named(metrics: Metrics) -> dict[str, Any]:
    return dict(metrics) if isinstance(metrics, Mapping) else {"loss": metrics}


def _check_scalars(totals: dict[str, Any]) -> None:
    """A ``ValueError`` naming the first metric that is not a scalar."""
    for path, value in jax.tree_util.tree_flatten_with_path(totals)[0]:
        if np.ndim(value):
            raise ValueError(
                f"metrics must be scalars (or dicts of scalars), but metric "
                f"{jax.tree_util.keystr(path[1:])} of the {path[0].key} params has shape "
                f"{np.shape(value)}: reduce it in metric_fn (e.g. jnp.mean)"
            )


def evaluate_dataset(
    paired_eval_step: Callable[..., dict[str, Metrics]],
    state: EmaTrainState,
    batches: Iterable[Batch],
) -> dict[str, float | list[float]]:
    """Batch-size-weighted means over ``batches`` of raw and EMA metrics.

    A batch's size is the leading dimension its non-scalar arrays share (scalars, such as
    a step number, are ignored). Keys: ``val_<name>`` (raw) and ``val_<name>_ema`` (a list
    over decays when there are several). One host transfer at the end, not one per batch.
    """
    totals: dict[str, Any] | None = None
    count = 0
    for batch in batches:
        n = _batch_size(batch)
        if n == 0:  # an empty batch has no mean (NaN) and weighs nothing
            continue
        out = paired_eval_step(state, batch)
        flat: dict[str, Any] = {"raw": _named(out["raw"])}
        ema_out = out["ema"]
        flat["ema"] = (
            [_named(m) for m in ema_out] if isinstance(ema_out, tuple) else _named(ema_out)
        )
        scaled = jax.tree.map(lambda x, n=n: x * n, flat)
        totals = scaled if totals is None else jax.tree.map(jnp.add, totals, scaled)
        count += n
    if totals is None:
        raise ValueError("val_data yielded no batches (or only batches of size 0)")
    _check_scalars(totals)
    means = jax.device_get(jax.tree.map(lambda x: x / count, totals))
    result: dict[str, float | list[float]] = {}
    for name, value in means["raw"].items():
        result[f"val_{name}"] = float(value)
        ema_means = means["ema"]
        if isinstance(ema_means, list):
            result[f"val_{name}_ema"] = [float(m[name]) for m in ema_means]
        else:
            result[f"val_{name}_ema"] = float(ema_means[name])
    return result


def _check_reiterable(name: str, data: Any, epochs: int) -> None:
    """Refuses a one-shot iterator (a generator) for several epochs before any state is
    donated: its second pass would be empty and the first epoch's state lost."""
    if epochs > 1 and not callable(data) and iter(data) is data:
        raise TypeError(
            f"{name} is a one-shot iterator ({type(data).__name__}), so epochs 2..{epochs} "
            "would see no batches: pass a re-iterable (a list, a tf.data / grain dataset) or "
            "a function epoch -> iterable"
        )


_INDEXED = re.compile(r"(?P<key>.+)\[(?P<index>\d+)\]")


def _monitored(
    record: Mapping[str, Any], monitor: str, mode: str
) -> tuple[float, bool, int | None]:
    """``(value, use_ema, ema_index)`` of ``monitor`` in one epoch's ``record``.

    ``monitor`` is a history key holding a number (``"val_loss"`` monitors the raw weights,
    ``"val_loss_ema"`` the average's), ``"<key>[i]"`` for average ``i`` of several, or
    ``"best_ema"``: the best (by ``mode``) of ``val_loss_ema``'s averages this epoch.
    """
    if monitor == "best_ema":
        values = record["val_loss_ema"]
        if not isinstance(values, list):
            return float(values), True, None
        finite = [i for i, v in enumerate(values) if not np.isnan(v)] or [0]
        pick = min if mode == "min" else max
        best = pick(finite, key=lambda i: values[i])
        return float(values[best]), True, best
    match = _INDEXED.fullmatch(monitor)
    key, index = (match["key"], int(match["index"])) if match else (monitor, None)
    choices = ", ".join(_monitor_names(record))
    value = record.get(key)
    if key == "seconds" or value is None:
        raise ValueError(f"monitor={monitor!r} is not a monitored value; choose from {choices}")
    is_list = isinstance(value, list)
    if is_list != (index is not None) or (is_list and (index or 0) >= len(value)):
        raise ValueError(
            f"monitor={monitor!r} does not name one value of this history ({key} is "
            f"{'a list of ' + str(len(value)) if is_list else 'a number'}); "
            f"choose from {choices}"
        )
    return float(value[index] if index is not None else value), key.endswith("_ema"), index


def _monitor_names(record: Mapping[str, Any]) -> list[str]:
    names = ["best_ema"]
    for key, value in record.items():
        if key == "seconds":
            continue
        names += [f"{key}[{i}]" for i in range(len(value))] if isinstance(value, list) else [key]
    return names


def _stopping_monitors(
    early_stopping: EarlyStopping | None, monitor: str | Sequence[str]
) -> tuple[str, ...]:
    if early_stopping is None:
        return ()
    if not isinstance(early_stopping, EarlyStopping):
        raise TypeError(
            f"early_stopping must be an ema_jax.EarlyStopping, got {type(early_stopping).__name__}"
        )
    monitors = (monitor,) if isinstance(monitor, str) else tuple(monitor)
    if not monitors or not all(isinstance(m, str) for m in monitors):
        raise TypeError(f"monitor must be a history key or a sequence of them, got {monitor!r}")
    return monitors


@overload
def train_with_ema(
    state: EmaTrainState,
    loss_fn: Callable[..., Any],
    train_data: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    val_data: Iterable[Batch],
    *,
    epochs: int,
    metric_fn: Callable[..., Any] | None = None,
    rng: jax.Array | None = None,
    callback: Callable[[int, dict[str, Any], EmaTrainState], None] | None = None,
    with_model_state: bool = False,
    early_stopping: None = None,
    monitor: str | Sequence[str] = "val_loss_ema",
) -> tuple[dict[str, list[Any]], EmaTrainState]: ...


@overload
def train_with_ema(
    state: EmaTrainState,
    loss_fn: Callable[..., Any],
    train_data: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    val_data: Iterable[Batch],
    *,
    epochs: int,
    metric_fn: Callable[..., Any] | None = None,
    rng: jax.Array | None = None,
    callback: Callable[[int, dict[str, Any], EmaTrainState], None] | None = None,
    with_model_state: bool = False,
    early_stopping: EarlyStopping,
    monitor: str | Sequence[str] = "val_loss_ema",
) -> tuple[dict[str, list[Any]], EmaTrainState, Any]: ...


def train_with_ema(
    state: EmaTrainState,
    loss_fn: Callable[..., Any],
    train_data: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    val_data: Iterable[Batch],
    *,
    epochs: int,
    metric_fn: Callable[..., Any] | None = None,
    rng: jax.Array | None = None,
    callback: Callable[[int, dict[str, Any], EmaTrainState], None] | None = None,
    with_model_state: bool = False,
    early_stopping: EarlyStopping | None = None,
    monitor: str | Sequence[str] = "val_loss_ema",
) -> Any:
    """The seed's ``train_with_ema`` loop, functional: train, then evaluate raw and EMA.

    Args:
      state: an :class:`EmaTrainState` (optimizer and EMA already configured).
      loss_fn: ``loss_fn(params, batch[, rng])`` -> scalar; used for training, and for
        validation (called without ``rng``) unless ``metric_fn`` is given.
      train_data: an iterable of batches re-iterated every epoch, or ``epoch -> iterable``
        (e.g. to reshuffle per epoch).
      val_data: a re-iterable of batches.
      epochs: number of epochs (>= 1).
      metric_fn: ``metric_fn(params, batch)`` -> scalar (the loss) or dict of scalars.
      rng: base key for stochastic layers (dropout); folded with the step.
      callback: ``callback(epoch, record, state)`` after each epoch (print, progress bar).
      with_model_state: BatchNorm & co., see the module docstring for the signatures.
      early_stopping: an :class:`~ema_jax.EarlyStopping`, updated after each epoch with the
        ``monitor`` value and the weights it measures; training ends once it stops (at
        most ``epochs`` epochs).
      monitor: what ``early_stopping`` watches: a history key holding a number
        (``"val_loss"``: the raw weights; ``"val_loss_ema"``: the average's), ``"<key>[i]"``
        for average ``i`` of K, or ``"best_ema"``: each epoch the best of the K averages'
        ``val_loss_ema`` (kept in the history as ``best_ema`` and ``best_ema_index``), and
        that average's weights. A sequence of monitors runs one stopper state per monitor
        on the same training run (training uses only the raw params, so they cannot
        interact) and ends when all have stopped.

    The train step donates ``state``: the arrays of the state passed in (and so the
    ``params`` it was created from) are consumed; use the returned state.

    Returns:
      ``(history, state)``: ``history`` has ``train_loss``, ``val_loss``, ``val_loss_ema``
      (one entry per epoch; plus ``val_<name>[_ema]`` for every metric) and ``seconds``
      (each epoch's wall time, training and evaluation; the first includes compilation),
      and ``state``'s
      ``ema_params`` are the weights to deploy. With ``early_stopping``:
      ``(history, state, stopping)``, ``stopping`` the final
      :class:`~ema_jax.EarlyStoppingState` (``best_weights``, ``best_epoch``,
      ``stopped_epoch``; epochs from 0; with ``with_model_state`` the weights are
      ``(params, model_state)``), or ``{monitor: state}`` for a sequence of monitors.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    _check_reiterable("train_data", train_data, epochs)
    _check_reiterable("val_data", val_data, epochs)
    train_step = make_train_step(loss_fn, with_model_state=with_model_state)
    paired_eval = make_paired_eval_step(
        metric_fn if metric_fn is not None else loss_fn, with_model_state=with_model_state
    )
    monitors = _stopping_monitors(early_stopping, monitor)
    stoppers = {m: early_stopping.init() for m in monitors} if early_stopping else {}
    history: dict[str, list[Any]] = {"train_loss": []}
    for epoch in range(epochs):
        start = time.perf_counter()
        batches = train_data(epoch) if callable(train_data) else train_data
        losses = []
        for batch in batches:
            state, metrics = train_step(state, batch, rng)
            losses.append(metrics["loss"])
        if not losses:
            raise ValueError("train_data yielded no batches")
        record: dict[str, Any] = {"train_loss": float(jnp.mean(jnp.stack(losses)))}
        record.update(evaluate_dataset(paired_eval, state, val_data))
        if "best_ema" in monitors:
            mode = early_stopping.mode if early_stopping else "min"
            record["best_ema"], _, record["best_ema_index"] = _monitored(record, "best_ema", mode)
        record["seconds"] = time.perf_counter() - start
        for name, es in stoppers.items():
            stoppers[name] = _update_stopper(
                early_stopping, es, record, name, state, with_model_state
            )
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        if callback is not None:
            callback(epoch, record, state)
        if stoppers and all(es.stop for es in stoppers.values()):
            break
    if early_stopping is None:
        return history, state
    return history, state, stoppers if not isinstance(monitor, str) else stoppers[monitor]


def _update_stopper(
    stopper: Any,
    es: EarlyStoppingState,
    record: Mapping[str, Any],
    monitor: str,
    state: EmaTrainState,
    with_model_state: bool,
) -> EarlyStoppingState:
    """``stopper.update`` with ``monitor``'s value and the weights it measured."""
    if es.stop:
        return es
    value, use_ema, index = _monitored(record, monitor, stopper.mode)
    weights = state.select_params(use_ema, index)
    if with_model_state:
        weights = (weights, state.select_model_state(use_ema, index))
    return stopper.update(es, value, weights)
