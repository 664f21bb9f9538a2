"""What the placement tests share: bitwise reads in any memory, an NNX training pair. Not
collected by pytest (no ``test_`` prefix)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def bits(tree: Any) -> list[bytes]:
    """The bytes of every leaf, read on the devices whatever memory it lives in."""
    return [
        np.asarray(jax.device_put(x, jax.memory.Space.Device)).tobytes()
        for x in jax.tree.leaves(tree)
    ]


def train_nnx_pair(model: Any, average: Any, reference: Any, steps: int = 3) -> None:
    """``steps`` donated ``nnx.jit`` SGD steps of ``model`` (loss ``Σ w²``), each followed by
    the updates of two ``ema_jax.nnx.EMA`` s of it."""
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1, 2, 3))
    def step(model: Any, optimizer: Any, average: Any, reference: Any) -> None:
        optimizer.update(model, nnx.grad(lambda m: jnp.sum(m.w[...] ** 2))(model))
        average.update(model)
        reference.update(model)

    for _ in range(steps):
        step(model, optimizer, average, reference)
