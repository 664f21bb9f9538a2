"""Jitted train / eval steps for :class:`EmaTrainState`, and :func:`evaluate_dataset`.

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

The train step donates its input state (see :func:`make_train_step`); a step or
:func:`evaluate_dataset` given a state that was donated raises a ``ValueError`` that says so
and names the fix. The epoch loop, ``train_with_ema``, is in :mod:`ema_jax.loop`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _checks
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

    Donation (``donate=True``, the default): the step writes the new state into the input
    state's buffers, so after ``new, metrics = train_step(state, batch)`` every array of
    ``state`` is deleted. That includes the ``params`` passed to
    ``EmaTrainState.create`` (the state holds those arrays, not a copy) and any
    ``state.params`` / ``state.ema_params`` read before the step; using them raises JAX's
    "Array has been deleted" / "Buffer has been deleted or donated". Carry on with the state
    the step returned; copy what you want to keep across steps (``jax.tree.map(jnp.copy,
    tree)``, or ``jax.device_get`` to the host); or pass ``donate=False``, which keeps the
    input usable at the cost of a second copy of the state in device memory during the
    step. Calling the step (or an eval step, or :func:`evaluate_dataset`) with a donated
    state raises a ``ValueError`` saying so.
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

    return _DonationAware(jax.jit(train_step, donate_argnums=(0,) if donate else ()))


_DONATED_FIX = (
    "it was donated to an earlier train step (make_train_step donates its input state, and "
    "with it the params given to EmaTrainState.create): use the state that step returned "
    "(state, metrics = train_step(state, batch)), or make_train_step(..., donate=False) to "
    "keep the input usable"
)


def check_not_donated(state: Any, name: str = "state") -> None:
    """A ``ValueError`` naming the first array of ``state`` that was deleted (donated) and
    the fix; nothing when every array is alive. Host-side, no device work."""
    path = _checks.deleted_leaf(state)
    if path is not None:
        raise ValueError(f"{name}{path} was deleted: {_DONATED_FIX}")


class _DonationAware:
    """A jitted step (``jax.jit``'s object: ``lower``, ``eval_shape``, ... are forwarded) whose
    failure on a donated ``state`` says so and names the fix, instead of JAX's "Array has
    been deleted". Nothing is checked while the step succeeds."""

    def __init__(self, jitted: Any) -> None:
        self._jitted = jitted
        self.__wrapped__ = jitted
        self.__doc__ = jitted.__doc__
        self.__name__ = getattr(jitted, "__name__", type(self).__name__)

    def __call__(self, state: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._jitted(state, *args, **kwargs)
        except (RuntimeError, ValueError) as error:
            try:
                check_not_donated(state)
            except ValueError as donated:
                raise donated from error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


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

    return _DonationAware(jax.jit(eval_step, static_argnames=("use_ema", "ema_index")))


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

    return _DonationAware(jax.jit(paired_eval_step))


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


def _flat(out: dict[str, Metrics]) -> dict[str, Any]:
    """A paired eval step's output with named metrics: ``{"raw": {name: m}, "ema": {name: m}
    or a list of them, one per average}``."""
    ema_out = out["ema"]
    averaged = [_named(m) for m in ema_out] if isinstance(ema_out, tuple) else _named(ema_out)
    return {"raw": _named(out["raw"]), "ema": averaged}


def _check_scalars(totals: dict[str, Any]) -> None:
    """A ``ValueError`` naming the first metric that is not a scalar."""
    for path, value in jax.tree_util.tree_flatten_with_path(totals)[0]:
        if np.ndim(value):
            raise ValueError(
                f"metrics must be scalars (or dicts of scalars), but metric "
                f"{jax.tree_util.keystr(path[1:])} of the {path[0].key} params has shape "
                f"{np.shape(value)}: reduce it in metric_fn (e.g. jnp.mean)"
            )


def _by_key(flat: dict[str, Any]) -> dict[str, Any]:
    """:func:`evaluate_dataset`'s keys: ``val_<name>`` -> the raw params' value,
    ``val_<name>_ema`` -> the average's (a list over K averages for K decays)."""
    result: dict[str, Any] = {}
    for name, value in flat["raw"].items():
        result[f"val_{name}"] = value
        ema = flat["ema"]
        result[f"val_{name}_ema"] = [m[name] for m in ema] if isinstance(ema, list) else ema[name]
    return result


def evaluate_dataset(
    paired_eval_step: Callable[..., dict[str, Metrics]],
    state: EmaTrainState,
    batches: Iterable[Batch],
) -> dict[str, float | list[float]]:
    """Batch-size-weighted means over ``batches`` of raw and EMA metrics.

    A batch's size is the leading dimension its non-scalar arrays share (scalars, such as
    a step number, are ignored). Keys: ``val_<name>`` (raw) and ``val_<name>_ema`` (a list
    over decays when there are several). One host transfer at the end, not one per batch.

    Raises:
      ValueError: ``state`` was donated to a train step (use the state it returned);
        ``batches`` holds no batch of size > 0; a metric is not a scalar; a batch's arrays
        disagree on their leading dimension.
    """
    check_not_donated(state)
    totals: dict[str, Any] | None = None
    count = 0
    for batch in batches:
        n = _batch_size(batch)
        if n == 0:  # an empty batch has no mean (NaN) and weighs nothing
            continue
        scaled = jax.tree.map(lambda x, n=n: x * n, _flat(paired_eval_step(state, batch)))
        totals = scaled if totals is None else jax.tree.map(jnp.add, totals, scaled)
        count += n
    if totals is None:
        raise ValueError("val_data yielded no batches (or only batches of size 0)")
    _check_scalars(totals)
    means = _by_key(jax.device_get(jax.tree.map(lambda x: x / count, totals)))
    return {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in means.items()}


def evaluate_dataset_layout(
    paired_eval_step: Callable[..., dict[str, Metrics]], state: EmaTrainState, batch: Batch
) -> dict[str, int | None]:
    """The keys :func:`evaluate_dataset` returns for ``state``, each with the length of its
    list (K, one value per average) or ``None`` for a number, found from one ``batch`` by
    ``jax.eval_shape``: nothing is computed and nothing donated, so a loop can check what it
    will read before training. Raises :func:`evaluate_dataset`'s errors for a donated state
    or a non-scalar metric."""
    check_not_donated(state)
    flat = _flat(jax.eval_shape(paired_eval_step, state, batch))
    _check_scalars(flat)
    return {k: len(v) if isinstance(v, list) else None for k, v in _by_key(flat).items()}


def __getattr__(name: str) -> Any:
    """``ema_jax.steps.train_with_ema``, deprecated: the loop moved to :mod:`ema_jax.loop`."""
    if name == "train_with_ema":
        warnings.warn(
            "ema_jax.steps.train_with_ema moved to ema_jax.loop: use ema_jax.train_with_ema "
            "(or ema_jax.loop.train_with_ema)",
            DeprecationWarning,
            stacklevel=2,
        )
        from ema_jax.loop import train_with_ema

        return train_with_ema
    raise AttributeError(f"module 'ema_jax.steps' has no attribute {name!r}")
