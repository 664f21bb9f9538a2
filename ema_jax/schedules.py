"""Decay schedules ``t -> β_t``, pure and jit-safe; each docstring gives its ``β_t``.

``t`` is the 1-based optimizer step (``docs/semantics.md``), an int32 array, traced under
``jit``; the result is a scalar in JAX's default float dtype (float32, or float64 under
``jax_enable_x64``, so float64 params can be averaged with the exact β). Any
``Callable[[jax.Array], jax.Array]`` with that contract can be passed as ``decay``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ema_jax import _checks, window

Schedule = Callable[[jax.Array], jax.Array]


def default_float() -> jnp.dtype:
    """float32, or float64 when x64 is enabled: the dtype of all decay arithmetic."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _float(t: jax.Array) -> jax.Array:
    return jnp.asarray(t, dtype=default_float())


def _warn_inaccurate(name: str, beta: float) -> None:
    """Without x64 every accumulator is at most float32: warn for decays too long for it."""
    if default_float() == jnp.float32:
        _checks.accuracy(name, beta, jnp.float32)


def constant(decay: float) -> Schedule:
    """``β_t = decay`` for every step.

    ``decay`` must not round to 1.0 in the default float (float32: below ``1 - 2^-25``); in
    float32 a decay above ~0.99994 warns, as float32 accumulators then drift by more than
    1e-3 (docs/guarantees.md has the measured table).
    """
    decay = _checks.below_one(_checks.decay("decay", decay), "decay", decay, "it", default_float())
    _warn_inaccurate("decay", decay)

    def schedule(t: jax.Array) -> jax.Array:
        return jnp.full(jnp.shape(t), decay, dtype=default_float())

    return _with_product(schedule, lambda t, n: jnp.asarray(decay, default_float()) ** _float(n))


def tf_warmup(decay: float = 0.9999) -> Schedule:
    """TensorFlow's ``ExponentialMovingAverage(num_updates=t)``: ``min(decay, (1+t)/(10+t))``.

    Short windows early in training, ``decay`` once ``t >= (10·decay - 1)/(1 - decay)``.
    """
    decay = _checks.below_one(_checks.decay("decay", decay), "decay", decay, "it", default_float())
    _warn_inaccurate("decay", decay)

    def schedule(t: jax.Array) -> jax.Array:
        t = _float(t)
        return jnp.minimum(jnp.asarray(decay, t.dtype), (1.0 + t) / (10.0 + t))

    return schedule


def inverse_power(
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    min_decay: float = 0.0,
    max_decay: float = 0.9999,
) -> Schedule:
    """The warm-up of timm / diffusers: ``clip(1 - (1 + t/inv_gamma)^(-power), min, max)``.

    ``power = 2/3`` reaches 0.999 at ~31.6k steps and 0.9999 at ~1M steps;
    ``power = 3/4`` reaches 0.999 at ~10k steps and 0.9999 at ~215k steps.
    """
    inv_gamma = _checks.positive("inv_gamma", inv_gamma)
    power = _checks.positive("power", power)
    min_decay = _checks.decay("min_decay", min_decay)
    max_decay = _checks.decay("max_decay", max_decay)
    _checks.below_one(min_decay, "min_decay", min_decay, "it", default_float())
    _checks.below_one(max_decay, "max_decay", max_decay, "it", default_float())
    _warn_inaccurate("max_decay", max_decay)
    if min_decay > max_decay:
        raise ValueError(f"min_decay ({min_decay}) must be <= max_decay ({max_decay})")

    def schedule(t: jax.Array) -> jax.Array:
        value = 1.0 - (1.0 + _float(t) / inv_gamma) ** (-power)
        return jnp.clip(value, min_decay, max_decay)

    return schedule


def power_function(gamma: float | None = None, *, sigma_rel: float | None = None) -> Schedule:
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
    exponent = _checks.real("gamma", gamma, low=-1.0, low_open=True) + 1.0

    def schedule(t: jax.Array) -> jax.Array:
        t = jnp.maximum(_float(t), 1.0)
        # exp((γ+1)·log1p(-1/t)) keeps 1 - β accurate for large t.
        value = jnp.exp(exponent * jnp.log1p(-1.0 / t))
        return jnp.where(t <= 1.0, 0.0, value)

    def product(t: jax.Array, n: jax.Array) -> jax.Array:
        # Π_{j=t-n+1..t} (1 - 1/j)^(γ+1) telescopes to (1 - n/t)^(γ+1); 0 once it holds β_1.
        t = jnp.maximum(_float(t), 1.0)
        return jnp.exp(exponent * jnp.log1p(-jnp.minimum(_float(n), t) / t))

    return _with_product(schedule, product)


def _with_product(
    schedule: Schedule, product: Callable[[jax.Array, jax.Array], jax.Array]
) -> Schedule:
    """``schedule`` carrying ``decay_product(t, n) = Π_{j=t-n+1..t} β_j`` in closed form: the
    decay of one ``ema(update_every=k)`` update (``docs/semantics.md``), O(1) instead of k
    evaluations."""
    schedule.decay_product = product  # type: ignore[attr-defined]
    return schedule


def half_life(steps: float) -> Schedule:
    """Constant decay whose half-life is ``steps`` optimizer steps: ``β = 0.5^(1/steps)``."""
    beta = 0.5 ** (1.0 / _checks.positive("steps", steps))
    return constant(_checks.below_one(beta, "steps", steps, "0.5**(1/steps)", default_float()))
