"""A Flax ``TrainState`` that carries an EMA of its params.

``apply_gradients`` is one pure function: the optimizer step, then the EMA update from
the *new* params. Training only ever differentiates ``params``; the shadow is read
(``ema_params``), never trained.

Non-param collections (e.g. BatchNorm's ``batch_stats``) live in ``model_state``. By
default they are carried unchanged and shared by raw and EMA evaluation; with
``average_model_state=True`` the EMA averages ``{"params", "model_state"}`` together
(timm's ModelEma averages BN buffers the same way), and EMA evaluation uses the
averaged statistics.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from ema_jax import transform
from ema_jax.transform import EmaState, Params, num_averages, shadow


class EmaTrainState(train_state.TrainState):
    """``TrainState`` + ``ema_state`` (a pytree) + ``ema`` (the static transform)."""

    ema_state: EmaState
    ema: optax.GradientTransformation = struct.field(pytree_node=False)
    model_state: Any = None
    average_model_state: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(  # type: ignore[override]
        cls,
        *,
        apply_fn: Any,
        params: Params,
        tx: optax.GradientTransformation,
        ema: optax.GradientTransformation,
        model_state: Any = None,
        average_model_state: bool = False,
        **kwargs: Any,
    ) -> EmaTrainState:
        """Like ``TrainState.create``; also initialises the EMA (a copy of ``params``).

        ``step`` starts as an int32 array (not flax's Python ``0``), so a jitted step sees
        the same input type on its first call as on every later one and compiles once.
        """
        if average_model_state and model_state is None:
            raise ValueError("average_model_state=True needs a model_state to average")
        target = {"params": params, "model_state": model_state} if average_model_state else params
        state = super().create(
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            ema=ema,
            ema_state=ema.init(target),
            model_state=model_state,
            average_model_state=average_model_state,
            **kwargs,
        )
        return state.replace(step=jnp.zeros([], jnp.int32))

    def apply_gradients(self, *, grads: Params, **kwargs: Any) -> EmaTrainState:
        """Optimizer step, then EMA update from the new params (and new ``model_state``)."""
        new = super().apply_gradients(grads=grads, **kwargs)
        target = (
            {"params": new.params, "model_state": new.model_state}
            if new.average_model_state
            else new.params
        )
        _, ema_state = self.ema.update(target, self.ema_state)
        return new.replace(ema_state=ema_state)

    @property
    def num_averages(self) -> int | None:
        """K when the EMA keeps several decays, else ``None``."""
        return num_averages(self.ema_state)

    def _one_average(self, index: int | None) -> Any:
        """The shadow of one average (decay ``index``, default the first), params' dtypes."""
        return shadow(self.ema_state, 0 if index is None else index)

    def accumulators(self, ema_index: int | None = None) -> Any:
        """The raw accumulators of one average (accumulator dtypes, e.g. fp32 for bf16
        params), params-shaped: decay ``ema_index`` (default the first) of several."""
        acc = transform.accumulators(self.ema_state, ema_index)
        return acc["params"] if self.average_model_state else acc

    @property
    def ema_params(self) -> Params:
        """The shadow params, same tree and dtypes as ``params`` (a K-tuple for K decays).

        Like ``params``, these may be the state's own buffers: a train step that donates
        the state invalidates them. Keep a copy (``jax.tree.map(jnp.copy, ...)``) to hold
        on to them across steps.
        """
        averages = shadow(self.ema_state)
        if not self.average_model_state:
            return averages
        if self.num_averages is None:
            return averages["params"]
        return tuple(a["params"] for a in averages)

    def select_params(self, use_ema: bool, ema_index: int | None = None) -> Params:
        """``params`` or the shadow params (decay ``ema_index`` when there are several)."""
        if not use_ema:
            return self.params
        chosen = self._one_average(ema_index)
        return chosen["params"] if self.average_model_state else chosen

    def select_model_state(self, use_ema: bool, ema_index: int | None = None) -> Any:
        """``model_state``, or its average when ``average_model_state`` and ``use_ema``."""
        if not (use_ema and self.average_model_state):
            return self.model_state
        return self._one_average(ema_index)["model_state"]
