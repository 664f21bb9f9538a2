"""P1: one EMA update of fp32 params, per implementation, side by side; the fixed cost
per leaf; the measured effect of each implementation choice.

The implementations of one update (:func:`update_fns`):

* ``ema_jax``        ``ema_jax.ema(0.999, skip_nonfinite=True)`` jitted, state donated (guard on)
* ``ema_jax nochk``  the same with ``skip_nonfinite=False`` (the default)
* ``flat lerp``      one flat jax buffer ``e + α(p - e)``, donated (a lower bound for XLA)
* ``flat lerp+chk``  the same, skipped unless ``Σ p`` is finite (the guard's semantics on one
                     buffer: the floor for ``ema_jax`` with its guard)
* ``optax.ema``      ``optax.ema(0.999, debias=False)`` jitted without donation (the naive way)
* ``np copy``        ``np.copyto`` of the params (8 B/param): the machine's copy bandwidth
* ``torch foreach``  ``torch._foreach_lerp_`` over the same leaves (timm ModelEmaV3's kernel),
                     with torch's default threads and with 1 thread (``1T``); the faster counts.
                     ``+guard``: skipped unless ``Σ|θ|`` is finite (torch's analogue of the
                     NaN/Inf guard of ``skip_nonfinite=True``)

torch is optional (``pip install -e '.[bench]'``); without it its columns are empty.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax
from experiments.bench.harness import (
    ALPHA,
    DECAY,
    Donated,
    EmaTransform,
    Timed,
    device_params,
    donated_ema_updates,
    ema_update,
    flat,
    flat_lerp,
    fresh_copy,
    host_params,
    median_ms,
    paired_ratios,
)

# torch's OpenMP threads busy-wait by default and then starve XLA's (and vice versa) when
# the two alternate on few cores; passive waiting keeps the side-by-side timings honest.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # optional: the benchmark extra
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]  # (typed as a module where torch is installed)

TORCH_SETTINGS = ("torch foreach", "torch foreach 1T")
"""torch's two thread settings; P1 compares with the faster of the two."""

T = TypeVar("T")


def best_torch(ms: dict[str, float]) -> float | None:
    """The faster of torch's two thread settings (the stricter comparison for ema_jax),
    ``None`` without torch."""
    found = [ms[k] for k in TORCH_SETTINGS if k in ms]
    return min(found) if found else None


def _torch_fns(host: list[np.ndarray]) -> dict[str, Timed]:
    """torch's ``_foreach_lerp_`` over copies of ``host``: default threads, 1 thread, and
    guarded by a finite ``Σ|θ|`` (one read proves θ finite, as in ema_jax's fast path)."""
    t_params = [torch.from_numpy(x.copy()) for x in host]
    t_ema = [torch.from_numpy(x.copy()) for x in host]
    threads = torch.get_num_threads()

    def lerp(num_threads: int) -> Timed:
        def run() -> None:
            torch.set_num_threads(num_threads)
            torch._foreach_lerp_(t_ema, t_params, ALPHA)

        return run

    def guarded() -> None:
        torch.set_num_threads(threads)
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(t_params, 1))).all()):
            torch._foreach_lerp_(t_ema, t_params, ALPHA)

    return {
        "torch foreach": lerp(threads),
        "torch foreach 1T": lerp(1),
        "torch foreach+guard": guarded,
    }


def _optax_ema(params: list[jax.Array]) -> Timed:
    """``optax.ema`` jitted without donation: a fresh state buffer per update."""
    naive = optax.ema(DECAY, debias=False)
    update = jax.jit(naive.update)
    state = {"s": naive.init(params)}

    def run() -> None:
        out, state["s"] = update(params, state["s"])
        jax.block_until_ready((out, state["s"]))

    return run


def _flat_guarded(buffer: jax.Array) -> Donated:
    """:func:`flat_lerp` skipped unless ``Σ p`` is finite: the guard on one buffer."""

    def step(p: jax.Array, e: jax.Array) -> jax.Array:
        return jax.lax.cond(jnp.isfinite(jnp.sum(p)), lambda e: e + ALPHA * (p - e), lambda e: e, e)

    return Donated(step, buffer + 0, buffer)


def update_fns(n: int, leaves: int) -> dict[str, Timed]:
    """One EMA update of ``n`` fp32 params in ``leaves`` leaves, per implementation (the
    module docstring lists them)."""
    host = host_params(n, leaves)
    params = [jnp.asarray(x) for x in host]
    buffer = jnp.asarray(flat(host))
    src = flat(host)
    dst = np.empty_like(src)
    fns: dict[str, Timed] = {
        **donated_ema_updates(params),
        "flat lerp": flat_lerp(buffer),
        "flat lerp+chk": _flat_guarded(buffer),
        "optax.ema": _optax_ema(params),
        "np copy": lambda: np.copyto(dst, src),
    }
    if torch is not None:
        fns.update(_torch_fns(host))
    return fns


def torch_threads_kept(measure: Callable[[], T]) -> T:
    """``measure()``, with torch's thread count as it was before (the torch rows change it)."""
    threads = torch.get_num_threads() if torch is not None else None
    try:
        return measure()
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


def bench_update(n: int, leaves: int, repeats: int) -> dict[str, float]:
    """One EMA update of ``n`` fp32 params in ``leaves`` leaves: median ms per implementation."""
    fns = update_fns(n, leaves)
    return torch_threads_kept(lambda: median_ms(fns, repeats))


def _speeds(paired: dict[str, Any], names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Paired time ratios ema_jax / torch as speeds torch / ema_jax: the quartiles swap."""
    return {
        k: {"speed": 1 / paired[k]["ratio"], "q1": 1 / paired[k]["q3"], "q3": 1 / paired[k]["q1"]}
        for k in names
    }


def bench_p1(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """:func:`bench_update`'s medians (``ms``) and, with torch, ``paired``: ema_jax's speed
    relative to the faster torch setting, the two timed back to back in each round
    (:func:`~experiments.bench.harness.paired_ratios`): median and quartiles of torch time /
    ema_jax time, with and without the NaN/Inf check (``{}`` without torch). One set of
    buffers serves both."""
    fns = update_fns(n, leaves)
    names = ("ema_jax", "ema_jax nochk")

    def measure() -> dict[str, Any]:
        ms = median_ms(fns, repeats)
        if torch is None:
            return {"ms": ms, "paired": {}}
        torch_key = min(TORCH_SETTINGS, key=ms.__getitem__)
        paired = paired_ratios(fns[torch_key], {k: fns[k] for k in names}, repeats)
        return {
            "ms": ms,
            "paired": {"torch": torch_key, "rounds": repeats, **_speeds(paired, names)},
        }

    return torch_threads_kept(measure)


# ----------------------------------------------------------------------------- per-leaf cost


def bench_leaf_overhead(counts: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """The fixed cost per leaf: ``L`` one-element leaves, so no time goes to memory traffic.

    ``jit no-op``: a donated jitted call returning ``L`` new one-element arrays (``e + 0``):
    JAX's dispatch (per-argument and per-output bookkeeping) plus ``L`` tiny XLA kernels.
    ``torch foreach``: one ``_foreach_lerp_`` over ``L`` one-element tensors.
    """
    rows = []
    for count in counts:
        ones = [jnp.full((1,), 0.5, jnp.float32) for _ in range(count)]
        fns: dict[str, Timed] = {
            "jit no-op": Donated(lambda p, e: [x + 0 for x in e], fresh_copy(ones), ones),
            **donated_ema_updates(ones),
        }
        if torch is not None:
            t_p = [torch.full((1,), 0.5) for _ in range(count)]
            t_e = [torch.full((1,), 0.5) for _ in range(count)]

            def torch_foreach(t_e: list[Any] = t_e, t_p: list[Any] = t_p) -> None:
                torch._foreach_lerp_(t_e, t_p, ALPHA)

            fns["torch foreach"] = torch_foreach
        ms = median_ms(fns, repeats)
        rows.append(
            {"leaves": count, "ms": ms, "us_per_leaf": {k: 1e3 * v / count for k, v in ms.items()}}
        )
    return rows


# ----------------------------------------------------------------------------- choices


def _steps(step: Timed, k: int) -> Timed:
    """``k`` consecutive calls of ``step``, timed as one."""

    def run() -> None:
        for _ in range(k):
            step()

    return run


def _not_donated(tx: EmaTransform, params: list[jax.Array]) -> Timed:
    """One update jitted without donation: the accumulators are written to a new buffer."""
    update = jax.jit(ema_update(tx))
    state = {"s": tx.init(params)}

    def run() -> None:
        state["s"] = update(params, state["s"])
        jax.block_until_ready(state["s"])

    return run


def bench_choices(n: int, leaves: int, repeats: int) -> dict[str, float]:
    """The effect of each implementation choice that a setting exposes, as ms per
    optimizer step: the opt-in NaN/Inf guard, donation, and ``update_every=4``
    (a ``lax.cond`` skips the pass over memory on the three steps with no update due)."""
    params = device_params(n, leaves)

    def donated(tx: EmaTransform) -> Donated:
        return Donated(ema_update(tx), tx.init(params), params)

    every = 4
    default = ema_jax.ema(DECAY)
    fns: dict[str, Timed] = {
        "sum guard + cond": donated(ema_jax.ema(DECAY, skip_nonfinite=True)),
        "no guard": donated(default),
        "not donated": _not_donated(default, params),
        f"update_every={every}": _steps(donated(ema_jax.ema(DECAY, update_every=every)), every),
    }
    ms = median_ms(fns, repeats)
    ms[f"update_every={every}, per step"] = ms.pop(f"update_every={every}") / every
    return ms
