"""What the post-hoc tests share: references written independently of ema_jax (γ by
bisection, the coefficients by quadrature), a recorded Linen run, a small tree. Not
collected by pytest (no ``test_`` prefix)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import integrate

import ema_jax
from ema_jax import posthoc, schedules

PF = schedules.power_function


def gamma(sigma_rel: float) -> float:
    """γ of σ_rel by bisection on σ_rel(γ) = sqrt(γ+1)/((γ+2)·sqrt(γ+3)) (decreasing for
    γ ≥ 0): independent of ema_jax.window's cubic."""
    lo, hi = -0.38, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = math.sqrt(mid + 1) / ((mid + 2) * math.sqrt(mid + 3))
        lo, hi = (mid, hi) if s > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def reference_coefficients(
    steps: list[float], sigmas: list[float], out_step: float, out_sigma: float
) -> np.ndarray:
    """EDM2's Algorithm 3 re-derived: the Gram matrix of the profiles
    ``p(τ) = (γ+1)·τ^γ / t^(γ+1)`` on [0, t] by numerical quadrature, least squares, then
    normalised to sum to 1; snapshots after ``out_step`` get 0."""
    used = [i for i, s in enumerate(steps) if s <= out_step]
    profiles = [(steps[i], gamma(sigmas[i])) for i in used]

    def inner(a: tuple[float, float], b: tuple[float, float]) -> float:
        (ta, ga), (tb, gb) = a, b
        f = lambda x: (ga + 1) * x**ga / ta ** (ga + 1) * (gb + 1) * x**gb / tb ** (gb + 1)  # noqa: E731
        return integrate.quad(f, 0.0, min(ta, tb), epsabs=0, epsrel=1e-12, limit=200)[0]  # type: ignore[no-any-return]

    out = (out_step, gamma(out_sigma))
    gram = np.array([[inner(a, b) for b in profiles] for a in profiles])
    rhs = np.array([inner(a, out) for a in profiles])
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    full = np.zeros(len(steps))
    full[used] = x / x.sum()
    return full


def tree(shift: float = 0.0) -> dict[str, jax.Array]:
    return {"w": jnp.full((2, 3), 1.0 + shift), "b": jnp.zeros(3)}


def linen_run(directory: Path, steps: int = 24, every: int = 4) -> list[tuple[int, float, Any]]:
    """A Linen-style run: EmaTrainState with the recording EMA; a snapshot every 4 steps
    into ``directory``. Returns the same snapshots in memory."""
    params = {"dense": {"kernel": jnp.ones((4, 3), jnp.bfloat16), "bias": jnp.zeros(3)}}
    tx = ema_jax.ema(tuple(PF(sigma_rel=s) for s in posthoc.SIGMA_RELS), skip_nonfinite=False)
    state = ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1), ema=tx)
    grads = jax.tree.map(jnp.ones_like, params)
    apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    memory = []
    with posthoc.snapshot_manager(directory) as mngr:
        for i in range(1, steps + 1):
            state = apply(state, jax.tree.map(lambda g, i=i: g * math.sin(i), grads))
            if i % every == 0:
                posthoc.save_snapshot(mngr, i, state.ema_state)
                memory += [(i, s, state.accumulators(j)) for j, s in enumerate(posthoc.SIGMA_RELS)]
    return memory


def small_checkpoint(directory: Path) -> Path:
    """A training checkpoint (one step) in ``directory``: not a snapshot directory."""
    from ema_jax import checkpoint

    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=tree(), tx=optax.sgd(0.1), ema=ema_jax.ema(0.9)
    )
    with checkpoint.manager(directory, async_save=False) as mngr:
        checkpoint.save(mngr, 1, state)
    return directory
