"""The EMA of a parameter pytree as an optax-style ``init`` / ``update`` pair.

Plain (``debias=False``; the seed's and torch_ema's semantics)::

    ema_0 = θ_0                       (a copy, in the accumulator dtype)
    ema_t = β_t·ema_{t-1} + (1 - β_t)·θ_t = lerp(ema_{t-1}, θ_t, 1 - β_t)

Bias-corrected (``debias=True``): the zero-initialised EMA divided by its total weight,
exact under any schedule and any skipped update::

    w_t   = β_t·w_{t-1} + (1 - β_t),  w_0 = 0
    ema_t = Σ_k (1 - β_k)·Π_{j>k} β_j·θ_k / w_t

It is stored in one buffer, already divided, using the effective decay
``β̃_t = β_t·w_{t-1}/w_t`` (so ``1 - β̃_t = (1 - β_t)/w_t``; the first update copies θ_1).
Both variants run the same code: plain is the special case ``w_0 = 1`` (then ``w_t = 1``).

``t`` is the 1-based optimizer step (``count + 1``); see :mod:`ema_jax.schedules`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

from ema_jax import _checks, schedules

Decay = float | schedules.Schedule
Params = Any


class EmaState(struct.PyTreeNode):
    """State of :func:`ema`. A pytree; nothing in it aliases the params.

    Attributes:
      count: int32, optimizer steps seen (calls to ``update``).
      num_skipped: int32, updates skipped because the params held NaN/Inf.
      weight: ``[]`` (one decay) or ``[K]`` (K decays): ``w_t`` of the average, in JAX's
        default float dtype (float32; float64 under x64), like all decay arithmetic.
      ema: the accumulators, a tree like the params. With K decays every leaf has a
        trailing axis of size K (``[*param.shape, K]``), so one pass reads each param once
        and updates its K averages side by side; :func:`shadow` splits them.
      param_dtypes: static, the params' leaf dtypes, so :func:`shadow` can cast back.
    """

    count: jax.Array
    num_skipped: jax.Array
    weight: jax.Array
    ema: Params
    param_dtypes: tuple[np.dtype, ...] = struct.field(pytree_node=False)


def _is_float(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _accumulator_dtype(dtype: Any, requested: Any) -> np.dtype:
    """float32 for floats narrower than 32 bits unless ``requested``; others unchanged.

    A complex leaf gets the complex dtype of the requested precision (float32 →
    complex64), never the real dtype itself, which would drop the imaginary part.
    """
    dtype = np.dtype(dtype)
    if not _is_float(dtype):
        return dtype
    if requested is not None:
        if jnp.issubdtype(dtype, jnp.complexfloating):
            return np.dtype(jnp.promote_types(requested, jnp.complex64))
        return np.dtype(requested)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return np.dtype(jnp.float32)
    return dtype


def _as_decays(decay: Decay | Sequence[Decay]) -> tuple[schedules.Schedule, ...]:
    multi = isinstance(decay, (tuple, list))
    items = tuple(decay) if multi else (decay,)  # type: ignore[arg-type]
    if not items:
        raise ValueError(
            "decay must be a float in [0, 1), a schedule, or a non-empty tuple of them"
        )
    out: list[schedules.Schedule] = []
    for i, item in enumerate(items):
        name = f"decay[{i}]" if multi else "decay"
        if callable(item):
            out.append(item)
        else:
            out.append(schedules.constant(_checks.decay(name, item)))
    return tuple(out)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _first_difference(expected: Params, got: Params) -> str | None:
    """A message naming the first path where two trees differ in structure or shape."""
    exp = jax.tree_util.tree_flatten_with_path(expected)[0]
    act = jax.tree_util.tree_flatten_with_path(got)[0]
    for (pe, le), (pa, la) in zip(exp, act, strict=False):
        if pe != pa:
            return (
                f"params tree differs from the EMA state at {jax.tree_util.keystr(pe)} "
                f"(got {jax.tree_util.keystr(pa)})"
            )
        if jnp.shape(le) != jnp.shape(la):
            return (
                f"params{jax.tree_util.keystr(pa)} has shape {jnp.shape(la)}, "
                f"the EMA state has {jnp.shape(le)}"
            )
    if len(exp) != len(act):
        longer, which = (exp, "EMA state") if len(exp) > len(act) else (act, "params")
        path = jax.tree_util.keystr(longer[min(len(exp), len(act))][0])
        return f"params tree differs from the EMA state: only the {which} has {path}"
    if jax.tree.structure(expected) != jax.tree.structure(got):  # type: ignore[operator]
        return "params tree structure (node types) differs from the EMA state"
    return None


def _copy(x: jax.Array, dtype: np.dtype) -> jax.Array:
    """A fresh buffer (never an alias of ``x``), in ``dtype``, with ``x``'s sharding."""
    return jnp.array(x, dtype=dtype, copy=True)


def _stacked_copy(x: jax.Array, dtype: np.dtype, k: int) -> jax.Array:
    """``k`` copies of ``x`` side by side, ``[*x.shape, k]``, sharded like ``x`` (the new
    trailing axis replicated)."""
    stacked = jnp.broadcast_to(jnp.asarray(x, dtype)[..., None], (*jnp.shape(x), k))
    return jnp.array(stacked, copy=True)  # sharding propagates: x's axes, new axis replicated


def _lerp(a: jax.Array, b: jax.Array, alpha: jax.Array, keep: jax.Array) -> jax.Array:
    """``a + α·(b - a)``, exact at both ends: α = 0 gives ``a``, α = 1 (keep = 0) gives ``b``,
    and ``a == b`` gives ``a``.

    Computed as ``a + (α·b - α·a)`` (``b - (keep·b - keep·a)`` for α ≥ 0.5): ``b - a``
    overflows for huge finite values of opposite signs, the scaled terms cannot. ``keep =
    1 - α`` is passed in so it is not re-rounded; the scalar branch costs nothing in a
    memory-bound loop.
    """
    alpha = alpha.astype(a.dtype)
    keep = keep.astype(a.dtype)
    return jnp.where(alpha < 0.5, a + (alpha * b - alpha * a), b - (keep * b - keep * a))


def _all_finite(tree: Params) -> jax.Array:
    """Whether every floating element of ``tree`` is finite, in one read of the params.

    A sum with a NaN/Inf term is NaN/Inf in any order, so a finite ``Σ x`` proves the
    tree finite. Plain sums are XLA's fastest reductions and need no scratch buffer (on CPU,
    reducing ``isfinite(x)`` first writes a boolean copy of the leaf; ``max``/``min`` are
    unsafe: XLA:CPU's fast path drops NaNs). Only a non-finite sum (a NaN/Inf, or large
    finite values that overflow) takes the exact branch, ``Σ (x - x)``: 0, or NaN iff some
    ``x`` is NaN/Inf. Sharded params: scalar all-reduces only (one per mesh axis).
    """
    leaves = [x for x in jax.tree.leaves(tree) if _is_float(x.dtype)]
    if not leaves:
        return jnp.bool_(True)

    def total(xs: list[jax.Array]) -> jax.Array:
        sums = [jnp.sum(x).astype(jnp.promote_types(x.dtype, jnp.float32)) for x in xs]
        return functools.reduce(jnp.add, sums)

    def exact(xs: list[jax.Array]) -> jax.Array:
        return jnp.isfinite(total([x - x for x in xs]))

    return lax.cond(jnp.isfinite(total(leaves)), lambda xs: jnp.bool_(True), exact, leaves)


def ema(
    decay: Decay | Sequence[Decay],
    *,
    debias: bool | Sequence[bool] = False,
    update_every: int = 1,
    start_step: int = 0,
    accumulator_dtype: Any = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformation:
    """Exponential moving average of parameters, as an optax-style transform.

    ``update(params, state)`` takes the *current params* (not gradients) and returns
    ``(shadow_params, new_state)``; the shadow has the params' tree and dtypes.

    Args:
      decay: ``β`` in [0, 1), a schedule ``t -> β_t`` (see :mod:`ema_jax.schedules`), or a
        tuple of them to keep K averages in one pass (the shadow is then a K-tuple).
      debias: bias-corrected average (see the module docstring); the first update copies θ.
        With several decays, a tuple of bools (one per decay) mixes plain and debiased
        averages in one pass.
      update_every: update on every k-th optimizer step only, with ``β_t^k``, so the
        horizon stays in optimizer steps. Steps in between leave the average unchanged.
      start_step: for ``t <= start_step`` the shadow copies the params (``β = 0``).
      accumulator_dtype: dtype of the floating accumulators; ``None`` means float32 for
        floats narrower than 32 bits, else the leaf's own dtype. Complex leaves get the
        complex dtype of that precision (complex64 for float32). Integer and bool leaves
        are copied on every applied update, never averaged.
      skip_nonfinite: if any floating leaf of the params is NaN/Inf the update is skipped
        (average and weight unchanged) and ``num_skipped`` is incremented. The check is
        one extra read of the params and scalar all-reduces when they are sharded;
        everything else is shard-local. Steps on which no update is due (``update_every``)
        are neither checked nor counted.

    Raises:
      ValueError / TypeError naming the argument, for out-of-range settings.
    """
    decays = _as_decays(decay)
    multi = isinstance(decay, (tuple, list))
    update_every = _check_int("update_every", update_every, 1)
    start_step = _check_int("start_step", start_step, 0)
    if accumulator_dtype is not None:
        try:
            acc = np.dtype(accumulator_dtype)
        except TypeError as e:
            raise TypeError(
                f"accumulator_dtype must be a floating dtype, got {accumulator_dtype!r}"
            ) from e
        if not jnp.issubdtype(acc, jnp.floating):
            raise TypeError(f"accumulator_dtype must be a floating dtype, got {acc}")
    num_decays = len(decays)
    debiases = tuple(debias) if isinstance(debias, (tuple, list)) else (debias,) * num_decays
    if len(debiases) != num_decays or not all(isinstance(d, bool) for d in debiases):
        raise ValueError(
            f"debias must be a bool or {num_decays} bools (one per decay), got {debias!r}"
        )
    if isinstance(debias, (tuple, list)) and not multi:
        raise ValueError("debias may be a tuple only when decay is a tuple")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    initial_weights = tuple(0.0 if d else 1.0 for d in debiases)

    def init_fn(params: Params) -> EmaState:
        leaves = jax.tree.leaves(params)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if not hasattr(leaf, "dtype"):
                where = jax.tree_util.keystr(path)
                raise TypeError(f"params{where} must be an array, got {type(leaf).__name__}")

        def copy(x: jax.Array) -> jax.Array:
            dtype = _accumulator_dtype(x.dtype, accumulator_dtype)
            return _stacked_copy(x, dtype, num_decays) if multi else _copy(x, dtype)

        averages = jax.tree.map(copy, params)
        weight = jnp.asarray(
            initial_weights if multi else initial_weights[0], schedules.default_float()
        )
        return EmaState(
            count=jnp.zeros([], jnp.int32),
            num_skipped=jnp.zeros([], jnp.int32),
            weight=weight,
            ema=averages,
            param_dtypes=tuple(np.dtype(x.dtype) for x in leaves),
        )

    def update_fn(params: Params, state: EmaState, _: Any = None) -> tuple[Params, EmaState]:
        reference = (
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[:-1], a.dtype), state.ema)
            if multi
            else state.ema
        )
        problem = _first_difference(reference, params)
        if problem is not None:
            raise ValueError(problem)

        t = state.count + 1
        scalar = schedules.default_float()
        betas = jnp.stack([jnp.asarray(d(t), scalar).reshape(()) for d in decays])
        if update_every > 1:
            betas = betas**update_every
        copying = t <= start_step
        betas = jnp.where(copying, 0.0, betas)
        due = copying | (t % update_every == 0)
        if not skip_nonfinite:
            finite = jnp.bool_(True)
        elif update_every == 1:
            finite = _all_finite(params)  # every step is due
        else:  # read the params only on the steps that update
            finite = lax.cond(due, _all_finite, lambda _: jnp.bool_(True), params)
        apply = due & finite

        weight = state.weight.reshape(num_decays)
        new_weight = betas * weight + (1.0 - betas)
        safe = new_weight > 0  # a schedule returning 1.0 before any weight: keep the copy
        alpha = jnp.where(apply & safe, (1.0 - betas) / jnp.where(safe, new_weight, 1.0), 0.0)
        keep = jnp.where(apply & safe, betas * weight / jnp.where(safe, new_weight, 1.0), 1.0)
        new_weight = jnp.where(apply, new_weight, weight)

        # K decays: the [K] factors broadcast over the accumulators' trailing axis.
        a_k, keep_k = (alpha, keep) if multi else (alpha[0], keep[0])

        def leaf(a: jax.Array, p: jax.Array) -> jax.Array:
            p = p[..., None] if multi else p
            if not _is_float(a.dtype):
                # Copied on applied steps. Reading `a` (a no-op select when applied) keeps
                # the donated buffer in use, so jit updates it in place.
                return jnp.where(apply, jnp.broadcast_to(p, a.shape).astype(a.dtype), a)
            return _lerp(a, p.astype(a.dtype), a_k, keep_k)

        def averages(ema: Params) -> Params:
            return jax.tree.map(leaf, ema, params)

        if update_every == 1 and not skip_nonfinite:
            new_ema = averages(state.ema)  # no step is ever skipped: no branch to wait on
        else:
            # A cond, not a select: a skipped step (update_every, NaN) makes no pass over memory.
            new_ema = lax.cond(apply, averages, lambda ema: ema, state.ema)
        new_state = EmaState(
            count=t,
            num_skipped=state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
            weight=new_weight.reshape(state.weight.shape),
            ema=new_ema,
            param_dtypes=state.param_dtypes,
        )
        return shadow(new_state), new_state

    return optax.GradientTransformation(init_fn, update_fn)  # type: ignore[arg-type]


def shadow(state: EmaState, ema_index: int | None = None) -> Params:
    """The shadow params held by ``state``, cast back to the params' dtypes.

    One tree for a single decay; for ``decay=(β_1, ..., β_K)`` a tuple of K trees, or the
    tree of decay ``ema_index`` alone. A single decay's fp32 shadow is the accumulator buffer
    itself; with K decays each shadow is a slice of the stacked accumulators (a copy
    outside ``jit``, fused into its consumers inside).
    """
    k = num_averages(state)
    if k is not None and ema_index is None:
        return tuple(shadow(state, i) for i in range(k))
    tree = accumulators(state, ema_index)
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
        treedef,
        [
            x if x.dtype == d else x.astype(d)
            for x, d in zip(leaves, state.param_dtypes, strict=True)
        ],
    )


def accumulators(state: EmaState, ema_index: int | None = None) -> Params:
    """The raw accumulators of one average, params-shaped, in the accumulator dtypes
    (e.g. fp32 for bf16 params): ``state.ema`` for one decay, the slice of decay ``ema_index``
    (default 0) for K decays.

    Raises:
      ValueError: ``ema_index`` outside ``[0, K)`` (or not ``None``/0 for a single decay).
    """
    k = num_averages(state)
    if k is None:
        if ema_index not in (None, 0):
            raise ValueError(f"ema_index must be None or 0 for a single decay, got {ema_index!r}")
        return state.ema
    i = 0 if ema_index is None else ema_index
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < k:
        raise ValueError(f"ema_index must be in [0, {k}), got {ema_index!r}")
    return jax.tree.map(lambda x: x[..., i], state.ema)


def num_averages(state: EmaState) -> int | None:
    """K for a multi-decay state, ``None`` for a single decay."""
    return int(state.weight.shape[0]) if state.weight.ndim == 1 else None


__all__ = ["Decay", "EmaState", "accumulators", "ema", "num_averages", "shadow"]
