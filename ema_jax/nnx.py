"""Flax NNX: :class:`EMA`, flax's ``nnx.EMA`` with everything :func:`ema_jax.ema` adds.

The constructor, ``update(model)`` and ``apply_to(model)`` are those of ``nnx.EMA``; the
options are :func:`ema_jax.ema`'s (same names, meanings and defaults; formulas:
``docs/semantics.md``). The average itself is the pure :class:`~ema_jax.EmaState` of one
:class:`~ema_jax.EmaTransform`, held as data of an ``nnx.Pytree``: the same code and
results as the functional API, under ``nnx.jit`` (with or without donation) or eagerly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ema_jax import _dtypes, placement, transform
from ema_jax.batch_stats import recompute_batch_stats
from ema_jax.transform import Decay, EmaState

M = TypeVar("M")

#: Where each field of :class:`~ema_jax.EmaState` lives in an :class:`EMA`, derived from
#: ``EmaState`` itself: its arrays in :class:`EmaVariable` s of the same names, except the
#: accumulators (``EmaState.ema``, one per tracked Variable) in the list ``accumulators``;
#: its static fields (the params' dtypes) as plain attributes. These names are the paths
#: an NNX checkpoint saves.
_ACCUMULATORS = "accumulators"
_ARRAY_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(EmaState)
    if f.metadata.get("pytree_node", True) and f.name != "ema"
)
_STATIC_FIELDS = tuple(
    f.name for f in dataclasses.fields(EmaState) if not f.metadata.get("pytree_node", True)
)


class EmaVariable(nnx.Variable):
    """The EMA's own state (count, weights, accumulators): never an ``nnx.Param``, so
    optimizers and Param filters leave it alone; saved and restored like any Variable."""


class EMA(nnx.Pytree):
    """An exponential moving average of an NNX model's Variables (by default its
    ``nnx.Param`` s), updated after each optimizer step::

        ema = ema_jax.nnx.EMA(model, 0.999, debias=True)
        ...
        optimizer.update(model, grads)   # inside an nnx.jit train step
        ema.update(model)
        ...
        eval_model = ema.apply_to(model)  # the model with the averaged Variables

    Attributes:
      transform: the rule, the :class:`~ema_jax.EmaTransform` (static).
      filter: the ``only`` filter: which Variables are averaged (static).
      state: the rule's :class:`~ema_jax.EmaState` (read-only; its trees are lists of the
        tracked Variables' values, in the order of ``nnx.state(model, only)``). Its array
        fields are kept in :class:`EmaVariable` s of the same names (``count``,
        ``num_skipped``, ``weight``), its accumulators (``EmaState.ema``) in the list
        ``accumulators``.
      tracked_paths: the tracked Variables' paths in the model (``"encoder/kernel"``), in
        the order of the state's lists (static). ``update`` and ``apply_to`` refuse a model
        whose selected Variables have other paths, naming them (added, missing, renamed).
      params: the shadow (:meth:`shadow`); with K decays every average's, a K-tuple.

    Unlike ``nnx.EMA``'s, the view ``apply_to`` returns is a snapshot of the average when
    it is called (the average may be fp32 for bf16 params, or one of K), not a live alias:
    call it after ``update``, e.g. inside the eval step. Taken outside a trace before any
    update (flax's pattern of a view taken once before training) it is refused: it would
    hold the initial weights for ever. The shadow (``params``, ``shadow()``) is arrays, so
    writing into it raises; change the average with ``update``.
    """

    def __init__(
        self,
        model: Any = None,
        decay: Decay | tuple[Decay, ...] | None = None,
        *,
        params: Any = None,
        only: Any = nnx.Param,
        graph: bool | None = None,
        **options: Any,
    ) -> None:
        """Tracks the Variables of ``model`` selected by ``only``; the average starts at
        their values. ``params=`` is flax's name for ``model`` (``nnx.EMA(params=model,
        decay=0.9)``). ``decay`` and ``**options`` (``debias``, ``update_every``, ...) are
        :func:`ema_jax.ema`'s, passed on as given. ``graph``: as for ``nnx.state`` (NNX's
        graph or tree mode). Python scalars (``nnx.Param(1.0)``) are tracked as arrays."""
        if params is not None:
            if model is not None:
                raise TypeError(
                    "pass the model once: EMA(model, decay) or flax's EMA(params=model, "
                    "decay=decay), not both"
                )
            model = params
        if model is None or decay is None:
            missing = "the model" if model is None else "the decay"
            raise TypeError(f"EMA needs {missing}: EMA(model, decay, **options)")
        self.transform = transform.ema(decay, **options)
        self.filter = only
        self.graph = graph
        tracked = _tracked(model, only, graph)
        self.variables = jax.tree.structure(tracked)  # static: the Variables' types, metadata
        self.tracked_paths, values = _paths_and_values(tracked)
        initial = self.transform.init(values)
        for name in _STATIC_FIELDS:
            setattr(self, name, getattr(initial, name))
        for name in _ARRAY_FIELDS:
            setattr(self, name, EmaVariable(getattr(initial, name)))
        setattr(self, _ACCUMULATORS, nnx.List([EmaVariable(a) for a in initial.ema]))

    @property
    def decay(self) -> Any:
        """The decay as given (a float, a schedule or a tuple of them), as ``nnx.EMA.decay``.

        Settable, as flax's: ``ema.decay = 0.9999`` makes the rule a new transform with that
        decay and every other option kept; the state (the averages so far, the count) is
        kept. The new decay must keep the number of averages (one, or a tuple of K)."""
        decays = self.transform.decays
        return decays if self.transform.stacked else decays[0]

    @decay.setter
    def decay(self, decay: Decay | tuple[Decay, ...]) -> None:
        checked = transform.ema(decay)  # the decay's own checks, naming it
        if (checked.stacked, checked.num_averages) != (
            self.transform.stacked,
            self.transform.num_averages,
        ):
            raise ValueError(
                f"decay={decay!r} does not fit this EMA, which keeps "
                f"{_averages(self.transform)}: set a decay of that form, or build a new EMA "
                "for another number of averages"
            )
        self.transform = dataclasses.replace(self.transform, decays=checked.decays)

    @property
    def state(self) -> EmaState:
        """The functional state this object holds (see :class:`~ema_jax.EmaState`)."""
        return EmaState(
            **{name: getattr(self, name) for name in _STATIC_FIELDS},
            **{name: getattr(self, name).get_value() for name in _ARRAY_FIELDS},
            ema=[a.get_value() for a in getattr(self, _ACCUMULATORS)],
        )

    def update(self, model: Any, optimizer_step: Any = True) -> None:
        """One step of the average towards ``model``'s tracked Variables (call it after
        ``optimizer.update(model, grads)``, inside the same ``nnx.jit`` step).

        ``optimizer_step`` (a bool, traced too): under gradient accumulation pass
        ``ema_jax.optimizer_stepped(optimizer.opt_state)``, so micro-steps leave the
        average unchanged (as :meth:`ema_jax.EmaTransform.update`)."""
        _, new = self.transform.update(
            self._values(model), self.state, optimizer_step=optimizer_step
        )
        for name in _ARRAY_FIELDS:
            getattr(self, name).set_value(getattr(new, name))
        for variable, accumulator in zip(getattr(self, _ACCUMULATORS), new.ema, strict=True):
            variable.set_value(accumulator)

    @property
    def params(self) -> Any:
        """The shadow as a pure ``nnx.State`` of arrays (in the params' dtypes), as
        ``nnx.EMA.params``; with K decays every average's, a K-tuple of them. Arrays, not
        Variables: writing into them raises (the average changes only by ``update``)."""
        if not self.transform.stacked:
            return self.shadow()
        return tuple(self.shadow(i) for i in range(self.transform.num_averages))

    def shadow(self, ema_index: int | None = None) -> nnx.State:
        """One average's shadow as a pure ``nnx.State`` of arrays: average ``ema_index``
        (``None``: the first, for a single decay the only one)."""
        return nnx.State(nnx.to_pure_dict(self._shadow_variables(ema_index)))

    def _shadow_variables(self, ema_index: int | None) -> nnx.State:
        """The shadow in new Variables of the tracked Variables' types and metadata."""
        return jax.tree.unflatten(self.variables, transform.shadow(self.state, ema_index))  # type: ignore[no-any-return]

    def apply_to(self, model: M, ema_index: int | None = None) -> M:
        """A new model like ``model`` whose tracked Variables hold the average at this call
        (:meth:`shadow`; a snapshot, not a live view like ``nnx.EMA``'s); everything else
        (BatchNorm statistics, RNG state, unless the filter selects it) comes from
        ``model``, which is left untouched.

        Raises:
          ValueError: ``model``'s tracked Variables have other paths or shapes than the
            averaged ones; or, outside a trace, no update has been made yet (a view taken
            before training would keep the initial weights: take it where you evaluate).
        """
        count = self.state.count
        concrete = isinstance(count, (jax.Array, np.ndarray)) and not isinstance(
            count, jax.core.Tracer
        )
        if concrete and int(count) == 0:
            raise ValueError(
                "apply_to before any update: ema_jax's view is the average at the call (a "
                "snapshot), not a live view that follows later updates like flax's nnx.EMA's, "
                "so a view taken before training would evaluate the initial weights. Take the "
                "view where you evaluate, after update (e.g. inside the eval step: "
                "ema.apply_to(model)); before any update the average is the model itself"
            )
        self._values(model)  # the same Variables, by path and shape
        graphdef, state = nnx.split(model, graph=self.graph)
        merged = nnx.merge_state(state, self._shadow_variables(ema_index))
        return nnx.merge(graphdef, merged, copy=True)  # type: ignore[no-any-return]

    def switch(self, model: Any, ema_index: int | None = None) -> None:
        """Switch EMA (formula: :meth:`ema_jax.EmaTrainState.switch`): writes the shadow of
        average ``ema_index`` (``None``: the first) into ``model``'s tracked Variables, in
        place (``nnx.update``), in their dtypes and as fresh arrays; the EMA's state and
        any optimizer's are left as they are. Eagerly or inside ``nnx.jit``.

        Raises:
          ValueError: as :meth:`apply_to`, for a model whose tracked Variables differ from
            the averaged ones; ``ema_index`` is not an average of this EMA.
        """
        values, state = self._values(model), self.state
        shadow = transform.shadow(state, ema_index)  # as shadow() and apply_to read it
        shadow = _dtypes.cast_back(shadow, [v.dtype for v in values])
        switched = placement.replacement(shadow, values, state.shardings, self.transform.shard_over)
        nnx.update(model, jax.tree.unflatten(self.variables, switched))

    def _values(self, model: Any) -> list[Any]:
        """The values of ``model``'s tracked Variables, checked against the averaged ones
        by path, shape and kind of dtype (static: at trace time under ``jit``)."""
        paths, values = _paths_and_values(nnx.state(model, self.filter, graph=self.graph))
        change = path_changes(self.tracked_paths, paths)
        if change is not None:
            raise ValueError(
                "the model does not match the EMA (which averages, by path, the Variables "
                f"only={_name(self.filter)} selects): {change}. An EMA averages the Variables "
                "it was built from: build a new EMA for a changed model"
            )
        drop = 1 if self.transform.stacked else 0
        state = self.state
        for path, value, accumulator, dtype in zip(
            paths, values, state.ema, state.param_dtypes, strict=True
        ):
            averaged = tuple(accumulator.shape[: accumulator.ndim - drop])
            problem = None
            if tuple(value.shape) != averaged:
                problem = f"has shape {tuple(value.shape)} in the model, {averaged} in the EMA"
            elif _dtypes.kind(value.dtype) != _dtypes.kind(dtype):
                problem = (
                    f"has dtype {np.dtype(value.dtype).name} in the model, {dtype.name} in the "
                    f"EMA ({_dtypes.kind(value.dtype)} vs {_dtypes.kind(dtype)} values cannot "
                    "be averaged into each other)"
                )
            if problem is not None:
                raise ValueError(
                    f"the model does not match the EMA: {path!r} {problem}. An EMA averages "
                    "the Variables it was built from: build a new EMA for a changed model"
                )
        return values


def _tracked(model: Any, only: Any, graph: bool | None) -> nnx.State:
    """``nnx.state(model, only)``, refused when it selects nothing or RNG state."""
    tracked = nnx.state(model, only, graph=graph)
    flat = nnx.to_flat_state(tracked)
    if not flat:
        raise ValueError(
            f"only={only!r} selects no Variable of the model: pass a filter that matches "
            "the Variables to average (the default, nnx.Param, selects the parameters)"
        )
    for path, variable in flat:
        if isinstance(variable, nnx.RngState):
            where = "/".join(str(k) for k in path)
            raise ValueError(
                f"only={only!r} selects RNG state at {where!r} ({type(variable).__name__}): RNG "
                "keys and counts cannot be averaged; narrow the filter, e.g. only=nnx.Param or "
                "only=(nnx.Param, nnx.BatchStat)"
            )
    return tracked


def _paths_and_values(tracked: nnx.State) -> tuple[tuple[str, ...], list[Any]]:
    """The tracked Variables' paths (``"encoder/kernel"``) and values, in the order of
    ``jax.tree.leaves`` (that of the state's lists and of saved checkpoints); Python scalars
    (``nnx.Param(1.0)``) as arrays."""
    paths, values = [], []
    for key_path, value in jax.tree_util.tree_flatten_with_path(tracked)[0]:
        keys = [k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)]
        path = "/".join(str(k) for k in keys)
        if isinstance(value, (bool, int, float, complex)):
            value = jnp.asarray(value)
        elif not hasattr(value, "dtype"):
            raise TypeError(
                f"the model's Variable at {path!r} holds a {type(value).__name__}, not an "
                "array or a number: exclude it with the only= filter"
            )
        paths.append(path)
        values.append(value)
    return tuple(paths), values


def path_changes(averaged: Sequence[str], found: Sequence[str]) -> str | None:
    """What differs between the averaged Variables' paths and ``found`` ("renamed (or
    replaced): 'enc/kernel' -> 'dec/kernel'", "missing: ...", "added: ..."), or ``None``
    when they are the same paths."""
    missing = [p for p in averaged if p not in found]
    added = [p for p in found if p not in averaged]
    if missing and len(missing) == len(added):
        return "renamed (or replaced): " + ", ".join(
            f"{a!r} -> {b!r}" for a, b in zip(missing, added, strict=True)
        )
    parts = []
    if missing:
        parts.append("missing: " + ", ".join(map(repr, missing)))
    if added:
        parts.append("added: " + ", ".join(map(repr, added)))
    if not parts and list(averaged) != list(found):
        parts.append(f"in another order: {list(found)}")
    return "; ".join(parts) or None


def _name(only: Any) -> str:
    """A filter as written in code: ``nnx.Param`` for a Variable type."""
    return f"nnx.{only.__name__}" if isinstance(only, type) else repr(only)


def _averages(tx: transform.EmaTransform) -> str:
    if tx.stacked:
        return f"{tx.num_averages} averages (a tuple of decays)"
    return "one average (one decay)"


__all__ = ["EMA", "EmaVariable", "path_changes", "recompute_batch_stats"]
