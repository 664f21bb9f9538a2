"""Gradient accumulation: whether an optimizer state comes from a real optimizer step.

Under ``optax.MultiSteps`` the params change once every k calls; the calls in between
(micro-steps) only accumulate gradients. The EMA must advance once per real step, as
Lightning, timm and ema-pytorch do: :class:`~ema_jax.EmaTrainState` passes
:func:`optimizer_stepped` of its new optimizer state to the EMA update by itself, and the
functional API and ``ema_jax.nnx.EMA.update`` take it as ``optimizer_step=``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax


def _is_multi_steps(node: Any) -> bool:
    return isinstance(node, optax.MultiStepsState)


def optimizer_stepped(opt_state: Any) -> Any:
    """Whether the optimizer state ``opt_state`` was just produced by a real optimizer step.

    ``True`` (a Python bool: nothing to trace) when the state holds no
    ``optax.MultiStepsState``; otherwise a boolean scalar, traced under ``jit``, that is
    ``optax.MultiSteps.has_updated``'s rule (the mini-step counter back at 0 after at least
    one gradient step) for every ``MultiStepsState`` found in the tree (nested in a chain,
    or an ``nnx.Optimizer``'s ``opt_state``, whose Variables are read).
    """
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=_is_multi_steps)
        if _is_multi_steps(node)
    ]
    if not found:
        return True
    return functools.reduce(jnp.logical_and, [_has_updated(state) for state in found])


def _has_updated(state: optax.MultiStepsState) -> jax.Array:
    """``optax.MultiSteps.has_updated(state)``, with NNX Variables read first."""
    plain = state._replace(
        mini_step=jnp.asarray(state.mini_step[...]),
        gradient_step=jnp.asarray(state.gradient_step[...]),
    )
    # has_updated reads only the state, never the wrapped optimizer: any instance gives it.
    return jnp.asarray(optax.MultiSteps(optax.identity(), 1).has_updated(plain))


__all__ = ["optimizer_stepped"]
