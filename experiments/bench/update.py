"""G1–G3: one EMA update of fp32 params, per implementation, side by side; the fixed cost
per leaf; the measured effect of each implementation choice.

The implementations of one update (:func:`update_fns`), all jitted:

* ``ema_jax``        ``ema_jax.ema(0.999)`` (the default: no NaN/Inf guard), state donated
* ``ema_jax guard``  the same with ``skip_nonfinite=True``
* ``hand lerp``      ``jax.tree.map(lambda e, p: e + α(p - e))`` over the same leaves, donated:
                     what a user writes instead
* ``cond lerp``      the hand lerp inside ``lax.cond(isfinite(Σ of the leaves' sums))``: the
                     plain guard, the floor for ``ema_jax guard`` (G3)
* ``flat lerp``      one flat buffer ``e + α(p - e)``, donated (a lower bound for XLA)
* ``optax.ema``      ``optax.ema(0.999, debias=False)``, not donated (as its docs use it)
* ``nnx.EMA``        flax's ``nnx.EMA(params, 0.999)``, its ``update`` under ``nnx.jit``
* ``np copy``        ``np.copyto`` of the params (8 B/param): the machine's copy bandwidth
* ``torch foreach``  ``torch._foreach_lerp_`` over the same leaves (timm ModelEmaV3's kernel),
                     with torch's default threads and with 1 thread (``1T``); the faster counts

torch is optional (``pip install -e '.[bench]'``); without it its columns are empty.
"""

from __future__ import annotations

import functools
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
    cond_lerp,
    device_params,
    donated_ema_updates,
    ema_update,
    flat,
    flat_lerp,
    fresh_copy,
    hand_lerp,
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
    """torch's ``_foreach_lerp_`` over copies of ``host``: default threads and 1 thread."""
    t_params = [torch.from_numpy(x.copy()) for x in host]
    t_ema = [torch.from_numpy(x.copy()) for x in host]
    threads = torch.get_num_threads()

    def lerp(num_threads: int) -> Timed:
        def run() -> None:
            torch.set_num_threads(num_threads)
            torch._foreach_lerp_(t_ema, t_params, ALPHA)

        return run

    return {"torch foreach": lerp(threads), "torch foreach 1T": lerp(1)}


def _optax_ema(params: list[jax.Array]) -> Timed:
    """``optax.ema`` jitted without donation: a fresh state buffer per update."""
    naive = optax.ema(DECAY, debias=False)
    update = jax.jit(naive.update)
    state = {"s": naive.init(params)}

    def run() -> None:
        out, state["s"] = update(params, state["s"])
        jax.block_until_ready((out, state["s"]))

    return run


def flax_nnx_ema(params: list[jax.Array]) -> Timed:
    """flax's ``nnx.EMA`` over ``params`` held as ``nnx.Param`` s, updated under ``nnx.jit``
    (its documented use)."""
    from flax import nnx

    model = nnx.List([nnx.Param(x) for x in params])
    averager = nnx.EMA(model, DECAY)
    update = nnx.jit(lambda e, m: e.update(m))

    def run() -> None:
        update(averager, model)
        jax.block_until_ready(nnx.state(averager))

    return run


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
        "hand lerp": hand_lerp(params),
        "cond lerp": cond_lerp(params),
        "flat lerp": flat_lerp(buffer),
        "optax.ema": _optax_ema(params),
        "nnx.EMA": flax_nnx_ema(params),
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


SPEED_PEERS = ("hand lerp", "optax.ema", "nnx.EMA")
"""The peers whose time over ema_jax's is measured paired (G1), with the faster torch."""


def _paired(fns: dict[str, Timed], torch_key: str | None, repeats: int, cold: bool) -> Any:
    """ema_jax's speed relative to each peer (peer time / ema_jax time, paired) and the
    guard's time over its floor (``ema_jax guard`` / ``cond lerp``, paired, G3)."""
    peers = [*SPEED_PEERS, *([torch_key] if torch_key else [])]
    speeds = paired_ratios(fns["ema_jax"], {k: fns[k] for k in peers}, repeats, cold=cold)
    guard = paired_ratios(
        fns["cond lerp"], {"ema_jax guard": fns["ema_jax guard"]}, repeats, cold=cold
    )
    out = {("torch" if k == torch_key else k): v for k, v in speeds.items() if k != "ms"}
    return {**out, "guard / floor": guard["ema_jax guard"]}


def bench_goal_row(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """One size of G1–G3: round-robin medians of every implementation, cold (``ms``) and
    warm (``warm_ms``), and the paired ratios that decide the goals (``paired``, cold and
    warm; :func:`_paired`): quartiles of peer time / ema_jax time, and of the guard's time
    over the plain ``cond lerp``. ``torch`` is the faster of torch's two settings, cold."""
    fns = update_fns(n, leaves)

    def measure() -> dict[str, Any]:
        ms = median_ms(fns, repeats)
        warm = median_ms(fns, repeats, cold=False)
        torch_key = min(TORCH_SETTINGS, key=ms.__getitem__) if torch is not None else None
        return {
            "params": n,
            "leaves": leaves,
            "repeats": repeats,
            "torch": torch_key,
            "ms": ms,
            "warm_ms": warm,
            "paired": {
                "cold": _paired(fns, torch_key, repeats, cold=True),
                "warm": _paired(fns, torch_key, repeats, cold=False),
            },
        }

    return torch_threads_kept(measure)


# ----------------------------------------------------------------------------- per-leaf cost


def _block_on(fn: Callable[[Any], Any], arg: Any) -> None:
    jax.block_until_ready(fn(arg))


def bench_leaf_overhead(counts: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """The fixed cost per leaf: ``L`` one-element leaves, so no time goes to memory traffic.

    ``jit no-op``: a donated jitted call returning its ``L`` one-element arrays (``e + 0``):
    JAX's dispatch, per-argument and per-output bookkeeping. Where that goes (G2):
    ``L in, 1 out``: the same call reading the ``L`` params and returning one scalar (the
    per-input cost alone); ``flat state``: a lerp of one donated ``[L]`` average towards
    the ``L`` params (what a state stored as one buffer would cost). ``torch foreach``: one
    ``_foreach_lerp_`` over ``L`` one-element tensors.
    """
    rows = []
    for count in counts:
        ones = [jnp.full((1,), 0.5, jnp.float32) for _ in range(count)]
        inputs_only = jax.jit(lambda p: functools.reduce(jnp.add, [x[0] for x in p]))
        fns: dict[str, Timed] = {
            "jit no-op": Donated(lambda p, e: [x + 0 for x in e], fresh_copy(ones), ones),
            "L in, 1 out": functools.partial(_block_on, inputs_only, ones),
            "flat state": Donated(
                lambda p, e: e + ALPHA * (jnp.concatenate(p) - e), jnp.zeros(count), ones
            ),
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
        "no guard (default)": donated(default),
        "guard: sum + cond": donated(ema_jax.ema(DECAY, skip_nonfinite=True)),
        "not donated": _not_donated(default, params),
        f"update_every={every}": _steps(donated(ema_jax.ema(DECAY, update_every=every)), every),
    }
    ms = median_ms(fns, repeats)
    ms[f"update_every={every}, per step"] = ms.pop(f"update_every={every}") / every
    return ms
