"""Flax NNX: :class:`EMA`, flax's ``nnx.EMA`` with everything :func:`ema_jax.ema` adds.

The constructor, ``update(model)`` and ``apply_to(model)`` are those of ``nnx.EMA``; the
options are :func:`ema_jax.ema`'s (same names, meanings and defaults; formulas:
``docs/semantics.md``). The average itself is the pure :class:`~ema_jax.EmaState` of one
:class:`~ema_jax.EmaTransform`, held as data of an ``nnx.Pytree``: the same code and
results as the functional API, under ``nnx.jit`` (with or without donation) or eagerly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
from flax import nnx

from ema_jax import transform
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
      params: the shadow (:meth:`shadow`); with K decays every average's, a K-tuple.

    Unlike ``nnx.EMA``'s, the view ``apply_to`` returns is a snapshot of the average when
    it is called (the average may be fp32 for bf16 params, or one of K), not a live alias:
    call it after ``update``, e.g. inside the eval step.
    """

    def __init__(
        self,
        model: Any,
        decay: Decay | tuple[Decay, ...],
        *,
        only: Any = nnx.Param,
        graph: bool | None = None,
        **options: Any,
    ) -> None:
        """Tracks the Variables of ``model`` selected by ``only``; the average starts at
        their values. ``decay`` and ``**options`` (``debias``, ``update_every``, ...) are
        :func:`ema_jax.ema`'s, passed on as given. ``graph``: as for ``nnx.state`` (NNX's
        graph or tree mode)."""
        self.transform = transform.ema(decay, **options)
        self.filter = only
        self.graph = graph
        tracked = _tracked(model, only, graph)
        self.variables = jax.tree.structure(tracked)  # static: the Variables' types, metadata
        initial = self.transform.init(jax.tree.leaves(tracked))
        for name in _STATIC_FIELDS:
            setattr(self, name, getattr(initial, name))
        for name in _ARRAY_FIELDS:
            setattr(self, name, EmaVariable(getattr(initial, name)))
        setattr(self, _ACCUMULATORS, nnx.List([EmaVariable(a) for a in initial.ema]))

    @property
    def decay(self) -> Any:
        """The decay as given (a float, a schedule or a tuple of them), as ``nnx.EMA.decay``."""
        decays = self.transform.decays
        return decays if self.transform.stacked else decays[0]

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
        values = jax.tree.leaves(nnx.state(model, self.filter, graph=self.graph))
        _, new = self.transform.update(values, self.state, optimizer_step=optimizer_step)
        for name in _ARRAY_FIELDS:
            getattr(self, name).set_value(getattr(new, name))
        for variable, accumulator in zip(getattr(self, _ACCUMULATORS), new.ema, strict=True):
            variable.set_value(accumulator)

    @property
    def params(self) -> Any:
        """The shadow as an ``nnx.State`` (the tracked Variables' types, in the params'
        dtypes), as ``nnx.EMA.params``; with K decays every average's, a K-tuple of them."""
        if not self.transform.stacked:
            return self.shadow()
        return tuple(self.shadow(i) for i in range(self.transform.num_averages))

    def shadow(self, ema_index: int | None = None) -> nnx.State:
        """One average's shadow as an ``nnx.State``: average ``ema_index`` (``None``: the
        first, for a single decay the only one)."""
        return jax.tree.unflatten(self.variables, transform.shadow(self.state, ema_index))  # type: ignore[no-any-return]

    def apply_to(self, model: M, ema_index: int | None = None) -> M:
        """A new model like ``model`` whose tracked Variables hold the average
        (:meth:`shadow`); everything else (BatchNorm statistics, RNG state, unless the
        filter selects it) comes from ``model``, which is left untouched."""
        graphdef, state = nnx.split(model, graph=self.graph)
        merged = nnx.merge_state(state, self.shadow(ema_index))
        return nnx.merge(graphdef, merged)  # type: ignore[no-any-return]


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


__all__ = ["EMA", "EmaVariable"]
