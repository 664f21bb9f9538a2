"""A Flax ``TrainState`` that carries an EMA of its params.

``apply_gradients`` is one pure function: the optimizer step, then the EMA update from
the *new* params. Training only ever differentiates ``params``; the shadow (the averaged
weights, in the params' dtypes: glossary in ``docs/semantics.md``) is read
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

from ema_jax import accumulation, placement
from ema_jax.bema_rule import BemaState, BemaTransform
from ema_jax.transform import EmaState, EmaTransform, Params


class EmaTrainState(train_state.TrainState):
    """``TrainState`` + ``ema_state`` (a pytree) + ``ema`` (the static rule: an
    :class:`EmaTransform`, or BEMA's :class:`~ema_jax.BemaTransform`)."""

    ema_state: EmaState | BemaState
    ema: EmaTransform | BemaTransform = struct.field(pytree_node=False)
    model_state: Any = None
    average_model_state: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(  # type: ignore[override]
        cls,
        *,
        apply_fn: Any,
        params: Params,
        tx: optax.GradientTransformation,
        ema: EmaTransform | BemaTransform,
        model_state: Any = None,
        average_model_state: bool = False,
        **kwargs: Any,
    ) -> EmaTrainState:
        """Like ``TrainState.create``; also initialises the EMA (a copy of ``params``).

        ``step`` starts as an int32 array (not flax's Python ``0``), so a jitted step sees
        the same input type on its first call as on every later one and compiles once.

        Raises:
          TypeError: ``ema`` is not a rule of ema_jax (e.g. ``optax.ema(...)``).
          ValueError: ``average_model_state=True`` without a ``model_state``, or with BEMA.
        """
        if not isinstance(ema, (EmaTransform, BemaTransform)):
            raise TypeError(
                "ema must be an ema_jax.EmaTransform, made by ema_jax.ema(...) (or "
                "ema_jax.bema(...)), got "
                f"{type(ema).__name__}"
                + (" (optax.ema averages updates, not params)" if hasattr(ema, "update") else "")
            )
        if average_model_state and model_state is None:
            raise ValueError("average_model_state=True needs a model_state to average")
        if average_model_state and isinstance(ema, BemaTransform):
            raise ValueError(
                "average_model_state=True with BEMA would extrapolate the model_state too (its "
                "lag correction α·(θ - θ0) can make a BatchNorm variance negative): keep "
                "average_model_state=False and recompute the statistics for BEMA's weights "
                "(ema_jax.batch_stats.recompute_linen_batch_stats)"
            )
        state = super().create(
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            ema=ema,
            ema_state=ema.init(_averaged_tree(params, model_state, average_model_state)),
            model_state=model_state,
            average_model_state=average_model_state,
            **kwargs,
        )
        return state.replace(step=jnp.zeros([], jnp.int32))

    def apply_gradients(self, *, grads: Params, **kwargs: Any) -> EmaTrainState:
        """Optimizer step, then EMA update from the new params (and new ``model_state``).

        Under gradient accumulation (``tx=optax.MultiSteps(...)``) the EMA advances only on
        the calls where the optimizer stepped (:func:`ema_jax.optimizer_stepped`)."""
        new = super().apply_gradients(grads=grads, **kwargs)
        target = _averaged_tree(new.params, new.model_state, self.average_model_state)
        stepped = accumulation.optimizer_stepped(new.opt_state)
        _, ema_state = self.ema.update(target, self.ema_state, optimizer_step=stepped)  # type: ignore[arg-type]
        return new.replace(ema_state=ema_state)

    @property
    def num_averages(self) -> int:
        """K, the number of averages the EMA keeps: 1 for a single decay."""
        return self.ema.num_averages

    def _average(self, ema_index: int | None) -> tuple[Params, Any]:
        """``(params, model_state)`` of average ``ema_index`` (``None``: the first), in the
        params' dtypes; ``model_state`` is ``None`` unless it is averaged too."""
        averaged = self.ema.shadow(self.ema_state, self._averaged, ema_index)  # type: ignore[arg-type]
        return _split(averaged, self.average_model_state)

    @property
    def _averaged(self) -> Any:
        """What the rule averages now (BEMA's shadow reads it)."""
        return _averaged_tree(self.params, self.model_state, self.average_model_state)

    def accumulators(self, ema_index: int | None = None) -> Any:
        """The raw accumulators of one average (accumulator dtypes, e.g. fp32 for bf16
        params), params-shaped: average ``ema_index`` (``None``: the first). For BEMA, its
        shadow before the cast back."""
        averaged = self.ema.accumulators(self.ema_state, self._averaged, ema_index)  # type: ignore[arg-type]
        return _split(averaged, self.average_model_state)[0]

    @property
    def ema_params(self) -> Params:
        """The shadow, same tree and dtypes as ``params``; for K decays every average's
        (a K-tuple, as :func:`ema_jax.shadows`). One of them: :meth:`select_params`.

        Like ``params``, these may be the state's own buffers: a train step that donates
        the state invalidates them. Keep a copy (``jax.tree.map(jnp.copy, ...)``) to hold
        on to them across steps.
        """
        if not self.ema.stacked:
            return self._average(None)[0]
        return tuple(self._average(i)[0] for i in range(self.num_averages))

    def select_params(self, use_ema: bool, ema_index: int | None = None) -> Params:
        """``params`` or the shadow of average ``ema_index`` (``None``: the first)."""
        return self._average(ema_index)[0] if use_ema else self.params

    def switch(self, ema_index: int | None = None) -> EmaTrainState:
        """Switch EMA (Li et al. 2024): the training params become the shadow of average
        ``ema_index`` (``None``: the first), everything else goes on unchanged.

        At a switch point ``s`` (e.g. the end of an epoch) the params ``θ_s`` are replaced by
        the shadow ``θ̃_s`` (the average cast to the params' dtypes, as :meth:`select_params`
        gives it), while the EMA keeps its accumulators, weights and count, and the
        optimizer its state and step: the next step is ``θ_{s+1} = θ̃_s + u(∇L(θ̃_s),
        opt_state_s)`` and the EMA continues from its own ``EMA_s`` towards ``θ_{s+1}``.
        With ``average_model_state=True`` the averaged ``model_state`` (e.g. BatchNorm
        statistics) is switched in too; otherwise ``model_state`` is kept.

        Pure and jit-able (``ema_index`` is static). The new params are fresh buffers, never
        the accumulators themselves (a float32 shadow otherwise is), so the switched state
        can be donated to a train step, and they have the params' dtypes and (with
        ``shard_over``) their own layouts: a jitted step compiled before the switch serves
        after it.

        Raises:
          ValueError: ``ema_index`` is not an average of this state.
        """
        averaged = _averaged_tree(*self._average(ema_index), self.average_model_state)
        trained = _averaged_tree(self.params, self.model_state, self.average_model_state)
        switched = placement.replacement(
            averaged, trained, self.ema_state.shardings, self.ema.shard_over
        )
        params, model_state = _split(switched, self.average_model_state)
        if not self.average_model_state:
            model_state = self.model_state
        return self.replace(params=params, model_state=model_state)

    def select_model_state(self, use_ema: bool, ema_index: int | None = None) -> Any:
        """``model_state``, or its average when ``average_model_state`` and ``use_ema``."""
        if use_ema and self.average_model_state:
            return self._average(ema_index)[1]
        return self.model_state


def _averaged_tree(params: Params, model_state: Any, average_model_state: bool) -> Any:
    """What the EMA averages: ``params``, or ``{"params", "model_state"}`` together."""
    return {"params": params, "model_state": model_state} if average_model_state else params


def _split(averaged: Any, average_model_state: bool) -> tuple[Params, Any]:
    """The inverse of :func:`_averaged_tree`: ``(params, model_state or None)``."""
    if average_model_state:
        return averaged["params"], averaged["model_state"]
    return averaged, None
