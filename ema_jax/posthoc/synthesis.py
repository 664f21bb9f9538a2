"""Synthesis in memory: a weighted sum of snapshots, accumulated in float32 or wider (the
project's dtype policy, :mod:`ema_jax._dtypes`) and cast back to the params' dtypes."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _checks, _dtypes
from ema_jax.posthoc.solver import solve_coefficients
from ema_jax.transform import Params


def add_weighted(total: Params, trees: Sequence[Params], weights: jax.Array) -> Params:
    """``total + Σ_k weights[k]·trees[k]`` for averaged (real or complex floating) leaves,
    in ``total``'s dtypes; other leaves take the last tree's value."""

    def leaf(acc: jax.Array, *xs: jax.Array) -> jax.Array:
        if not _dtypes.is_averaged(acc.dtype):
            return xs[-1].astype(acc.dtype)
        terms = [
            w.astype(acc.dtype) * x.astype(acc.dtype)
            for w, x in zip(list(weights), xs, strict=True)
        ]
        return acc + functools.reduce(jnp.add, terms)

    return jax.tree.map(leaf, total, *trees)


@functools.partial(jax.jit, donate_argnums=0)
def accumulate(total: Params, trees: Sequence[Params], weights: jax.Array) -> Params:
    """:func:`add_weighted`, jitted, ``total`` donated (updated in place)."""
    return add_weighted(total, trees, weights)


@functools.partial(jax.jit, donate_argnums=0)
def accumulate_widths(
    totals: Sequence[Params], trees: Sequence[Params], weights: jax.Array
) -> list[Params]:
    """:func:`accumulate` into each of K outputs: ``totals[j] + Σ_k weights[j, k]·trees[k]``,
    ``weights`` of shape ``[K, len(trees)]``; one jitted call reads ``trees`` once for every
    output. ``totals`` is donated."""
    return [add_weighted(t, trees, weights[j]) for j, t in enumerate(totals)]


def zeros(tree: Params) -> Params:
    """Zeros in the accumulator dtypes of ``tree``'s leaves (arrays or
    ``jax.ShapeDtypeStruct``), placed like them."""
    return jax.tree.map(
        lambda x: jnp.zeros(
            np.shape(x),
            _dtypes.accumulator(jnp.result_type(x)),
            device=getattr(x, "sharding", None),
        ),
        tree,
    )


def synthesize(
    snapshots: Sequence[tuple[int, float, Params]], sigma_rel: float, step: int | None = None
) -> Params:
    """The power-function EMA of ``sigma_rel`` at ``step``, from snapshots in memory.

    Args:
      snapshots: ``(step, sigma_rel, params)`` triples: the power-function EMA of that
        σ_rel at that step (e.g. ``ema_jax.accumulators(state, i)``), all with the same
        tree, shapes and dtypes.
      sigma_rel: the σ_rel to synthesize, in ``(0, SIGMA_REL_GAMMA0)``.
      step: the step to synthesize at; ``None`` = the last snapshot's step. Snapshots after
        it are not used.

    Returns:
      A tree like the snapshots' params: ``Σ_i c_i·params_i`` with the weights of
      :func:`~ema_jax.posthoc.solve_coefficients`, accumulated in float32 or wider (complex
      leaves in a complex dtype) and returned in the snapshots' dtypes. Integer and bool
      leaves come from the last snapshot used.
    """
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError("snapshots is empty: synthesizing needs at least one snapshot")
    for i, item in enumerate(snapshots):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise TypeError(f"snapshots[{i}] must be a (step, sigma_rel, params) triple")
    first = _checks.shapes_by_path(snapshots[0][2])
    for i, (_, _, tree) in enumerate(snapshots[1:], start=1):
        problem = _checks.first_difference(
            first,
            _checks.shapes_by_path(tree),
            expected_name="snapshots[0]",
            got_name=f"snapshots[{i}]",
            compare_dtypes=True,
        )
        if problem is not None:
            raise ValueError(f"snapshots do not match: {problem}")
    steps = [s for s, _, _ in snapshots]
    out_step = max(steps) if step is None else step
    weights = solve_coefficients(steps, [s for _, s, _ in snapshots], out_step, sigma_rel)
    order = sorted((i for i in range(len(snapshots)) if weights[i] != 0.0), key=steps.__getitem__)
    total = zeros(snapshots[0][2])
    for i in order:
        total = accumulate(total, [snapshots[i][2]], jnp.asarray(weights[i : i + 1]))
    return _dtypes.cast_back(total, [x.dtype for x in first.values()])
