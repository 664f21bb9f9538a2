"""BatchNorm recalibration for averaged weights (torch's ``swa_utils.update_bn``).

The running statistics a BatchNorm keeps were measured on the *training* weights; averaged
weights see other activations. Both functions measure them again: over the given batches,
the equal-weight mean of each batch's mean and of its variance, each as flax's BatchNorm
computes it in training mode (by flax's own code, not a copy of it).

* :func:`recompute_batch_stats` (NNX): the statistics of the model it is given (e.g. a copy
  of ``ema.apply_to(model)``); every BatchNorm runs in training mode with momentum 0 on
  each batch, from zeroed statistics.
* :func:`recompute_linen_batch_stats` (Linen): the ``model_state`` of an
  :class:`~ema_jax.EmaTrainState`'s average, from the user's forward that runs BatchNorm in
  training mode; each BatchNorm's momentum is read while tracing
  (``flax.linen.intercept_methods``) and the update from zeroed statistics divided by
  ``1 - momentum``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ema_jax.train_state import EmaTrainState


def recompute_batch_stats(model: nnx.Module, batches: Iterable[Any]) -> nnx.Module:
    """Sets every ``nnx.BatchNorm`` statistic of ``model`` to its mean over ``batches``.

    Each batch (the model's input, or a tuple whose first element is) runs through
    ``model`` once, jitted, with every BatchNorm in training mode: a BatchNorm's ``mean``
    becomes the mean over the batches of the batch means of its input, its ``var`` the
    mean of the batch variances (flax's, biased), each batch weighing the same. The
    BatchNorms' ``use_running_average`` and ``momentum`` are left as found; the other
    modules run as they are (a Dropout in training mode draws from its Rngs, which
    advance). A BatchNorm must take its mode from its attribute (``model.train()`` /
    ``model.eval()`` / ``nnx.view``), not from a ``use_running_average`` argument.

    Args:
      model: an NNX module with at least one ``nnx.BatchNorm``; updated in place.
      batches: an iterable of inputs or of tuples ``(input, ...)``; at least one.

    Returns:
      ``model``.

    Raises:
      ValueError: ``model`` has no BatchNorm; ``batches`` yields nothing. ``model`` is
        unchanged then.
    """
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    if not norms:
        raise ValueError("model has no nnx.BatchNorm: there are no statistics to recompute")
    found = [(m.use_running_average, m.momentum) for m in norms]
    try:
        for m in norms:
            m.use_running_average, m.momentum = False, 0.0
        graphdef, stats, rest = _split(model)
        totals, count = None, 0
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple) else batch
            measured, rest = _measure(graphdef, stats, rest, x)
            totals = measured if totals is None else jax.tree.map(jnp.add, totals, measured)
            count += 1
        if totals is None:
            raise ValueError("batches yielded no batch: the statistics need at least one")
        nnx.update(model, rest, jax.tree.map(lambda total: total / count, totals))
    finally:
        for m, (mode, momentum) in zip(norms, found, strict=True):
            m.use_running_average, m.momentum = mode, momentum
    return model


@functools.partial(jax.jit, static_argnums=0)
def _measure(graphdef: Any, stats: Any, rest: Any, x: Any) -> tuple[Any, Any]:
    """One batch's statistics (each BatchNorm's, momentum 0 from zeros) and the model's
    other state after the forward (Rng counts)."""
    model = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, stats), rest)
    model(x)
    _, measured, rest = _split(model)
    return measured, rest


def _split(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """``(graphdef, BatchStat state, the rest)``."""
    graphdef, stats, rest = nnx.split(model, nnx.BatchStat, ...)  # type: ignore[misc]
    return graphdef, stats, rest


def recompute_linen_batch_stats(
    state: EmaTrainState,
    forward: Callable[[Any, Any, Any], Any],
    batches: Iterable[Any],
    *,
    ema_index: int | None = None,
) -> Any:
    """The ``model_state`` for average ``ema_index``'s params (``None``: the first), its
    BatchNorm statistics recomputed over ``batches``.

    ``forward(params, model_state, x)`` runs the model with every ``flax.linen.BatchNorm``
    in training mode and returns the updated ``model_state`` (the same tree), e.g.
    ``lambda p, ms, x: model.apply({"params": p, **ms}, x, train=True,
    mutable=["batch_stats"])[1]``. It is called jitted once per batch (the input, or a
    tuple whose first element is) with zeroed statistics; each BatchNorm's ``mean`` and
    ``var`` become the equal-weight mean over the batches of its batch mean and (biased)
    variance. Leaves that belong to no BatchNorm are returned as ``state.model_state``
    holds them. Nothing is changed in ``state``: deploy ``(state.select_params(True,
    ema_index), result)``.

    Raises:
      ValueError: ``state`` has no ``model_state``; ``batches`` yields nothing; the forward
        ran no BatchNorm, or changed a leaf that belongs to none.
    """
    if state.model_state is None:
        raise ValueError("state has no model_state: there are no statistics to recompute")
    params = state.select_params(True, ema_index)
    zeros = jax.tree.map(jnp.zeros_like, state.model_state)
    momenta: dict[tuple[str, ...], float] = {}

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            momenta[tuple(context.module.path)] = context.module.momentum
        return next_fun(*args, **kwargs)

    @jax.jit
    def measure(params: Any, x: Any) -> Any:
        with nn.intercept_methods(record):
            return forward(params, zeros, x)

    totals, count = None, 0
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple) else batch
        measured = measure(params, x)
        totals = measured if totals is None else jax.tree.map(jnp.add, totals, measured)
        count += 1
    if totals is None:
        raise ValueError("batches yielded no batch: the statistics need at least one")
    if not momenta:
        raise ValueError("forward ran no flax.linen.BatchNorm: there are no statistics")

    def leaf(path: Any, total: Any, kept: Any) -> Any:
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        for module, momentum in momenta.items():
            if keys[-1] in ("mean", "var") and keys[-1 - len(module) : -1] == module:
                return total / count / (1 - momentum)
        if np.any(np.asarray(total) != 0):
            raise ValueError(
                f"model_state{jax.tree_util.keystr(path)} was changed by forward but belongs "
                "to no BatchNorm it ran"
            )
        return kept

    return jax.tree_util.tree_map_with_path(leaf, totals, state.model_state)


__all__ = ["recompute_batch_stats", "recompute_linen_batch_stats"]
