"""Flax NNX: :class:`EMA`, the API of ``flax.nnx.EMA`` over the one :class:`~ema_jax.EmaTransform`.

``ema_jax.nnx.EMA(model, decay, only=nnx.Param)`` replaces ``nnx.EMA(model, decay,
only=nnx.Param)``; ``.update(model)`` after ``optimizer.update(model, grads)`` and
``.apply_to(model)`` for the EMA view work as there. On top: every option of
:func:`ema_jax.ema` (bias correction, schedules, ``update_every``, ``start_step``, fp32
accumulators for bf16 params, the NaN guard, several decays). The state is the pure
:class:`~ema_jax.EmaState` of ``ema_jax.ema(...)`` over the filtered ``nnx.State``, so the
math is the transform's (formulas: ``docs/semantics.md``); page: ``docs/nnx.md``.

One difference from ``nnx.EMA``: :meth:`EMA.apply_to` returns the shadow *at the call*
(its tracked Variables are new, in the params' dtypes), not a model that follows later
updates. Call it where you evaluate, e.g. inside the jitted eval step.
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from ema_jax import transform as _transform
from ema_jax.transform import Decay, EmaState, EmaTransform

M = TypeVar("M")
# The defaults of ema() itself, so EMA(...) and ema(...) can never disagree.
_DEFAULTS = {k: p.default for k, p in inspect.signature(_transform.ema).parameters.items()}


class EMA(nnx.Pytree):
    """An exponential moving average of an NNX model's Variables (those selected by ``only``).

    Args:
      model: the module (any NNX graph node) whose Variables are averaged.
      decay, debias, update_every, start_step, accumulator_dtype, skip_nonfinite: as in
        :func:`ema_jax.ema` (same meaning and defaults).
      only: an NNX filter of the Variables to average (default ``nnx.Param``). It must select
        at least one Variable, all floating; RNG state is never averaged.
      graph: graph mode as in ``nnx.EMA`` / ``nnx.state`` (``None``: NNX's current setting).

    Attributes:
      transform: the :class:`~ema_jax.EmaTransform` (static).
      ema_state: its :class:`~ema_jax.EmaState` over ``nnx.as_pure(nnx.state(model, only))``.
      decay, filter, graph: as given (``filter`` is ``only``, as in ``nnx.EMA``).

    Raises:
      TypeError / ValueError naming the argument or the Variable's path.
    """

    def __init__(
        self,
        model: Any,
        decay: Decay | tuple[Decay, ...],
        *,
        only: nnx.filterlib.Filter = nnx.Param,
        debias: bool | tuple[bool, ...] = _DEFAULTS["debias"],
        update_every: int = _DEFAULTS["update_every"],
        start_step: int = _DEFAULTS["start_step"],
        accumulator_dtype: Any = _DEFAULTS["accumulator_dtype"],
        skip_nonfinite: bool = _DEFAULTS["skip_nonfinite"],
        graph: bool | None = None,
    ) -> None:
        self.decay = decay
        self.filter = only
        self.graph = graph
        self.transform: EmaTransform = _transform.ema(
            decay,
            debias=debias,
            update_every=update_every,
            start_step=start_step,
            accumulator_dtype=accumulator_dtype,
            skip_nonfinite=skip_nonfinite,
        )
        _check_selection(nnx.state(model, only, graph=graph), only)
        self.ema_state: EmaState = nnx.data(self.transform.init(self._params(model)))

    def _params(self, model: Any) -> nnx.State:
        return nnx.as_pure(nnx.state(model, self.filter, graph=self.graph))

    def update(self, model: Any) -> None:
        """One update of the average from ``model``'s current Variables (call it after
        ``optimizer.update(model, grads)``). A model whose selected Variables differ from
        the ones the EMA was built with raises ``ValueError`` naming the first path."""
        _, self.ema_state = self.transform.update(self._params(model), self.ema_state)

    def shadow(self, ema_index: int | None = None) -> Any:
        """The shadow as a pure ``nnx.State`` in the params' dtypes (a K-tuple of them for K
        decays, or decay ``ema_index`` alone), as :func:`ema_jax.shadow`."""
        return _transform.shadow(self.ema_state, ema_index)

    @property
    def params(self) -> Any:
        """The shadow ``nnx.State`` (of the first decay when there are several); as
        ``nnx.EMA.params``, but pure arrays, not Variables."""
        return self.shadow(0 if _transform.num_averages(self.ema_state) else None)

    def apply_to(self, model: M, ema_index: int | None = None) -> M:
        """A model like ``model`` whose tracked Variables hold the shadow of decay
        ``ema_index`` (default: the first), in the params' dtypes; ``model`` is untouched.

        The other Variables (BatchNorm statistics, RNG state, anything ``only`` does not
        select) are ``model``'s own, shared with it as in ``nnx.EMA.apply_to``. The tracked
        values are those of this call: take the view after the updates you want in it."""
        if ema_index is None and _transform.num_averages(self.ema_state) is not None:
            ema_index = 0
        graphdef, *states = nnx.split(model, self.filter, ..., graph=self.graph)
        return nnx.merge(graphdef, self.shadow(ema_index), states[1])


def _check_selection(selected: nnx.State, only: Any) -> None:
    """Every selected leaf a floating, non-RNG Variable, and at least one of them."""
    leaves = jax.tree_util.tree_flatten_with_path(
        selected, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    if not leaves:
        raise ValueError(f"only={only!r} selects no Variable of the model: nothing to average")
    for path, leaf in leaves:
        where = "model" + jax.tree_util.keystr(path)
        if not isinstance(leaf, nnx.Variable):
            raise TypeError(
                f"{where} is a {type(leaf).__name__}, not an nnx.Variable: EMA averages "
                "Variables only; narrow `only` (default nnx.Param)"
            )
        if isinstance(leaf, nnx.RngState):
            raise TypeError(
                f"{where} is RNG state ({type(leaf).__name__}), which is never averaged: "
                "narrow `only` (default nnx.Param) so it excludes nnx.RngState"
            )
        dtype = jnp.result_type(leaf.get_value())
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{where} ({type(leaf).__name__}) has dtype {dtype}: only floating Variables "
                "are averaged; narrow `only` (default nnx.Param)"
            )


__all__ = ["EMA"]
