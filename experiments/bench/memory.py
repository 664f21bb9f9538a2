"""P3: the memory of params + Adam + EMA, donated — the goal is exactly one extra copy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import ema_jax
from experiments.bench.harness import DECAY, device_params, fresh_copy
from experiments.bench.train_step import adam_apply, adam_ema_step


def live_bytes() -> int:
    """Bytes of every array the process holds now."""
    return sum(a.nbytes for a in jax.live_arrays())


def _footprint(
    step: Callable[[Any, Any], Any], grads: Any, make_state: Callable[[], Any], steps: int
) -> dict[str, int]:
    """What ``steps`` donated calls of ``step`` leave held: the process's live bytes
    above those before ``make_state()``, and the compiled step's scratch (``temp``) and
    output bytes that reuse no donated input (a transient second copy would show there)."""
    before = live_bytes()
    state = make_state()
    jitted = jax.jit(step, donate_argnums=1)
    analysis = jitted.lower(grads, state).compile().memory_analysis()
    if analysis is None:  # a backend without XLA's memory analysis
        raise RuntimeError(f"{jax.default_backend()} gives no memory analysis for P3")
    for _ in range(steps):
        state = jitted(grads, state)
    jax.block_until_ready(state)
    return {
        "live_bytes": live_bytes() - before,
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "unaliased_output_bytes": int(analysis.output_size_in_bytes - analysis.alias_size_in_bytes),
    }


def bench_memory(n: int, leaves: int, steps: int = 3) -> dict[str, Any]:
    """Bytes held by params + Adam state (+ EMA), donated, after ``steps`` steps:
    ``jax.live_arrays()`` bytes (what the process holds between steps) and the compiled
    step's ``memory_analysis()`` (see :func:`_footprint`)."""
    params = device_params(n, leaves)
    grads = [jnp.zeros_like(p) for p in params]
    adam = optax.adam(1e-4)
    tx = ema_jax.ema(DECAY)
    param_bytes = sum(p.nbytes for p in params)
    out: dict[str, Any] = {"params": n, "leaves": leaves, "param_bytes": param_bytes}
    runs: dict[str, tuple[Callable[[Any, Any], Any], Callable[[], Any]]] = {
        "without EMA": (
            lambda g, s: adam_apply(adam, g, s),
            lambda: (fresh_copy(params), adam.init(params)),
        ),
        "with EMA": (
            adam_ema_step(adam, tx),
            lambda: (fresh_copy(params), adam.init(params), tx.init(params)),
        ),
    }
    for name, (step, make_state) in runs.items():
        held = _footprint(step, grads, make_state, steps)
        out[name] = {**held, "live_copies": held["live_bytes"] / param_bytes}
    out["extra_bytes"] = out["with EMA"]["live_bytes"] - out["without EMA"]["live_bytes"]
    out["extra_copies"] = out["extra_bytes"] / param_bytes
    return out
