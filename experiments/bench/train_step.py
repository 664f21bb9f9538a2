"""G4: what the EMA adds to a training step.

* :func:`bench_model_step`: a jitted, donated Adam train step (forward, backward, Adam)
  without an EMA vs with ``ema_jax.ema``, paired; the goal is a ratio ≤ 1.05 for a ~10M
  param model (:func:`bench_mlp_step`), and the RUL model's step is reported as well
  (:func:`bench_train_step`). The EMA's extra time is also given in bytes per param.
* :func:`bench_adam_step`: an Adam step alone (gradients given) with vs without the EMA,
  in bytes per param at the bandwidth of an 8 B/param in-place pass (the XLA flags table).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import ema_jax
from experiments.bench.harness import (
    ALPHA,
    Donated,
    EmaTransform,
    Timed,
    device_params,
    ema_state_after,
    ema_variants,
    flat,
    fresh_copy,
    host_params,
    median_ms,
    paired_ratios,
    scale_in_place,
)
from experiments.models import make_model

AdamState = tuple[Any, Any]
"""``(params, adam_state)``"""


def adam_apply(adam: optax.GradientTransformation, grads: Any, state: AdamState) -> AdamState:
    """One optimizer step with given gradients: ``(params, opt_state)`` after it."""
    params, opt_state = state
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def adam_ema_step(
    adam: optax.GradientTransformation, tx: EmaTransform
) -> Callable[[Any, tuple[Any, Any, Any]], tuple[Any, Any, Any]]:
    """``(grads, (params, adam_state, ema_state)) -> the same after an Adam step and an
    EMA update of the new params``, in the shape :class:`Donated` calls."""

    def step(grads: Any, state: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        params, opt_state = adam_apply(adam, grads, state[:2])
        return params, opt_state, ema_state_after(tx, params, state[2])

    return step


# ----------------------------------------------------------------------------- train step


def _rul_batch(batch: int) -> tuple[jax.Array, jax.Array]:
    """A random batch shaped like the RUL experiment's: 30 cycles × 14 sensors, and targets."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 30, 14)).astype(np.float32))
    y = jnp.asarray(rng.random(batch).astype(np.float32))
    return x, y


class MLP(nn.Module):
    """``depth`` ReLU layers of ``width`` units and a scalar head: G4's ~10M-param model
    (``width=1600, depth=4``: 10.2M params in 10 leaves)."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(1)(x)[..., 0]


def bench_train_step(model_name: str, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """:func:`bench_model_step` on the RUL experiment's model and batch shape (30 cycles ×
    14 sensors, dropout on)."""
    x, y = _rul_batch(batch)
    return {"model": model_name, **bench_model_step(make_model(model_name), x, y, steps, repeats)}


def bench_mlp_step(width: int, depth: int, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """:func:`bench_model_step` on an :class:`MLP` and a random batch of ``width`` features."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, width)).astype(np.float32))
    y = jnp.asarray(rng.random(batch).astype(np.float32))
    model = MLP(width, depth)
    return {"model": f"MLP {depth}×{width}", **bench_model_step(model, x, y, steps, repeats)}


def bench_model_step(
    model: nn.Module, x: jax.Array, y: jax.Array, steps: int, repeats: int
) -> dict[str, Any]:
    """A jitted, donated Adam train step of ``model`` (MSE on ``(x, y)``, a dropout rng)
    without an EMA (flax ``TrainState``, the same step code) vs with ``ema_jax.ema`` (the
    default, and with the NaN/Inf guard): ratios of back-to-back blocks of ``steps`` steps,
    and the EMA's extra time in bytes per param at the bandwidth of an 8 B/param in-place
    pass over the params (measured in the same run)."""
    params = model.init(jax.random.key(0), x[:1])["params"]
    n = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    key = jax.random.key(1)

    def loss_fn(p: Any, b: tuple[jax.Array, jax.Array], rng: jax.Array) -> jax.Array:
        pred = cast(jax.Array, model.apply({"params": p}, b[0], train=True, rngs={"dropout": rng}))
        return jnp.mean((pred - b[1]) ** 2)

    def plain_step(s: train_state.TrainState, b: Any, rng: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(s.params, b, jax.random.fold_in(rng, s.step))
        return s.apply_gradients(grads=grads), {"loss": loss}

    runs: dict[str, tuple[Callable[..., Any], Any]] = {
        "without EMA": (
            jax.jit(plain_step, donate_argnums=0),
            train_state.TrainState.create(
                apply_fn=model.apply, params=fresh_copy(params), tx=optax.adam(1e-3)
            ),
        )
    }
    for name, tx in ema_variants("with EMA").items():
        runs[name] = (
            ema_jax.make_train_step(loss_fn),
            ema_jax.EmaTrainState.create(
                apply_fn=model.apply, params=fresh_copy(params), tx=optax.adam(1e-3), ema=tx
            ),
        )
    states = {k: s for k, (_, s) in runs.items()}

    def block(name: str) -> Timed:
        step = runs[name][0]

        def run() -> None:
            for _ in range(steps):
                states[name], metrics = step(states[name], (x, y), key)
            jax.block_until_ready((states[name], metrics))

        return run

    paired = paired_ratios(
        block("without EMA"), {k: block(k) for k in runs if k != "without EMA"}, repeats
    )
    ms = paired.pop("ms")
    pass_ms = median_ms({"scale": scale_in_place(jnp.zeros(n, jnp.float32))}, repeats)["scale"]
    without = ms["base"] / steps
    return {
        "params": n,
        "leaves": len(jax.tree.leaves(params)),
        "batch": int(x.shape[0]),
        "steps_per_block": steps,
        "rounds": repeats,
        "ms_per_step": {
            "without EMA": without,
            **{k: v / steps for k, v in ms.items() if k != "base"},
        },
        "ratios": paired,
        "ratio": paired["with EMA"]["ratio"],
        "pass_8B_ms": pass_ms,
        "extra_bytes_per_param": {
            k: 8 * (r["ratio"] - 1) * without / pass_ms for k, r in paired.items()
        },
    }


# ----------------------------------------------------------------------------- Adam step


def _adam_lerp_step(
    adam: optax.GradientTransformation, in_cond: bool
) -> Callable[[Any, tuple[Any, Any, Any]], tuple[Any, Any, Any]]:
    """References: a bare per-leaf lerp after Adam (the least an unfused EMA costs on
    XLA), and the same inside a ``lax.cond`` (ema_jax's shape when steps can be skipped)."""

    def step(grads: Any, state: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        params, opt_state = adam_apply(adam, grads, state[:2])

        def lerp(ema: Any) -> Any:
            return [e + ALPHA * (p - e) for e, p in zip(ema, params, strict=True)]

        if not in_cond:
            return params, opt_state, lerp(state[2])
        count = cast(Any, opt_state)[0].count  # a traced predicate, always true
        return params, opt_state, jax.lax.cond(count > 0, lerp, lambda e: e, state[2])

    return step


def bench_adam_step(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """Adam step (grads given) on ``n`` params with vs without EMA, and the 8 B/param cost.

    The cost of 8 B/param is measured as a donated in-place ``x * c`` over ``n`` params
    (read 4 B + write 4 B): the bandwidth XLA reaches on this machine. The EMA's extra
    bytes per param are its extra time in units of that cost, twice: from the difference
    of the round-robin medians, and paired (Adam with and without EMA back to back).
    """
    host = host_params(n, leaves)
    params = [jnp.asarray(x) for x in host]
    grads = [g * 1e-3 for g in device_params(n, leaves, seed=1)]
    adam = optax.adam(1e-4)

    def state(ema: Any) -> tuple[Any, Any, Any]:
        return fresh_copy(params), adam.init(params), ema

    fns: dict[str, Timed] = {
        "adam": Donated(
            lambda g, s: adam_apply(adam, g, s), (fresh_copy(params), adam.init(params)), grads
        ),
        **{
            f"adam+{name}": Donated(adam_ema_step(adam, tx), state(tx.init(params)), grads)
            for name, tx in ema_variants().items()
        },
        "adam+lerp": Donated(_adam_lerp_step(adam, False), state(fresh_copy(params)), grads),
        "adam+lerp in cond": Donated(_adam_lerp_step(adam, True), state(fresh_copy(params)), grads),
        "scale 8B/param": scale_in_place(jnp.asarray(flat(host))),
    }
    ms = median_ms(fns, repeats)
    cost8 = ms["scale 8B/param"]
    extra = {k: v - ms["adam"] for k, v in ms.items() if k.startswith("adam+")}
    steps_with_ema = ("adam+ema_jax", "adam+ema_jax guard", "adam+lerp")
    paired = paired_ratios(fns["adam"], {k: fns[k] for k in steps_with_ema}, repeats)
    per_ratio = 8 * paired["ms"]["base"] / cost8  # B/param per unit of (ratio − 1)
    return {
        "params": n,
        "leaves": leaves,
        "ms": ms,
        "bandwidth_GBps": 8 * n / (cost8 * 1e-3) / 1e9,
        "extra_ms": extra,
        "extra_bytes_per_param": {k: 8 * v / cost8 for k, v in extra.items()},
        "paired_extra_bytes_per_param": {
            k: {q: per_ratio * (paired[k][q] - 1) for q in ("ratio", "q1", "q3")}
            for k in steps_with_ema
        },
    }
