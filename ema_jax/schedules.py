"""Decay schedules ``t -> β_t``, pure and jit-safe; each docstring gives its ``β_t``.

``t`` is the 1-based optimizer step (``docs/semantics.md``), an int32 array, traced under
``jit``; the result is a scalar in JAX's default float dtype (float32, or float64 under
``jax_enable_x64``, so float64 params can be averaged with the exact β). Any
``Callable[[jax.Array], jax.Array]`` with that contract can be passed as ``decay``.

The schedules here are small frozen dataclasses: hashable and equal by value, so
``ema(schedules.constant(0.9)) == ema(schedules.constant(0.9))`` and a train state rebuilt
with an equal schedule reuses its compiled step. A schedule may also give the product of
its decays in closed form (:class:`ClosedFormProduct`), used by ``ema(update_every=k)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from ema_jax import _checks, window

Schedule = Callable[[jax.Array], jax.Array]


@runtime_checkable
class ClosedFormProduct(Protocol):
    """A schedule that also knows ``decay_product(t, n) = Π_{j=t-n+1..t} β_j`` in closed
    form: the decay of one ``ema(update_every=k)`` update (``docs/semantics.md``), O(1)
    instead of k evaluations of the schedule."""

    def __call__(self, t: jax.Array) -> jax.Array: ...

    def decay_product(self, t: jax.Array, n: jax.Array) -> jax.Array: ...


def default_float() -> jnp.dtype:
    """float32, or float64 when x64 is enabled: the dtype of all decay arithmetic."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _float(t: jax.Array) -> jax.Array:
    return jnp.asarray(t, dtype=default_float())


def _warn_inaccurate(name: str, beta: float) -> None:
    """Without x64 every accumulator is at most float32: warn for decays too long for it."""
    if default_float() == jnp.float32:
        _checks.accuracy(name, beta, jnp.float32)


def _checked_decay(name: str, value: float) -> float:
    """A decay in [0, 1) that does not round to 1.0 in the default float (warned when too
    long for float32 accumulators)."""
    beta = _checks.below_one(_checks.decay(name, value), name, value, "it", default_float())
    _warn_inaccurate(name, beta)
    return beta


def _set(obj: object, **fields: object) -> None:
    """Stores the checked values of a frozen dataclass's fields (in ``__post_init__``)."""
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


@dataclasses.dataclass(frozen=True)
class Constant:
    """``β_t = decay`` for every step (made by :func:`constant`)."""

    decay: float

    def __post_init__(self) -> None:
        _set(self, decay=_checked_decay("decay", self.decay))

    def __call__(self, t: jax.Array) -> jax.Array:
        return jnp.full(jnp.shape(t), self.decay, dtype=default_float())

    def decay_product(self, t: jax.Array, n: jax.Array) -> jax.Array:
        """``β^n``."""
        return jnp.asarray(self.decay, default_float()) ** _float(n)


@dataclasses.dataclass(frozen=True)
class TfWarmup:
    """``min(decay, (1+t)/(10+t))`` (made by :func:`tf_warmup`)."""

    decay: float = 0.9999

    def __post_init__(self) -> None:
        _set(self, decay=_checked_decay("decay", self.decay))

    def __call__(self, t: jax.Array) -> jax.Array:
        t = _float(t)
        return jnp.minimum(jnp.asarray(self.decay, t.dtype), (1.0 + t) / (10.0 + t))


@dataclasses.dataclass(frozen=True)
class InversePower:
    """``clip(1 - (1 + t/inv_gamma)^(-power), min_decay, max_decay)`` (made by
    :func:`inverse_power`)."""

    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    max_decay: float = 0.9999

    def __post_init__(self) -> None:
        inv_gamma = _checks.positive("inv_gamma", self.inv_gamma)
        power = _checks.positive("power", self.power)
        min_decay = _checks.decay("min_decay", self.min_decay)
        max_decay = _checks.decay("max_decay", self.max_decay)
        _checks.below_one(min_decay, "min_decay", min_decay, "it", default_float())
        _checks.below_one(max_decay, "max_decay", max_decay, "it", default_float())
        _warn_inaccurate("max_decay", max_decay)
        if min_decay > max_decay:
            raise ValueError(f"min_decay ({min_decay}) must be <= max_decay ({max_decay})")
        _set(self, inv_gamma=inv_gamma, power=power, min_decay=min_decay, max_decay=max_decay)

    def __call__(self, t: jax.Array) -> jax.Array:
        value = 1.0 - (1.0 + _float(t) / self.inv_gamma) ** (-self.power)
        return jnp.clip(value, self.min_decay, self.max_decay)


@dataclasses.dataclass(frozen=True)
class PowerFunction:
    """``β_t = (1 - 1/t)^(γ+1)`` (made by :func:`power_function`)."""

    gamma: float

    def __post_init__(self) -> None:
        _set(self, gamma=_checks.real("gamma", self.gamma, low=-1.0, low_open=True))

    def __call__(self, t: jax.Array) -> jax.Array:
        t = jnp.maximum(_float(t), 1.0)
        # exp((γ+1)·log1p(-1/t)) keeps 1 - β accurate for large t.
        value = jnp.exp((self.gamma + 1.0) * jnp.log1p(-1.0 / t))
        return jnp.where(t <= 1.0, 0.0, value)

    def decay_product(self, t: jax.Array, n: jax.Array) -> jax.Array:
        """``Π_{j=t-n+1..t} (1 - 1/j)^(γ+1)`` telescopes to ``(1 - n/t)^(γ+1)``; 0 once it
        holds ``β_1``."""
        t = jnp.maximum(_float(t), 1.0)
        return jnp.exp((self.gamma + 1.0) * jnp.log1p(-jnp.minimum(_float(n), t) / t))


def constant(decay: float) -> Constant:
    """``β_t = decay`` for every step.

    ``decay`` must not round to 1.0 in the default float (float32: below ``1 - 2^-25``); in
    float32 a decay above ~0.99994 warns, as float32 accumulators then drift by more than
    1e-3 (docs/guarantees.md has the measured table).
    """
    return Constant(decay)


def tf_warmup(decay: float = 0.9999) -> TfWarmup:
    """TensorFlow's ``ExponentialMovingAverage(num_updates=t)``: ``min(decay, (1+t)/(10+t))``.

    Short windows early in training, ``decay`` once ``t >= (10·decay - 1)/(1 - decay)``.
    """
    return TfWarmup(decay)


def inverse_power(
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    min_decay: float = 0.0,
    max_decay: float = 0.9999,
) -> InversePower:
    """The warm-up of timm / diffusers: ``clip(1 - (1 + t/inv_gamma)^(-power), min, max)``.

    ``power = 2/3`` reaches 0.999 at ~31.6k steps and 0.9999 at ~1M steps;
    ``power = 3/4`` reaches 0.999 at ~10k steps and 0.9999 at ~215k steps.
    """
    return InversePower(inv_gamma, power, min_decay, max_decay)


def power_function(gamma: float | None = None, *, sigma_rel: float | None = None) -> PowerFunction:
    """Power-function EMA of Karras et al. 2024 (EDM2): ``β_t = (1 - 1/t)^(γ+1)``.

    Averages the whole history with weights ``∝ τ^γ`` (τ = 1..t), so its width grows with
    training; ``β_1 = 0`` (the first update copies the params). Give either ``gamma``
    (> -1) or ``sigma_rel`` (the relative standard deviation of the averaging profile,
    in (0, 0.3003]; see :func:`ema_jax.sigma_rel_to_gamma`).
    """
    if (gamma is None) == (sigma_rel is None):
        raise ValueError("power_function needs exactly one of gamma or sigma_rel")
    if sigma_rel is not None:
        gamma = window.sigma_rel_to_gamma(sigma_rel)
    return PowerFunction(gamma)  # type: ignore[arg-type]


def from_half_life(steps: float) -> Constant:
    """Constant decay whose half-life is ``steps`` optimizer steps: ``β = 0.5^(1/steps)``
    (the inverse of :func:`ema_jax.window.half_life`)."""
    beta = 0.5 ** (1.0 / _checks.positive("steps", steps))
    return constant(_checks.below_one(beta, "steps", steps, "0.5**(1/steps)", default_float()))


def half_life(steps: float) -> Constant:
    """Deprecated alias of :func:`from_half_life` (``ema_jax.half_life`` is the opposite
    direction: decay -> steps)."""
    warnings.warn(
        "ema_jax.schedules.half_life(steps) is deprecated: use "
        "ema_jax.schedules.from_half_life(steps) (ema_jax.half_life(decay) goes the other way)",
        DeprecationWarning,
        stacklevel=2,
    )
    return from_half_life(steps)
