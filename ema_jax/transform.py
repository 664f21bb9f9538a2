"""The EMA of a parameter pytree as a pure ``init`` / ``update`` pair: :class:`EmaTransform`.

The update rule, its bias correction and its step conventions are written once, in
``docs/semantics.md``; this module implements them in three pieces:

* :func:`_decays_at` — the decays ``β_t`` of the K averages at step ``t`` (scalar work);
* :func:`_coefficients` — the lerp factor, its complement and the new total weight
  ``w_t`` from ``β_t`` and ``w_{t-1}`` (scalar work);
* :func:`_average` — one elementwise pass over the leaves (the only memory traffic).

One decay is the case K = 1 of the same code. The only difference is the layout: a single
decay keeps params-shaped accumulators and a scalar weight, ``decay=(β_1, ..., β_K)``
gives every accumulator a trailing axis of size K and a ``[K]`` weight (so one pass reads
each param once for all K). The layout is read off the weight's shape, never re-decided.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import warnings
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
_MAX_STEP = int(np.iinfo(np.int32).max)


class EmaState(struct.PyTreeNode):
    """State of an :class:`EmaTransform`. A pytree; nothing in it aliases the params.

    Attributes:
      count: int32, optimizer steps seen (calls to ``update``).
      num_skipped: int32, updates skipped because the params held NaN/Inf (with
        ``skip_nonfinite``) or the decay was NaN/Inf or outside [0, 1] (always checked).
        Like ``count``, it saturates at 2^31 - 1 instead of wrapping.
      weight: ``w_t`` of each average, in JAX's default float dtype (float32; float64 under
        x64), like all decay arithmetic: ``[]`` for one decay, ``[K]`` for K decays.
      ema: the accumulators, a tree like the params. With K decays every leaf has a
        trailing axis of size K (``[*param.shape, K]``); :func:`shadow` splits them.
      param_dtypes: static, the params' leaf dtypes, so :func:`shadow` can cast back.
    """

    count: jax.Array
    num_skipped: jax.Array
    weight: jax.Array
    ema: Params
    param_dtypes: tuple[np.dtype, ...] = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class EmaTransform:
    """An exponential moving average of params: ``init(params)``, ``update(params, state)``.

    Made by :func:`ema`, which documents the settings. It averages *params*, not updates:
    it is not an ``optax.GradientTransformation`` and cannot be chained with one or used as
    an optimizer (the extra arguments optax and ``TrainState`` pass raise a ``TypeError``).
    Call it after the optimizer step with the new params, or let
    :class:`~ema_jax.EmaTrainState` do so. Frozen and hashable, so it can be a static field
    of a pytree; transforms built from equal constant decays compare equal.
    """

    decays: tuple[float | schedules.Schedule, ...]
    debias: tuple[bool, ...]
    stacked: bool  # decay was a tuple: accumulators carry a trailing axis of K averages
    update_every: int = 1
    start_step: int = 0
    accumulator_dtype: np.dtype | None = None
    skip_nonfinite: bool = False

    @property
    def num_averages(self) -> int | None:
        """K when built from a tuple of decays, ``None`` for a single decay."""
        return len(self.decays) if self.stacked else None

    def init(self, params: Params) -> EmaState:
        """A state whose averages are copies of ``params`` (fresh buffers, same shardings)."""
        leaves_with_paths = _array_leaves(params)
        self._warn_inaccurate({self._accumulator(leaf.dtype) for _, leaf in leaves_with_paths})
        averages_shape = (len(self.decays),) if self.stacked else ()
        initial_weights = [0.0 if d else 1.0 for d in self.debias]
        return EmaState(
            count=jnp.zeros([], jnp.int32),
            num_skipped=jnp.zeros([], jnp.int32),
            weight=jnp.asarray(initial_weights, schedules.default_float()).reshape(averages_shape),
            ema=jax.tree.map(
                lambda x: _copies(x, self._accumulator(x.dtype), averages_shape), params
            ),
            param_dtypes=tuple(np.dtype(leaf.dtype) for _, leaf in leaves_with_paths),
        )

    def update(self, params: Params, state: EmaState, *misuse: Any) -> tuple[Params, EmaState]:
        """One step: ``(shadow_params, new_state)`` from the params after the optimizer step.

        The shadow has the params' tree and dtypes (a K-tuple of trees for K decays).
        """
        if misuse:  # optax.chain and TrainState call update(updates, state, params)
            raise TypeError(
                "EmaTransform.update(params, state) averages params, not updates: it is not an "
                "optax.GradientTransformation, so it cannot go in optax.chain or serve as an "
                "optimizer (tx=). Call it after the optimizer step with the new params, or "
                "pass it as EmaTrainState.create(..., ema=...)"
            )
        if not isinstance(state, EmaState):
            raise TypeError(
                f"state must be the EmaState returned by init(params), got {type(state).__name__}"
            )
        self._check_matches(params, state)
        t = optax.safe_increment(state.count)  # saturates at 2^31 - 1 instead of wrapping
        betas = _decays_at(self.decays, t, self.update_every, self.start_step)
        betas = betas.reshape(state.weight.shape)
        copying = t <= self.start_step
        betas = jnp.where(copying, 0.0, betas)
        due = copying | (t % self.update_every == 0)
        # Always checked (scalar work): a decay that is NaN/Inf or outside [0, 1] (a faulty
        # schedule) skips the update and is counted, so the shadow stays an average.
        decay_ok = jnp.all((betas >= 0.0) & (betas <= 1.0))  # False for NaN
        if not self.skip_nonfinite:
            finite = decay_ok
        elif self.update_every == 1:
            finite = decay_ok & _all_finite(params)  # every step is due
        else:  # read the params only on the steps that update
            finite = decay_ok & lax.cond(due, _all_finite, lambda _: jnp.bool_(True), params)
        finite = finite | ~due  # steps not due are neither checked nor counted
        betas = jnp.where(decay_ok, betas, 0.0)  # no NaN reaches the weight, even unapplied
        apply = due & finite
        alpha, keep, weight = _coefficients(betas, state.weight, apply)

        def average(ema: Params) -> Params:
            return _average(ema, params, alpha, keep, apply)

        if self.update_every == 1 and not self.skip_nonfinite:
            # Rarely skipped (a faulty decay only): α = 0 then leaves the average exact, so
            # there is no branch to wait on.
            new_ema = average(state.ema)
        else:
            # A cond, not a select: a skipped step (update_every, NaN) makes no pass over memory.
            new_ema = lax.cond(apply, average, lambda ema: ema, state.ema)
        new_state = state.replace(
            count=t,
            num_skipped=jnp.where(
                finite, state.num_skipped, optax.safe_increment(state.num_skipped)
            ),
            weight=weight,
            ema=new_ema,
        )
        return shadow(new_state), new_state

    def _warn_inaccurate(self, accumulators: set[np.dtype]) -> None:
        """Warns for a constant decay too long for float32 accumulators (see
        ``_checks.accuracy``); narrower ones were warned about by :func:`ema`."""
        bits = [np.finfo(d).bits for d in accumulators if _is_float(d)]
        narrowest = min((b for b in bits if b >= 32), default=None)
        for i, d in enumerate(self.decays):
            if narrowest is not None and not callable(d):
                name = f"decay[{i}]" if self.stacked else "decay"
                _checks.accuracy(name, d, np.dtype(f"float{narrowest}"))

    def _accumulator(self, dtype: Any) -> np.dtype:
        """float32 for floats narrower than 32 bits unless ``accumulator_dtype`` is set;
        complex leaves get the complex dtype of that precision (never the real dtype, which
        would drop the imaginary part); integer and bool leaves keep their dtype."""
        dtype = np.dtype(dtype)
        if not _is_float(dtype):
            return dtype
        if self.accumulator_dtype is not None:
            if jnp.issubdtype(dtype, jnp.complexfloating):
                return np.dtype(jnp.promote_types(self.accumulator_dtype, jnp.complex64))
            return self.accumulator_dtype
        if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
            return np.dtype(jnp.float32)
        return dtype

    def _check_matches(self, params: Params, state: EmaState) -> None:
        """A ``ValueError`` naming the first path where ``params`` and the state differ
        (tree, shape, or kind of dtype: bool / integer / real / complex)."""
        if state.weight.ndim != int(self.stacked) or (
            self.stacked and state.weight.shape[0] != len(self.decays)
        ):
            k = num_averages(state)
            have = "one average" if k is None else f"{k} averages"
            want = f"{len(self.decays)} averages" if self.stacked else "one average"
            raise ValueError(
                f"the state holds {have} but this transform keeps {want}: pass the state "
                "made by this transform's init"
            )
        leaves_with_paths = _array_leaves(params)
        trailing = state.weight.ndim  # the averages axis, if any
        problem = _checks.first_difference(
            _checks.shapes_by_path(state.ema, "params", drop=trailing),
            _checks.shapes_by_path(params, "params"),
            expected_name="EMA state",
            got_name="params",
        )
        same_nodes = jax.tree.structure(state.ema) == jax.tree.structure(params)  # type: ignore[operator]
        if problem is None and not same_nodes:
            problem = "the params tree's node types differ from the EMA state's"
        if problem is not None:
            raise ValueError(f"params do not match the EMA state: {problem}")
        for (path, leaf), dtype in zip(leaves_with_paths, state.param_dtypes, strict=True):
            if _kind(leaf.dtype) != _kind(dtype):
                raise ValueError(
                    f"params do not match the EMA state: params{jax.tree_util.keystr(path)} "
                    f"has dtype {np.dtype(leaf.dtype).name} in the params, {dtype.name} in the "
                    f"EMA state ({_kind(leaf.dtype)} vs {_kind(dtype)} values cannot be "
                    "averaged into each other)"
                )


def ema(
    decay: Decay | Sequence[Decay],
    *,
    debias: bool | Sequence[bool] = False,
    update_every: int = 1,
    start_step: int = 0,
    accumulator_dtype: Any = None,
    skip_nonfinite: bool = False,
) -> EmaTransform:
    """An exponential moving average of params (formulas: ``docs/semantics.md``).

    ``tx.update(params, state)`` takes the *current params* (not gradients) and returns
    ``(shadow_params, new_state)``; the shadow has the params' tree and dtypes.

    Args:
      decay: ``β`` in [0, 1), a schedule ``t -> β_t`` (see :mod:`ema_jax.schedules`), or a
        tuple of them to keep K averages in one pass (the shadow is then a K-tuple).
      debias: bias-corrected average; the first update copies θ. With several decays, a
        tuple of bools (one per decay) mixes plain and debiased averages in one pass.
      update_every: update on every k-th optimizer step only, with the product of the
        decays of the k steps the update stands for (``β^k`` for a constant), so the
        horizon stays in optimizer steps. Steps in between leave the average unchanged.
      start_step: for ``t <= start_step`` the shadow copies the params (``β = 0``).
      accumulator_dtype: dtype of the floating accumulators; ``None`` means float32 for
        floats narrower than 32 bits, else the leaf's own dtype. Complex leaves get the
        complex dtype of that precision (complex64 for float32). Integer and bool leaves
        are copied on every applied update, never averaged.
      skip_nonfinite: opt-in (like ``optax.apply_if_finite``): if any floating leaf of the
        params is NaN/Inf the update is skipped (average and weight unchanged) and
        ``num_skipped`` is incremented. The check is one extra read of the params and
        scalar all-reduces when they are sharded; everything else is shard-local. Steps on
        which no update is due (``update_every``) are neither checked nor counted. Off, a
        NaN/Inf in the params reaches the average.

    Raises:
      ValueError / TypeError naming the argument, for out-of-range settings.
    """
    stacked = isinstance(decay, (tuple, list))
    items: tuple[Decay, ...] = tuple(decay) if isinstance(decay, (tuple, list)) else (decay,)  # type: ignore[assignment]
    if not items:
        raise ValueError(
            "decay must be a float in [0, 1), a schedule, or a non-empty tuple of them"
        )
    decays = tuple(_decay(f"decay[{i}]" if stacked else "decay", d) for i, d in enumerate(items))
    debiases: tuple[bool, ...] = (
        tuple(debias) if isinstance(debias, (tuple, list)) else (debias,) * len(decays)  # type: ignore[assignment]
    )
    if len(debiases) != len(decays) or not all(isinstance(d, bool) for d in debiases):
        raise ValueError(
            f"debias must be a bool or {len(decays)} bools (one per decay), got {debias!r}"
        )
    if isinstance(debias, (tuple, list)) and not stacked:
        raise ValueError("debias may be a tuple only when decay is a tuple")
    return EmaTransform(
        decays=decays,
        debias=debiases,
        stacked=stacked,
        # Steps are int32 (the count saturates at 2^31 - 1): larger settings would never apply.
        update_every=_checks.integer("update_every", update_every, 1, maximum=_MAX_STEP),  # type: ignore[arg-type]
        start_step=_checks.integer("start_step", start_step, 0, maximum=_MAX_STEP - 1),  # type: ignore[arg-type]
        accumulator_dtype=_narrow_ok(accumulator_dtype),
        skip_nonfinite=_checks.flag("skip_nonfinite", skip_nonfinite),
    )


def _narrow_ok(accumulator_dtype: Any) -> np.dtype | None:
    """The checked ``accumulator_dtype``; a warning when it is narrower than float32 (kept,
    as asked: bf16 loses any step below half its ulp, so its average stalls far from the
    params, and float16 overflows above 65504)."""
    if accumulator_dtype is None:
        return None
    dtype = _checks.floating_dtype("accumulator_dtype", accumulator_dtype)
    if np.finfo(dtype).bits < 32:
        warnings.warn(
            f"accumulator_dtype={dtype.name} is narrower than float32: each EMA step is "
            f"rounded to {dtype.name}, so an average with a decay near 1 stalls far from the "
            "params (bfloat16, decay 0.999: 0.25 instead of 0.993 after 5000 steps towards "
            "1.0) and float16 overflows above 65504. Leave accumulator_dtype=None (float32 "
            "for narrow params) unless you have measured that it suffices",
            UserWarning,
            stacklevel=3,
        )
    return dtype


def _decay(name: str, value: Decay) -> float | schedules.Schedule:
    """A schedule as given, or a constant decay checked and kept as a float (so equal
    settings make equal transforms)."""
    if callable(value):
        return value
    beta = _checks.decay(name, value)
    return _checks.below_one(beta, name, value, "it", schedules.default_float())


def _decays_at(
    decays: Sequence[float | schedules.Schedule],
    t: jax.Array,
    update_every: int,
    start_step: int = 0,
) -> jax.Array:
    """``[K]`` decays of an update at step ``t``, in the default float; with
    ``update_every > 1`` the product of the per-step decays over the steps it stands for
    (:func:`_window_decay`)."""
    scalar = schedules.default_float()
    if update_every > 1:
        # The update stands for the steps since the previous one: (t - n, t], n = k, or
        # fewer right after the copies of start_step.
        n = jnp.clip(t - start_step, 0, update_every)

        def products() -> jax.Array:
            return jnp.stack([_window_decay(d, t, n, update_every) for d in decays])

        # Only steps that update need them (a schedule may cost k evaluations).
        due = (t % update_every == 0) | (t <= start_step)
        return lax.cond(due, products, lambda: jnp.ones([len(decays)], scalar))
    return jnp.stack([jnp.asarray(d(t) if callable(d) else d, scalar).reshape(()) for d in decays])


def _window_decay(
    decay: float | schedules.Schedule, t: jax.Array, n: jax.Array, k: int
) -> jax.Array:
    """``Π_{j=t-n+1..t} β_j`` (``n <= k`` steps, k static), in the default float.

    ``β^n`` for a constant; a schedule's own closed form when it has one (its
    ``decay_product(t, n)``, e.g. :func:`~ema_jax.schedules.power_function`'s telescoping
    ``(1 - n/t)^(γ+1)``); otherwise the schedule evaluated at the k steps ``t-k+1..t`` in
    one vectorised call (``jax.vmap``) and the last ``n`` multiplied: O(k) scalar work.
    """
    scalar = schedules.default_float()
    if not callable(decay):
        return jnp.asarray(decay, scalar) ** n.astype(scalar)
    product = getattr(decay, "decay_product", None)
    if product is not None:
        return jnp.asarray(product(t, n), scalar).reshape(())
    back = jnp.arange(k, dtype=t.dtype)  # t - back: t, t-1, ..., t-k+1
    betas = jax.vmap(lambda j: jnp.asarray(decay(j), scalar).reshape(()))(t - back)
    return jnp.prod(jnp.where(back < n, betas, jnp.ones((), scalar)))


def _coefficients(
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


def _average(
    ema: Params, params: Params, alpha: jax.Array, keep: jax.Array, apply: jax.Array
) -> Params:
    """The elementwise pass: every floating accumulator lerps towards its param; integer
    and bool leaves are copied when ``apply``. ``alpha`` is ``[]`` or ``[K]``; with K the
    param gets a trailing axis and the factors broadcast over the K averages."""

    def leaf(a: jax.Array, p: jax.Array) -> jax.Array:
        p = p[..., None] if alpha.ndim else p
        if not _is_float(a.dtype):
            # Reading `a` (a no-op select when applied) keeps the donated buffer in use, so
            # jit updates it in place.
            return jnp.where(apply, jnp.broadcast_to(p, a.shape).astype(a.dtype), a)
        return _lerp(a, p.astype(a.dtype), alpha, keep)

    return jax.tree.map(leaf, ema, params)


def _array_leaves(params: Params) -> list[tuple[Any, Any]]:
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


def _kind(dtype: Any) -> str:
    """``"bool"``, ``"integer"``, ``"complex"`` or ``"real"``: dtypes of one kind may be cast
    into each other's accumulators, different kinds may not."""
    for kind, family in (
        ("bool", jnp.bool_),
        ("integer", jnp.integer),
        ("complex", jnp.complexfloating),
    ):
        if jnp.issubdtype(dtype, family):
            return kind
    return "real"


def _is_float(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _copies(x: jax.Array, dtype: np.dtype, averages_shape: tuple[int, ...]) -> jax.Array:
    """Fresh buffers (never an alias of ``x``) holding ``x`` in ``dtype``, once per average:
    ``[*x.shape, *averages_shape]``, sharded like ``x`` (an averages axis replicated)."""
    x = jnp.asarray(x, dtype)
    expanded = x.reshape(x.shape + (1,) * len(averages_shape))
    return jnp.array(jnp.broadcast_to(expanded, x.shape + averages_shape), copy=True)


def _lerp(a: jax.Array, b: jax.Array, alpha: jax.Array, keep: jax.Array) -> jax.Array:
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
    return _cast_leaves(accumulators(state, ema_index), state.param_dtypes)


def _cast_leaves(tree: Params, dtypes: Sequence[Any]) -> Params:
    """``tree`` with leaf ``i`` in ``dtypes[i]`` (leaves already in it are kept as they are)."""
    leaves, treedef = jax.tree.flatten(tree)
    cast = [x if x.dtype == d else x.astype(d) for x, d in zip(leaves, dtypes, strict=True)]
    return jax.tree.unflatten(treedef, cast)


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
    try:  # Python and NumPy ints, concrete integer arrays; not bools, floats or tracers
        i = 0 if ema_index is None else operator.index(ema_index)
    except TypeError:
        i = -1
    if isinstance(ema_index, (bool, np.bool_)) or not 0 <= i < k:
        raise ValueError(f"ema_index must be in [0, {k}), got {ema_index!r} (a static int)")
    return jax.tree.map(lambda x: x[..., i], state.ema)


def num_averages(state: EmaState) -> int | None:
    """K for a multi-decay state, ``None`` for a single decay."""
    return int(state.weight.shape[0]) if state.weight.ndim == 1 else None


__all__ = [
    "Decay",
    "EmaState",
    "EmaTransform",
    "accumulators",
    "ema",
    "num_averages",
    "shadow",
]
