"""The EMA of a parameter pytree as a pure ``init`` / ``update`` pair: :class:`EmaTransform`.

The words are those of the glossary in ``docs/semantics.md``: the *rule* is an
:class:`EmaTransform` (made by :func:`ema`), its *state* an :class:`EmaState`, whose
``ema`` field holds the *accumulators* (full precision, e.g. fp32 for bf16 params); the
*shadow* is one average cast back to the params' dtypes, the weights to evaluate and deploy
(:func:`shadow`; all K of them: :func:`shadows`).

The update rule, its bias correction and its step conventions are written once, in
``docs/semantics.md``; :mod:`ema_jax._kernel` implements them in three pieces (the decays
``β_t`` of the K averages, the lerp coefficients, one elementwise pass over the leaves).
One decay is the case K = 1 of the same code. The only difference is the layout: a single
decay keeps params-shaped accumulators and a scalar weight, ``decay=(β_1, ..., β_K)``
gives every accumulator a trailing axis of size K and a ``[K]`` weight (so one pass reads
each param once for all K). The layout is read off the weight's shape, never re-decided.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

from ema_jax import _checks, _dtypes, _kernel, placement, schedules

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
      ema: the accumulators, a tree like the params (the name is in every saved
        checkpoint's paths). With K decays every leaf has a trailing axis of size K
        (``[*param.shape, K]``); :func:`accumulators` and :func:`shadow` take one slice.
      param_dtypes: static, the params' leaf dtypes, so :func:`shadow` can cast back.
      shardings: static, with ``shard_over`` only: each accumulator's sharding as ``init``
        chose it (``None`` for a leaf that keeps its param's layout); ``None`` otherwise.
    """

    count: jax.Array
    num_skipped: jax.Array
    weight: jax.Array
    ema: Params
    param_dtypes: tuple[np.dtype, ...] = struct.field(pytree_node=False)
    shardings: tuple[Any, ...] | None = struct.field(pytree_node=False, default=None)


@dataclasses.dataclass(frozen=True)
class EmaTransform:
    """An exponential moving average of params: ``init(params)``, ``update(params, state)``.

    Made by :func:`ema`, which documents the settings. It averages *params*, not updates:
    it is not an ``optax.GradientTransformation`` and cannot be chained with one or used as
    an optimizer (the extra arguments optax and ``TrainState`` pass raise a ``TypeError``).
    Call it after the optimizer step with the new params, or let
    :class:`~ema_jax.EmaTrainState` do so. Frozen and hashable, so it can be a static field
    of a pytree; transforms built alike (equal constant decays, equal
    :mod:`~ema_jax.schedules`) compare and hash equal, so a jitted step compiled for one
    serves the other.
    """

    decays: tuple[float | schedules.Schedule, ...]
    debias: tuple[bool, ...]
    stacked: bool  # decay was a tuple: accumulators carry a trailing axis of K averages
    update_every: int = 1
    start_step: int = 0
    accumulator_dtype: np.dtype | None = None
    skip_nonfinite: bool = False
    memory_kind: str | None = None  # "pinned_host": the accumulators live in host memory
    shard_over: tuple[str, ...] | None = None  # mesh axes the accumulators are split over

    @property
    def num_averages(self) -> int:
        """K, the number of averages kept: 1 for a single decay."""
        return len(self.decays)

    def init(self, params: Params) -> EmaState:
        """A state whose averages are copies of ``params`` (fresh buffers, same shardings)."""
        leaves_with_paths = _kernel.array_leaves(params)
        self._warn_inaccurate({self._accumulator(leaf.dtype) for _, leaf in leaves_with_paths})
        averages_shape = (len(self.decays),) if self.stacked else ()
        initial_weights = [0.0 if d else 1.0 for d in self.debias]
        copies = jax.tree.map(
            lambda x: _kernel.copies(x, self._accumulator(x.dtype), averages_shape), params
        )
        ema, shardings = placement.place(
            copies, params, self.shard_over, self.memory_kind, len(averages_shape)
        )
        return EmaState(
            count=jnp.zeros([], jnp.int32),
            num_skipped=jnp.zeros([], jnp.int32),
            weight=jnp.asarray(initial_weights, schedules.default_float()).reshape(averages_shape),
            ema=ema,
            param_dtypes=tuple(np.dtype(leaf.dtype) for _, leaf in leaves_with_paths),
            shardings=shardings,
        )

    def update(
        self, params: Params, state: EmaState, *misuse: Any, optimizer_step: Any = True
    ) -> tuple[Params, EmaState]:
        """One step: ``(shadow, new_state)`` from the params after the optimizer step.

        The shadow has the params' tree and dtypes: ``shadow(new_state)`` for a single
        decay, every average, ``shadows(new_state)`` (a K-tuple), for a tuple of decays, as
        ``EmaTrainState.ema_params`` and ``nnx.EMA.params`` give them. Under ``jit`` the
        averages not used are never materialised. Offloaded (``memory_kind``) it is in host
        memory like the accumulators (:func:`shadow` reads them onto the devices): a
        jitted update donating the state then outputs no device buffer XLA could alias.

        ``optimizer_step``: a bool or a boolean scalar, traced under ``jit`` too; ``False``
        (a micro-step of gradient accumulation) leaves the state unchanged, so ``count``,
        schedules, ``update_every`` and ``start_step`` count real steps only
        (:func:`ema_jax.optimizer_stepped` reads it off an ``optax.MultiSteps`` state).
        """
        if misuse:  # optax.chain and TrainState call update(updates, state, params)
            raise _checks.not_an_optimizer(type(self).__name__)
        if not isinstance(state, EmaState):
            raise TypeError(
                f"state must be the EmaState returned by init(params), got {type(state).__name__}"
            )
        self.check_matches(params, state)
        stepped = _checks.traced_flag("optimizer_step", optimizer_step)  # None: True
        t = optax.safe_increment(state.count)  # saturates at 2^31 - 1 instead of wrapping
        betas = _kernel.decays_at(self.decays, t, self.update_every, self.start_step)
        betas = betas.reshape(state.weight.shape)
        copying = t <= self.start_step
        betas = jnp.where(copying, 0.0, betas)
        due = copying | (t % self.update_every == 0)
        if stepped is not None:
            due = due & stepped  # a micro-step of gradient accumulation changes nothing
        # Always checked (scalar work): a decay that is NaN/Inf or outside [0, 1] (a faulty
        # schedule) skips the update and is counted, so the shadow stays an average.
        decay_ok = jnp.all((betas >= 0.0) & (betas <= 1.0))  # False for NaN
        if not self.skip_nonfinite:
            finite = decay_ok
        elif self.update_every == 1:
            finite = decay_ok & _kernel.all_finite(params)  # every step is due
        else:  # read the params only on the steps that update
            finite = decay_ok & lax.cond(due, _kernel.all_finite, lambda _: jnp.bool_(True), params)
        finite = finite | ~due  # steps not due are neither checked nor counted
        betas = jnp.where(decay_ok, betas, 0.0)  # no NaN reaches the weight, even unapplied
        apply = due & finite
        alpha, keep, weight = _kernel.coefficients(betas, state.weight, apply)

        shardings, axes = state.shardings, self.shard_over
        if shardings is not None and axes is not None:
            params = placement.local_slices(params, shardings, axes)

        def average(ema: Params) -> Params:
            # Offloaded: fetched and stored here, so a step that skips moves nothing.
            new = _kernel.average(placement.to_device(ema), params, alpha, keep, apply)
            if shardings is not None and axes is not None:
                new = placement.constrain(new, shardings)
            return placement.to_host(new) if self.memory_kind else new

        if self.update_every == 1 and not self.skip_nonfinite and stepped is None:
            # Rarely skipped (a faulty decay only): α = 0 then leaves the average exact, so
            # there is no branch to wait on.
            new_ema = average(state.ema)
        else:
            # A cond, not a select: a skipped step (update_every, NaN, a micro-step) makes
            # no pass over memory.
            new_ema = lax.cond(apply, average, lambda ema: ema, state.ema)
        new_state = state.replace(
            count=t if stepped is None else jnp.where(stepped, t, state.count),
            num_skipped=jnp.where(
                finite, state.num_skipped, optax.safe_increment(state.num_skipped)
            ),
            weight=weight,
            ema=new_ema,
        )
        out = shadows(new_state) if self.stacked else shadow(new_state)
        return (placement.to_host(out) if self.memory_kind else out), new_state

    def _warn_inaccurate(self, accumulators: set[np.dtype]) -> None:
        """Warns for a constant decay too long for float32 accumulators (see
        ``_checks.accuracy``); narrower ones were warned about by :func:`ema`."""
        bits = [np.finfo(d).bits for d in accumulators if _dtypes.is_averaged(d)]
        narrowest = min((b for b in bits if b >= 32), default=None)
        for i, d in enumerate(self.decays):
            if narrowest is not None and not callable(d):
                name = f"decay[{i}]" if self.stacked else "decay"
                _checks.accuracy(name, d, np.dtype(f"float{narrowest}"))

    def _accumulator(self, dtype: Any) -> np.dtype:
        """The accumulator dtype of a leaf of ``dtype`` (:func:`ema_jax._dtypes.accumulator`
        with this transform's ``accumulator_dtype``)."""
        return _dtypes.accumulator(dtype, self.accumulator_dtype)

    def check_matches(self, params: Params, state: EmaState) -> None:
        """A ``ValueError`` naming the first path where ``params`` and the state differ
        (tree, shape, or kind of dtype: bool / integer / real / complex)."""
        if state.weight.ndim != int(self.stacked) or (
            self.stacked and state.weight.shape[0] != len(self.decays)
        ):
            k = num_averages(state)
            have = f"{k} averages" if state.weight.ndim else "one average"
            want = f"{len(self.decays)} averages" if self.stacked else "one average"
            raise ValueError(
                f"the state holds {have} but this transform keeps {want}: pass the state "
                "made by this transform's init"
            )
        _kernel.array_leaves(params)  # a TypeError naming a leaf that is not an array
        problem = _checks.params_difference(
            state.ema, params, state.param_dtypes, drop=state.weight.ndim, kind=_dtypes.kind
        )
        if problem is not None:
            raise ValueError(f"params do not match the EMA state: {problem}")

    def shadow(self, state: EmaState, params: Params, ema_index: int | None = None) -> Params:
        """:func:`shadow` of ``state``. ``params`` are not read: every rule takes them, as
        BEMA's shadow depends on them (:class:`ema_jax.BemaTransform`)."""
        return shadow(state, ema_index)

    def accumulators(self, state: EmaState, params: Params, ema_index: int | None = None) -> Params:
        """:func:`accumulators` of ``state`` (the shadow before the cast back)."""
        return accumulators(state, ema_index)


def ema(
    decay: Decay | Sequence[Decay],
    *,
    debias: bool | Sequence[bool] = False,
    update_every: int = 1,
    start_step: int = 0,
    accumulator_dtype: Any = None,
    skip_nonfinite: bool = False,
    memory_kind: str | None = None,
    shard_over: str | Sequence[str] | None = None,
) -> EmaTransform:
    """An exponential moving average of params (formulas: ``docs/semantics.md``).

    ``tx.update(params, state)`` takes the *current params* (not gradients) and returns
    ``(shadow, new_state)``; the shadow has the params' tree and dtypes.

    Args:
      decay: ``β`` in [0, 1), a schedule ``t -> β_t`` (see :mod:`ema_jax.schedules`), or a
        tuple of them to keep K averages in one pass (``update`` then returns the K
        shadows as a tuple).
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
      memory_kind: ``"pinned_host"``: the accumulators live in pinned host memory; each
        update brings them to the devices and back (bitwise the same average).
      shard_over: a mesh axis name or a tuple of them (e.g. ``"data"``): the accumulator of
        a param replicated over those axes is split over them (1/N of it per device; the
        update reads each device's own slice, no collective). Params sharded over them
        already keep their layout; leaves with no divisible dimension stay replicated
        (warned once, at ``init``). ``init`` needs concrete, placed params.

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
        accumulator_dtype=_checks.accumulator_dtype(accumulator_dtype),
        skip_nonfinite=_checks.flag("skip_nonfinite", skip_nonfinite),
        memory_kind=placement.memory_kind(memory_kind),
        shard_over=placement.shard_axes(shard_over),
    )


def _decay(name: str, value: Decay) -> float | schedules.Schedule:
    """A schedule as given, or a constant decay checked and kept as a float (so equal
    settings make equal transforms)."""
    if callable(value):
        return value
    beta = _checks.decay(name, value)
    return _checks.below_one(beta, name, value, "it", schedules.default_float())


def shadow(state: EmaState, ema_index: int | None = None) -> Params:
    """The shadow of one average: its accumulators cast back to the params' tree and dtypes.

    ``ema_index`` picks one of K decays; ``None`` (the default) is the first average, for a
    single decay the only one. All K at once: :func:`shadows`. A single decay's fp32
    shadow is the accumulator buffer itself; with K decays each shadow is a slice of the
    stacked accumulators (a copy outside ``jit``, fused into its consumers inside).

    Raises:
      ValueError: ``ema_index`` is not an average of ``state`` (see :func:`accumulators`).
    """
    return _dtypes.cast_back(accumulators(state, ema_index), state.param_dtypes)


def shadows(state: EmaState) -> tuple[Params, ...]:
    """Every average's shadow, in the order of the decays: a tuple of K trees (a 1-tuple
    for a single decay)."""
    return tuple(shadow(state, i) for i in range(num_averages(state)))


def accumulators(state: EmaState, ema_index: int | None = None) -> Params:
    """The raw accumulators of one average, params-shaped, in the accumulator dtypes
    (e.g. fp32 for bf16 params): ``state.ema`` for one decay, the slice of average
    ``ema_index`` for K decays. ``None`` (the default) is the first average.

    Raises:
      ValueError: ``ema_index`` not a static int in ``[0, K)`` (``None`` or 0 for a single
        decay).
    """
    i = _average_index(state, ema_index)
    ema = placement.to_device(state.ema)  # offloaded: read on the devices
    if state.weight.ndim == 0:  # one decay: params-shaped, no averages axis
        return ema
    return jax.tree.map(lambda x: x[..., i], ema)


def _average_index(state: EmaState, ema_index: int | None) -> int:
    """The position of the average ``ema_index`` names: ``None`` is the first (0); a Python
    or NumPy int or a concrete integer array in ``[0, K)`` is itself. The one place where
    ``ema_index`` is read: every API taking it passes it through here."""
    k = num_averages(state)
    try:  # Python and NumPy ints, concrete integer arrays; not bools, floats or tracers
        i = 0 if ema_index is None else operator.index(ema_index)
    except TypeError:
        i = -1
    if isinstance(ema_index, (bool, np.bool_)) or not 0 <= i < k:
        if state.weight.ndim == 0:
            raise ValueError(f"ema_index must be None or 0 for a single decay, got {ema_index!r}")
        raise ValueError(f"ema_index must be in [0, {k}), got {ema_index!r} (a static int)")
    return i


def num_averages(state: EmaState) -> int:
    """K, the number of averages ``state`` holds: 1 for a single decay."""
    if not isinstance(state, EmaState):  # e.g. BEMA's, whose shadow also reads the params
        raise TypeError(
            f"expected an EmaState, got {type(state).__name__}: read another rule's shadow "
            "with rule.shadow(state, params) (or EmaTrainState.ema_params)"
        )
    return int(state.weight.shape[0]) if state.weight.ndim == 1 else 1


__all__ = [
    "Decay",
    "EmaState",
    "EmaTransform",
    "accumulators",
    "ema",
    "num_averages",
    "shadow",
    "shadows",
]
