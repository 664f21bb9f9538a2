"""The flatness probe: how much a loss rises under relative Gaussian weight noise."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames="loss")
def _perturbed_increase(
    loss: Callable[..., jax.Array], params: Any, data: Any, key: jax.Array, r: jax.Array
) -> jax.Array:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [
        r * jnp.sqrt(jnp.mean(p**2)) * jax.random.normal(k, p.shape, p.dtype)
        for p, k in zip(leaves, keys, strict=True)
    ]
    plus = jax.tree.unflatten(treedef, [p + e for p, e in zip(leaves, noise, strict=True)])
    minus = jax.tree.unflatten(treedef, [p - e for p, e in zip(leaves, noise, strict=True)])
    return 0.5 * (loss(plus, *data) + loss(minus, *data)) - loss(params, *data)


def perturbed_losses(
    loss: Callable[..., jax.Array],
    params: Any,
    sizes: Sequence[float],
    key: jax.Array,
    draws: int,
    data: tuple[Any, ...] = (),
) -> dict[str, float]:
    """Mean increase of ``loss(params, *data)`` under Gaussian weight noise, per size ``r``.

    For each leaf ``θ_l``, ``ε_l ~ N(0, (r·rms(θ_l))²)`` i.i.d.; each of the ``draws`` draws is
    used antithetically, ``½(L(θ + ε) + L(θ − ε)) − L(θ)``, which cancels the first-order
    term (exactly ``½εᵀHε`` for a quadratic loss). Returns ``{f"{r:g}": mean increase}``;
    flatter minima give smaller increases at the same relative size. ``loss`` is a static
    argument of one jitted function: pass the same function object to reuse the compilation.
    """
    out = {}
    for r in sizes:
        values = [
            _perturbed_increase(loss, params, data, jax.random.fold_in(key, k), jnp.float32(r))
            for k in range(draws)
        ]
        out[f"{r:g}"] = float(np.mean(jax.device_get(values)))
    return out


__all__ = ["perturbed_losses"]
