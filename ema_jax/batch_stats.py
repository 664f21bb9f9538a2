"""BatchNorm recalibration for averaged weights (torch's ``swa_utils.update_bn``), NNX.

The running statistics a BatchNorm keeps were measured on the *training* weights; averaged
weights see other activations. :func:`recompute_batch_stats` measures them again for the
weights a model holds (e.g. ``ema.apply_to(model)``): over the given batches, the
equal-weight mean of each batch's mean and of its variance, each as ``flax.nnx.BatchNorm``
computes it in training mode (its own code: every BatchNorm runs in training mode with
momentum 0 on each batch, from zeroed statistics).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


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


__all__ = ["recompute_batch_stats"]
