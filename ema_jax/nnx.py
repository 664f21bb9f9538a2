"""Flax NNX: :class:`EMA`, flax's ``nnx.EMA`` with everything :func:`ema_jax.ema` adds.

The constructor, ``update(model)`` and ``apply_to(model)`` are those of ``nnx.EMA``; the
options are :func:`ema_jax.ema`'s (same names, meanings and defaults; formulas:
``docs/semantics.md``). The average itself is the pure :class:`~ema_jax.EmaState` of one
:class:`~ema_jax.EmaTransform`, held as data of an ``nnx.Pytree``: the same code and
results as the functional API, under ``nnx.jit`` (with or without donation) or eagerly.
:class:`BEMA` is its sibling for :func:`ema_jax.bema` (a :class:`~ema_jax.BemaState`, whose
shadow also reads the model's current Variables).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx

from ema_jax import _dtypes, bema_rule, nnx_tracking, placement, transform
from ema_jax.batch_stats import recompute_batch_stats
from ema_jax.bema_rule import BemaState
from ema_jax.nnx_tracking import path_changes, tracked_paths
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
        self._track(model, transform.ema(decay, **options), only, graph)

    def _track(self, model: Any, rule: Any, only: Any, graph: bool | None) -> None:
        """Tracks ``model``'s Variables selected by ``only`` with ``rule``; its initial
        state's fields become this object's Variables (:meth:`_store`)."""
        self.transform = rule
        self.filter = only
        self.graph = graph
        tracked = nnx_tracking.tracked(model, only, graph)
        self.variables = jax.tree.structure(tracked)  # static: the Variables' types, metadata
        self.tracked_paths, values = nnx_tracking.paths_and_values(tracked)
        self._store(rule.init(values))

    def _store(self, state: Any) -> None:
        """Writes the fields of an :class:`~ema_jax.EmaState` into this object's Variables
        (creating them on the first call)."""
        for name in _STATIC_FIELDS:
            setattr(self, name, getattr(state, name))
        for name in _ARRAY_FIELDS:
            if hasattr(self, name):
                getattr(self, name).set_value(getattr(state, name))
            else:
                setattr(self, name, EmaVariable(getattr(state, name)))
        if hasattr(self, _ACCUMULATORS):
            for variable, accumulator in zip(getattr(self, _ACCUMULATORS), state.ema, strict=True):
                variable.set_value(accumulator)
        else:
            setattr(self, _ACCUMULATORS, nnx.List([EmaVariable(a) for a in state.ema]))

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
        return self._average_state

    @property
    def _average_state(self) -> EmaState:
        """The :class:`~ema_jax.EmaState` of the EMA held in this object's Variables."""
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
            self.tracked_values(model), self.state, optimizer_step=optimizer_step
        )
        self._store(new)

    @property
    def params(self) -> Any:
        """The shadow as a pure ``nnx.State`` of arrays (in the params' dtypes), as
        ``nnx.EMA.params``; with K decays every average's, a K-tuple of them. Arrays, not
        Variables: writing into them raises (the average changes only by ``update``)."""
        if not self.transform.stacked:
            return self.shadow()
        return tuple(self.shadow(i) for i in range(self.transform.num_averages))

    def shadow(self, ema_index: int | None = None, *, model: Any = None) -> nnx.State:
        """One average's shadow as a pure ``nnx.State`` of arrays: average ``ema_index``
        (``None``: the first, for a single decay the only one). ``model``, when given, is
        checked like :meth:`update`'s and passed to the rule (:class:`BEMA`'s shadow reads
        its Variables; an EMA's does not)."""
        return nnx.State(nnx.to_pure_dict(self._shadow_variables(ema_index, model)))

    def _shadow_variables(self, ema_index: int | None, model: Any = None) -> nnx.State:
        """The shadow in new Variables of the tracked Variables' types and metadata."""
        values = None if model is None else self.tracked_values(model)
        shadow = self.transform.shadow(self.state, values, ema_index)
        return jax.tree.unflatten(self.variables, shadow)  # type: ignore[no-any-return]

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
        graphdef, state = nnx.split(model, graph=self.graph)
        merged = nnx.merge_state(state, self._shadow_variables(ema_index, model))
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
        values = self.tracked_values(model)
        shadow = self.transform.shadow(self.state, values, ema_index)  # as shadow(), apply_to
        shadow = _dtypes.cast_back(shadow, [v.dtype for v in values])
        shardings, axes = self.state.shardings, self.transform.shard_over
        switched = placement.replacement(shadow, values, shardings, axes)
        nnx.update(model, jax.tree.unflatten(self.variables, switched))

    def tracked_values(self, model: Any) -> list[Any]:
        """The values of ``model``'s tracked Variables, checked against the averaged ones
        by path, shape and kind of dtype (static: at trace time under ``jit``)."""
        selected = nnx.state(model, self.filter, graph=self.graph)
        paths, values = nnx_tracking.paths_and_values(selected)
        change = nnx_tracking.path_changes(self.tracked_paths, paths)
        if change is not None:
            raise ValueError(
                "the model does not match the EMA (which averages, by path, the Variables "
                f"only={nnx_tracking.filter_name(self.filter)} selects): {change}. An EMA "
                "averages the Variables it was built from: build a new EMA for a changed model"
            )
        drop = 1 if self.transform.stacked else 0
        state = self._average_state
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


def _averages(tx: transform.EmaTransform) -> str:
    if tx.stacked:
        return f"{tx.num_averages} averages (a tuple of decays)"
    return "one average (one decay)"


class BEMA(EMA):
    """BEMA (:func:`ema_jax.bema`, the EMA with its lag corrected) of an NNX model::

        bema = ema_jax.nnx.BEMA(model)            # TRL's defaults: eta=0.2, kappa=0.5, ...
        ...
        optimizer.update(model, grads)
        bema.update(model)
        eval_model = bema.apply_to(model)         # the model with BEMA's weights

    As :class:`EMA`, with BEMA's settings (``eta``, ``kappa``, ``rho``, ``gamma`` and
    :func:`ema_jax.bema`'s other options) instead of a decay, and the anchor ``θ₀`` in the
    list ``anchor`` of :class:`EmaVariable` s. BEMA's shadow depends on the current params:
    :meth:`shadow` takes the model (``shadow(model=model)``) and ``params`` is refused.
    """

    def __init__(
        self, model: Any, *, only: Any = nnx.Param, graph: bool | None = None, **options: Any
    ) -> None:
        rule = bema_rule.bema(**options)  # the settings' own errors first
        params = set(tracked_paths(model, nnx.Param, graph))
        others = set(tracked_paths(model, only, graph)) - params
        if others:
            raise ValueError(
                f"only={nnx_tracking.filter_name(only)} selects Variables that are not "
                f"nnx.Param ({', '.join(map(repr, sorted(others)))}): BEMA's lag correction "
                "would extrapolate them too (a BatchNorm variance can turn negative). Track "
                "the params only (only=nnx.Param) and recompute BatchNorm statistics for "
                "BEMA's weights (ema_jax.nnx.recompute_batch_stats)"
            )
        self._track(model, rule, only, graph)

    anchor: nnx.List

    @property
    def decay(self) -> Any:
        """BEMA's decay schedule (:class:`ema_jax.bema_rule.BemaDecay`)."""
        return self.transform.decay

    @decay.setter
    def decay(self, decay: Any) -> None:
        raise AttributeError(
            "BEMA's decay follows from its settings (eta, kappa, rho, gamma): build a new BEMA"
        )

    @property
    def state(self) -> BemaState:  # type: ignore[override]
        """The functional state (:class:`~ema_jax.BemaState`)."""
        anchor = [a.get_value() for a in self.anchor]
        return BemaState(average=self._average_state, anchor=anchor)

    def _store(self, state: Any) -> None:
        super()._store(state.average)
        if hasattr(self, "anchor"):
            for variable, value in zip(self.anchor, state.anchor, strict=True):
                variable.set_value(value)
        else:
            self.anchor = nnx.List([EmaVariable(a) for a in state.anchor])

    @property
    def params(self) -> Any:
        raise TypeError(
            "BEMA's shadow depends on the current params: use bema.shadow(model=model) or "
            "bema.apply_to(model)"
        )

    def shadow(self, ema_index: int | None = None, *, model: Any = None) -> nnx.State:
        """BEMA's shadow of ``model`` (required) as a pure ``nnx.State`` of arrays."""
        if model is None:
            raise TypeError(
                "BEMA's shadow depends on the current params: pass the model, "
                "bema.shadow(model=model)"
            )
        return super().shadow(ema_index, model=model)


__all__ = [
    "BEMA",
    "EMA",
    "EmaVariable",
    "path_changes",
    "recompute_batch_stats",
    "tracked_paths",
]
