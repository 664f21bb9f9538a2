"""The EMA kernel: the scalar decay arithmetic and the one elementwise pass over the leaves.

The update rule and its step conventions are written once, in ``docs/semantics.md``;
:class:`~ema_jax.EmaTransform` (``ema_jax/transform.py``) runs one update as three pieces:

* :func:`decays_at` — the decays ``β_t`` of the K averages at step ``t`` (scalar work);
* :func:`coefficients` — the lerp factor, its complement and the new total weight
  ``w_t`` from ``β_t`` and ``w_{t-1}`` (scalar work);
* :func:`average` — one elementwise pass over the leaves (the only memory traffic).

One decay is the case K = 1 of the same code. The only difference is the layout: a single
decay keeps params-shaped accumulators and a scalar weight, ``decay=(β_1, ..., β_K)``
gives every accumulator a trailing axis of size K and a ``[K]`` weight (so one pass reads
each param once for all K). The layout is read off the weight's shape, never re-decided.
Which leaves are averaged and in which dtype is :mod:`ema_jax._dtypes`' policy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ema_jax import _checks, _dtypes, schedules

Params = Any


def decays_at(
    decays: Sequence[float | schedules.Schedule],
    t: jax.Array,
    update_every: int,
    start_step: int = 0,
) -> jax.Array:
    """``[K]`` decays of an update at step ``t``, in the default float; with
    ``update_every > 1`` the product of the per-step decays over the steps it stands for
    (:func:`window_decay`)."""
    scalar = schedules.default_float()
    names = ["decay"] if len(decays) == 1 else [f"decay[{i}]" for i in range(len(decays))]
    if update_every > 1:
        # The update stands for the steps since the previous one: (t - n, t], n = k, or
        # fewer right after the copies of start_step.
        n = jnp.clip(t - start_step, 0, update_every)

        def products() -> jax.Array:
            return jnp.stack(
                [window_decay(d, t, n, update_every, x) for d, x in zip(decays, names, strict=True)]
            )

        # Only steps that update need them (a schedule may cost k evaluations).
        due = (t % update_every == 0) | (t <= start_step)
        return lax.cond(due, products, lambda: jnp.ones([len(decays)], scalar))
    return jnp.stack(
        [
            _checks.scalar_decay(x, d(t) if callable(d) else d, scalar)
            for d, x in zip(decays, names, strict=True)
        ]
    )


#: Steps of a schedule evaluated in one vectorised call by :func:`window_decay`.
WINDOW_CHUNK = 256


def window_decay(
    decay: float | schedules.Schedule, t: jax.Array, n: jax.Array, k: int, name: str = "decay"
) -> jax.Array:
    """``Π_{j=t-n+1..t} β_j`` (``n <= k`` steps, k static), in the default float.

    ``β^n`` for a constant; a schedule's own closed form when it has one (a
    :class:`~ema_jax.schedules.ClosedFormProduct`, e.g.
    :func:`~ema_jax.schedules.power_function`'s telescoping ``(1 - n/t)^(γ+1)``); otherwise
    the schedule evaluated at the steps ``t, t-1, ...`` in vectorised calls (``jax.vmap``)
    of ``c = min(k, WINDOW_CHUNK)`` steps and the first ``n`` multiplied: one call for
    ``k <= WINDOW_CHUNK``, else a ``lax.fori_loop`` over the ``⌈n/c⌉`` chunks the update
    stands for. O(n) scalar work and O(c) memory, whatever ``k`` is. ``name`` is the
    decay's in errors (a schedule that returns more than one number).
    """
    scalar = schedules.default_float()
    if not callable(decay):
        return jnp.asarray(decay, scalar) ** n.astype(scalar)
    if isinstance(decay, schedules.ClosedFormProduct):
        return _checks.scalar_decay(name, decay.decay_product(t, n), scalar)
    c = min(k, WINDOW_CHUNK)
    back = jnp.arange(c, dtype=t.dtype)

    def chunk(start: jax.Array) -> jax.Array:
        """The product of ``β_{t-start-j}`` over ``j < c`` with ``start + j < n``."""
        betas = jax.vmap(lambda j: _checks.scalar_decay(name, decay(j), scalar))(t - start - back)
        return jnp.prod(jnp.where(back < n - start, betas, jnp.ones((), scalar)))

    if k <= c:
        return chunk(jnp.zeros((), t.dtype))
    chunks = n // c + (n % c > 0)  # ⌈n/c⌉ without overflowing int32 near 2**31

    def times_chunk(i: jax.Array, product: jax.Array) -> jax.Array:
        return product * chunk(i * c)

    return lax.fori_loop(0, chunks.astype(t.dtype), times_chunk, jnp.ones((), scalar))


def coefficients(
    betas: jax.Array, weight: jax.Array, apply: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(α, keep, w_t)`` of one update, elementwise over the averages.

    ``w_t = β·w_{t-1} + (1 - β)``, ``α = (1 - β)/w_t`` and ``keep = β·w_{t-1}/w_t = 1 - α``
    (computed directly so it is not re-rounded). Not applied (skipped or not due): α = 0,
    keep = 1, weight unchanged. A schedule returning 1.0 before any weight (``w_t = 0``)
    keeps the copy instead of dividing 0 by 0.
    """
    new_weight = betas * weight + (1.0 - betas)
    use = apply & (new_weight > 0)
    denominator = jnp.where(use, new_weight, 1.0)
    alpha = jnp.where(use, (1.0 - betas) / denominator, 0.0)
    keep = jnp.where(use, betas * weight / denominator, 1.0)
    return alpha, keep, jnp.where(apply, new_weight, weight)


def average(
    accumulators: Params, params: Params, alpha: jax.Array, keep: jax.Array, apply: jax.Array
) -> Params:
    """The elementwise pass: every averaged accumulator lerps towards its param; integer
    and bool leaves are copied when ``apply``. ``alpha`` is ``[]`` or ``[K]``; with K the
    param gets a trailing axis and the factors broadcast over the K averages."""

    def leaf(a: jax.Array, p: jax.Array) -> jax.Array:
        p = p[..., None] if alpha.ndim else p
        if not _dtypes.is_averaged(a.dtype):
            # Reading `a` (a no-op select when applied) keeps the donated buffer in use, so
            # jit updates it in place.
            return jnp.where(apply, jnp.broadcast_to(p, a.shape).astype(a.dtype), a)
        return lerp(a, p.astype(a.dtype), alpha, keep)

    return jax.tree.map(leaf, accumulators, params)


def lerp(a: jax.Array, b: jax.Array, alpha: jax.Array, keep: jax.Array) -> jax.Array:
    """``a + α·(b - a)``, exact at both ends: α = 0 gives ``a``, α = 1 (keep = 0) gives ``b``,
    and ``a == b`` gives ``a``.

    Computed as ``a + (α·b - α·a)`` (``b - (keep·b - keep·a)`` for α ≥ 0.5; exactly ``b``
    for keep = 0 and ``a`` for α = 0, whatever the other end holds): ``b - a``
    overflows for huge finite values of opposite signs, the scaled terms cannot. ``keep =
    1 - α`` is passed in so it is not re-rounded; the scalar branch costs nothing in a
    memory-bound loop.
    """
    alpha = alpha.astype(a.dtype)
    keep = keep.astype(a.dtype)
    lerped = jnp.where(alpha < 0.5, a + (alpha * b - alpha * a), b - (keep * b - keep * a))
    # A copy is a copy and a skip a skip, even where the other end is Inf/NaN (0·Inf = NaN).
    return jnp.where(keep == 0, b, jnp.where(alpha == 0, a, lerped))


def all_finite(tree: Params) -> jax.Array:
    """Whether every averaged (floating) element of ``tree`` is finite, in one read.

    A sum with a NaN/Inf term is NaN/Inf in any order, so a finite ``Σ x`` proves the
    tree finite. Plain sums are XLA's fastest reductions and need no scratch buffer (on CPU,
    reducing ``isfinite(x)`` first writes a boolean copy of the leaf; ``max``/``min`` are
    unsafe: XLA:CPU's fast path drops NaNs). Only a non-finite sum (a NaN/Inf, or large
    finite values that overflow) takes the exact branch, ``Σ (x - x)``: 0, or NaN iff some
    ``x`` is NaN/Inf. Sharded params: scalar all-reduces only (one per mesh axis).
    """
    leaves = [x for x in jax.tree.leaves(tree) if _dtypes.is_averaged(x.dtype)]
    if not leaves:
        return jnp.bool_(True)

    def total(xs: list[jax.Array]) -> jax.Array:
        sums = [jnp.sum(x).astype(jnp.promote_types(x.dtype, jnp.float32)) for x in xs]
        return functools.reduce(jnp.add, sums)

    def exact(xs: list[jax.Array]) -> jax.Array:
        return jnp.isfinite(total([x - x for x in xs]))

    return lax.cond(jnp.isfinite(total(leaves)), lambda xs: jnp.bool_(True), exact, leaves)


def copies(x: jax.Array, dtype: Any, averages_shape: tuple[int, ...]) -> jax.Array:
    """Fresh buffers (never an alias of ``x``) holding ``x`` in ``dtype``, once per average:
    ``[*x.shape, *averages_shape]``, sharded like ``x`` (an averages axis replicated)."""
    x = jnp.asarray(x, dtype)
    expanded = x.reshape(x.shape + (1,) * len(averages_shape))
    return jnp.array(jnp.broadcast_to(expanded, x.shape + averages_shape), copy=True)


def array_leaves(params: Params) -> list[tuple[Any, Any]]:
    """``(path, leaf)`` pairs of ``params``; a ``TypeError`` naming the first leaf that is not
    an array (a Python float, a string, ...)."""
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves_with_paths:
        if not hasattr(leaf, "dtype"):
            where = jax.tree_util.keystr(path)
            raise TypeError(
                f"params{where} must be an array (e.g. jnp.asarray(...)), got {type(leaf).__name__}"
            )
    return leaves_with_paths
