"""One adapter per kind of training state, resolved once per call: what a checkpoint saves
of it, what it deploys, and how a restored tree of arrays becomes a state again.

* :class:`LinenState`: an :class:`~ema_jax.EmaTrainState` (a pytree of its own).
* :class:`NnxState`: an NNX object holding the model, the optimizer and exactly one
  :class:`ema_jax.nnx.EMA` (e.g. ``nnx.Dict(model=..., optimizer=..., ema=...)``): its
  ``nnx.state`` is saved, the EMA's shadows as pure dicts.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp

from ema_jax import _checks, _dtypes
from ema_jax.bema_rule import BemaState, BemaTransform
from ema_jax.checkpoint import items, layout
from ema_jax.train_state import EmaTrainState
from ema_jax.transform import EmaState, EmaTransform, Params


class Adapter(Protocol):
    """What the checkpoint functions need of a training state."""

    #: The tree of arrays the ``state`` item holds.
    arrays: Any
    #: The rule, for the number and layout of the averages.
    transform: EmaTransform | BemaTransform
    #: The rule's state, for the params' dtypes and the accumulators.
    ema_state: EmaState | BemaState

    def shadow(self, ema_index: int | None) -> Params:
        """One average in the params' dtypes (``None``: the first)."""
        ...

    def accumulators(self, ema_index: int | None) -> Params:
        """One average in the accumulators' dtypes, params-shaped (``None``: the first)."""
        ...

    def rebuild(self, restored: Any) -> Any:
        """The state holding ``restored`` (a tree like :attr:`arrays`)."""
        ...

    def check_saved(self, step_directory: str, where: str) -> None:
        """A ``ValueError`` when the step at ``step_directory`` (``where``, for the error)
        holds the average of other params than this state's, before anything is read."""
        ...


class LinenState:
    """An :class:`~ema_jax.EmaTrainState`: saved as itself."""

    def __init__(self, state: EmaTrainState) -> None:
        self.arrays = state
        self.transform = state.ema
        self.ema_state = state.ema_state
        self._state = state

    def shadow(self, ema_index: int | None) -> Params:
        return self._state.select_params(True, ema_index)

    def accumulators(self, ema_index: int | None) -> Params:
        return self._state.accumulators(ema_index)

    def rebuild(self, restored: Any) -> Any:
        return restored

    def check_saved(self, step_directory: str, where: str) -> None:
        """Nothing to add: the params' paths are in the ``state`` item, checked with it."""


class NnxState:
    """An NNX training object holding one ``ema_jax.nnx.EMA``: saved as its ``nnx.state``,
    restored as a new object (``nnx.merge``); the object given is not changed."""

    def __init__(self, state: Any, ema: Any) -> None:
        from flax import nnx

        from ema_jax.nnx import BEMA

        self._graphdef, self.arrays = nnx.split(state)  # one walk of the graph
        self.transform = ema.transform
        self.ema_state = ema.state
        self._variables = ema.variables  # the tracked Variables' tree structure
        self._tracked_paths = ema.tracked_paths
        self._bema = (state, ema) if isinstance(ema, BEMA) else None

    def _params(self) -> list[Any] | None:
        """The tracked Variables' current values for a BEMA, whose shadow reads them (found
        only when a shadow is asked for: a restore needs none); ``None`` for an EMA."""
        if self._bema is None:
            return None
        root, ema = self._bema
        return ema.tracked_values(_model(root, ema))  # type: ignore[no-any-return]

    def shadow(self, ema_index: int | None) -> Params:
        dtypes = self.ema_state.param_dtypes
        return self._pure(_dtypes.cast_back(self._accumulators(ema_index), dtypes))

    def accumulators(self, ema_index: int | None) -> Params:
        return self._pure(self._accumulators(ema_index))

    def _accumulators(self, ema_index: int | None) -> list[Any]:
        """One average's accumulators (BEMA's: its shadow before the cast), in the order of
        the tracked Variables."""
        rule, state = self.transform, self.ema_state
        return rule.accumulators(state, self._params(), ema_index)  # type: ignore[arg-type,no-any-return]

    def _pure(self, leaves: list[Any]) -> Params:
        """The tracked Variables' values as a pure dict (``nnx.to_pure_dict``)."""
        from flax import nnx

        return nnx.to_pure_dict(jax.tree.unflatten(self._variables, leaves))

    def rebuild(self, restored: Any) -> Any:
        from flax import nnx

        return nnx.merge(self._graphdef, restored)

    def check_saved(self, step_directory: str, where: str) -> None:
        """The ``state`` item keeps the accumulators in a list (their order): the paths of
        the Variables they average are read from the ``ema_params`` item's tree (the
        shadow, pure dicts by path; in every checkpoint, 0.1.0's included) and must be this
        EMA's. A different number of averages is left to the ``state`` item's check."""
        from ema_jax.nnx import path_changes

        path = os.path.join(step_directory, layout.EMA_PARAMS)
        saved = items.metadata(path, where, layout.EMA_PARAMS).tree
        stacked = isinstance(saved, (list, tuple))
        if stacked != self.transform.stacked:
            return
        first = saved[0] if stacked else saved
        found = ["/".join(keys) for keys in ocp.tree.to_flat_dict(first)]
        change = path_changes(found, self._tracked_paths)
        if change is not None:
            raise ValueError(
                f"checkpoint does not match the target: {where} holds the EMA of other "
                "Variables than the target's ema_jax.nnx.EMA (from the checkpoint's paths to "
                f"the target's): {change}. Restore "
                "into a target built like the saved run (same model, same only= filter)"
            )


def _model(root: Any, ema: Any) -> Any:
    """The one model in ``root`` whose Variables ``ema`` tracks (by their paths), for a
    BEMA, whose shadow reads them; a ``TypeError`` when there is none or several."""
    from flax import nnx

    from ema_jax.nnx import EMA, tracked_paths

    found = []
    for _, node in nnx.iter_graph(root):
        model = isinstance(node, nnx.Module) and not isinstance(node, EMA)
        if model and tracked_paths(node, ema.filter, ema.graph) == ema.tracked_paths:
            found.append(node)
    if len(found) != 1:
        raise TypeError(
            "an NNX training state holding an ema_jax.nnx.BEMA must hold the one model it "
            f"tracks (BEMA's shadow reads the current params), found {len(found)} models "
            "with its Variables' paths"
        )
    return found[0]


def adapt(state: Any) -> Adapter:
    """The adapter of ``state``; a ``TypeError`` naming what is expected for anything else."""
    if isinstance(state, EmaTrainState):
        return LinenState(state)
    from flax import nnx

    from ema_jax.nnx import EMA

    if not isinstance(state, (nnx.Module, nnx.Pytree)):
        raise TypeError(
            "state must be an EmaTrainState or an NNX object holding one ema_jax.nnx.EMA "
            f"(e.g. nnx.Dict(model=..., optimizer=..., ema=...)), got {type(state).__name__}"
        )
    found = [node for _, node in nnx.iter_graph(state) if isinstance(node, EMA)]
    if len(found) != 1:
        raise TypeError(
            f"an NNX training state must hold exactly one ema_jax.nnx.EMA, found {len(found)} "
            f"in {type(state).__name__}"
        )
    return NnxState(state, found[0])


def ema_params(state: Adapter) -> Params:
    """What the ``ema_params`` item holds: the shadow, or a K-tuple of them for K decays."""
    if state.transform.stacked:
        return tuple(state.shadow(i) for i in range(len(state.transform.decays)))
    return state.shadow(None)


def deploy(state: Adapter, dtype: Any, ema_index: int | None) -> Params:
    """One average: in the params' dtypes (``dtype=None``), else the accumulators with their
    real floating leaves cast to ``dtype``."""
    if dtype is None:
        return state.shadow(ema_index)
    averages = state.accumulators(ema_index)
    return _dtypes.cast_real(averages, _checks.floating_dtype("dtype", dtype))


def static_metadata(state: Adapter) -> dict[str, Any]:
    """What the arrays alone do not say: the params' dtypes the shadow casts back to (an
    fp32 accumulator may average bf16 or fp32 params). Everything else static (``tx``,
    ``ema``, ``average_model_state``, whose averaged tree differs anyway) comes from the
    target, like a learning rate comes from the code."""
    return {"param_dtypes": [np.dtype(d).name for d in state.ema_state.param_dtypes]}
