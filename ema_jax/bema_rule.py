"""BEMA, the EMA with its lag corrected (Block & Zhang 2025, "EMA without the lag"): :func:`bema`.

With ``t`` the optimizer steps since the burn-in (``t = count - start_step``) and ``θ₀`` the
params at the burn-in step (the last step that copies; the initial params for
``start_step=0``), BEMA keeps an EMA whose new params weigh ``β_t = (ρ + γt)^(-κ)``::

    EMA_t = (1 - β_t)·EMA_{t-1} + β_t·θ_t,    EMA_0 = θ₀

and deploys it with the lag corrected by ``α_t = (ρ + γt)^(-η)``::

    BEMA_t = α_t·(θ_t - θ₀) + EMA_t

``BEMA_t`` is the rule's *shadow* (``docs/semantics.md``). It is read off the state and the
*current* params: the state holds the EMA's accumulators and the anchor ``θ₀`` (two
params-shaped copies in the accumulator dtypes, where :func:`ema_jax.ema` holds one), and
the correction takes ``θ_t`` from the params it is given (``EmaTrainState.params``, the
model given to ``nnx.BEMA``). During the burn-in (``t <= 0``) the shadow is the params.

The EMA is :func:`ema_jax.ema`'s with the decay schedule :class:`BemaDecay`, so
``update_every`` (the product of the per-step decays), ``start_step``, fp32 accumulators
for bf16, ``skip_nonfinite``, gradient accumulation, ``memory_kind`` and ``shard_over``
behave as they do there; the anchor is placed like the accumulators.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from ema_jax import _checks, _dtypes, _kernel, placement, schedules, transform
from ema_jax.transform import EmaState, EmaTransform, Params


@dataclasses.dataclass(frozen=True)
class BemaDecay:
    """The decay of BEMA's EMA at step ``t``: ``1 - (ρ + γ·(t - start_step))^(-κ)`` (the
    weight of the old average; ``β_t`` above is that of the new params)."""

    kappa: float
    rho: float
    gamma: float
    start_step: int = 0

    def __call__(self, t: jax.Array) -> jax.Array:
        return -jnp.expm1(-self.kappa * jnp.log(self.horizon(t)))

    def horizon(self, t: jax.Array) -> jax.Array:
        """``ρ + γ·(t - start_step)``, at least ``ρ + γ`` (the first step after burn-in)."""
        steps = jnp.maximum(jnp.asarray(t, schedules.default_float()) - self.start_step, 1.0)
        return self.rho + self.gamma * steps


class BemaState(struct.PyTreeNode):
    """State of a :class:`BemaTransform`: the EMA's state and the anchor ``θ₀``.

    Attributes:
      average: the :class:`~ema_jax.EmaState` of the EMA (count, weight, accumulators).
      anchor: ``θ₀``, a tree like the params in the accumulator dtypes, placed like the
        accumulators (host memory with ``memory_kind``, split with ``shard_over``).
    """

    average: EmaState
    anchor: Params

    @property
    def count(self) -> jax.Array:
        """Optimizer steps seen (:attr:`ema_jax.EmaState.count`)."""
        return self.average.count

    @property
    def num_skipped(self) -> jax.Array:
        """Updates skipped (:attr:`ema_jax.EmaState.num_skipped`)."""
        return self.average.num_skipped

    @property
    def param_dtypes(self) -> tuple[Any, ...]:
        """The params' leaf dtypes, which the shadow is cast back to."""
        return self.average.param_dtypes

    @property
    def shardings(self) -> tuple[Any, ...] | None:
        """The accumulators' (and the anchor's) shardings with ``shard_over``."""
        return self.average.shardings


@dataclasses.dataclass(frozen=True)
class BemaTransform:
    """BEMA of params: ``init(params)``, ``update(params, state)``, ``shadow(state, params)``.

    Made by :func:`bema`, which documents the settings; usable wherever an
    :class:`~ema_jax.EmaTransform` is (``EmaTrainState.create(ema=...)``, checkpoints,
    export; NNX: :class:`ema_jax.nnx.BEMA`). Frozen and hashable by value.
    """

    average: EmaTransform  # the EMA, with the decay schedule BemaDecay
    eta: float
    stacked = False  # one average
    num_averages = 1

    @property
    def decay(self) -> BemaDecay:
        """The EMA's decay schedule (``κ``, ``ρ``, ``γ``, ``start_step``)."""
        return self.average.decays[0]  # type: ignore[return-value]

    @property
    def decays(self) -> tuple[Any, ...]:
        """The EMA's decays: ``(decay,)``."""
        return self.average.decays

    @property
    def shard_over(self) -> tuple[str, ...] | None:
        """The mesh axes the accumulators and the anchor are split over."""
        return self.average.shard_over

    def init(self, params: Params) -> BemaState:
        """A state whose EMA and anchor are copies of ``params``."""
        average = self.average.init(params)
        anchor = jax.tree.map(lambda x: x.copy(), average.ema)  # same dtypes and placement
        return BemaState(average=average, anchor=anchor)

    def update(
        self, params: Params, state: BemaState, *misuse: Any, optimizer_step: Any = True
    ) -> tuple[Params, BemaState]:
        """One step: ``(shadow, new_state)`` from the params after the optimizer step, as
        :meth:`ema_jax.EmaTransform.update`; the anchor follows the params until the end of
        the burn-in (``count <= start_step``)."""
        if misuse:  # optax.chain and TrainState call update(updates, state, params)
            raise _checks.not_an_optimizer(type(self).__name__)
        if not isinstance(state, BemaState):
            raise TypeError(
                f"state must be the BemaState returned by init(params), got {type(state).__name__}"
            )
        _, average = self.average.update(params, state.average, optimizer_step=optimizer_step)
        # In the burn-in the EMA copies the params (or keeps them, on a skipped step): so
        # does the anchor. After it, the anchor is never read again for writing.
        anchor = lax.cond(
            average.count <= self.decay.start_step, lambda: average.ema, lambda: state.anchor
        )
        new_state = BemaState(average=average, anchor=anchor)
        out = self.shadow(new_state, params)
        return (placement.to_host(out) if self.average.memory_kind else out), new_state

    def correction(self, count: jax.Array) -> jax.Array:
        """``α_t = (ρ + γt)^(-η)`` at step ``count`` (``t`` at least 1)."""
        return self.decay.horizon(count) ** -self.eta

    def accumulators(
        self, state: BemaState, params: Params, ema_index: int | None = None
    ) -> Params:
        """``BEMA_t`` in the accumulator dtypes: ``α_t·(θ_t - θ₀) + EMA_t`` for floating
        leaves (``θ_t``: ``params``); integer and bool leaves are the EMA's copies. During
        the burn-in it is ``params`` exactly. With ``skip_nonfinite``, params holding a
        NaN/Inf give ``EMA_t`` (the step they came from was skipped too).

        Raises:
          ValueError: ``params`` do not match the state; ``ema_index`` not ``None`` or 0.
        """
        self.average.check_matches(params, state.average)
        ema = transform.accumulators(state.average, ema_index)
        anchor = placement.to_device(state.anchor)
        alpha = self.correction(state.count)
        burn_in = state.count <= self.decay.start_step
        usable = _kernel.all_finite(params) if self.average.skip_nonfinite else True
        if state.shardings is not None and self.shard_over is not None:  # the state's layout
            params = placement.local_slices(params, state.shardings, self.shard_over)

        def corrected(average: jax.Array, anchor: jax.Array, param: jax.Array) -> jax.Array:
            if not _dtypes.is_averaged(average.dtype):
                return average
            param = param.astype(average.dtype)
            bema = average + alpha.astype(average.real.dtype) * (param - anchor)
            return jnp.where(burn_in, param, jnp.where(usable, bema, average))

        return jax.tree.map(corrected, ema, anchor, params)

    def shadow(self, state: BemaState, params: Params, ema_index: int | None = None) -> Params:
        """``BEMA_t`` (:meth:`accumulators`) in the params' dtypes: the weights to deploy."""
        return _dtypes.cast_back(self.accumulators(state, params, ema_index), state.param_dtypes)


def bema(
    *,
    eta: float = 0.2,
    kappa: float = 0.5,
    rho: float = 10.0,
    gamma: float = 1.0,
    update_every: int = 1,
    start_step: int = 0,
    accumulator_dtype: Any = None,
    skip_nonfinite: bool = False,
    memory_kind: str | None = None,
    shard_over: str | tuple[str, ...] | None = None,
) -> BemaTransform:
    """BEMA (formulas: the module docstring), with TRL's defaults.

    Args:
      eta: ``η >= 0``, the power of the lag correction ``α_t = (ρ + γt)^(-η)``; 0 gives
        ``α = 1``, larger values fade the correction sooner.
      kappa: ``κ >= 0``, the power of the EMA's weight ``β_t = (ρ + γt)^(-κ)``.
      rho: ``ρ >= 0``, the lag: the steps the weights behave as if already seen.
      gamma: ``γ > 0``, steps per unit of ``t``. ``ρ + γ`` must be at least 1 (so
        ``β_1 <= 1``).
      update_every, start_step, accumulator_dtype, skip_nonfinite, memory_kind, shard_over:
        as for :func:`ema_jax.ema`; ``start_step`` is the burn-in (``θ₀`` is the params at
        that step, ``t`` counts from it).

    Raises:
      ValueError / TypeError naming the argument, for out-of-range settings.
    """
    eta = _checks.real("eta", eta, low=0.0)
    kappa = _checks.real("kappa", kappa, low=0.0)
    rho = _checks.real("rho", rho, low=0.0)
    gamma = _checks.real("gamma", gamma, low=0.0, low_open=True)
    if rho + gamma < 1.0:
        raise ValueError(
            f"rho + gamma must be >= 1 (the first weight (rho + gamma)^-kappa is then <= 1), "
            f"got rho={rho:g}, gamma={gamma:g}"
        )
    start = _checks.integer("start_step", start_step, 0)
    decay = BemaDecay(kappa=kappa, rho=rho, gamma=gamma, start_step=start)  # type: ignore[arg-type]
    average = transform.ema(
        decay,
        update_every=update_every,
        start_step=start_step,
        accumulator_dtype=accumulator_dtype,
        skip_nonfinite=skip_nonfinite,
        memory_kind=memory_kind,
        shard_over=shard_over,
    )
    return BemaTransform(average=average, eta=eta)


__all__ = ["BemaDecay", "BemaState", "BemaTransform", "bema"]
