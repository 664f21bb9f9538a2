"""Timing harness shared by every benchmark: cold caches, medians, paired ratios.

Every implementation is timed in the same process, one call of each per round
(round-robin), and the median over rounds is reported. Cold (the default): each call
starts with cold CPU caches, as an EMA update does in training (the forward and backward
passes run in between); warm: back to back, as in a loop of updates alone.
A ratio of two implementations is best taken *paired*: timed back to back in each round.

The helpers here also build the workloads' inputs: fp32 params in a given number of
leaves, donated jitted steps, and the two ``ema_jax`` settings every section compares.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

import ema_jax

DECAY = 0.999
ALPHA = 1.0 - DECAY

Timed = Callable[[], Any]
"""A zero-argument call whose time is measured; it blocks until its result is ready."""


class EmaTransform(Protocol):
    """What the benchmarks need of ``ema_jax.ema(...)``: an ``init`` / ``update`` pair."""

    def init(self, params: Any, /) -> Any: ...

    def update(self, params: Any, state: Any, /) -> Any: ...


# ----------------------------------------------------------------------------- caches


def largest_cache_bytes() -> int:
    """The size of CPU 0's largest cache (Linux sysfs), 0 where it cannot be read."""
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes)


def cache_flusher() -> Callable[[], None]:
    """A function that evicts the CPU caches: it rewrites a buffer twice the size of the
    largest cache (at least 64 MiB).

    Every timed call starts cold, as an EMA update does in training. Without it an update
    whose buffers fit in the cache is timed warm when few functions alternate (2 in a
    pair) and cold when many do (a round-robin of 9): at 1M params torch's
    ``_foreach_lerp_`` took 0.19 vs 0.36 ms.
    """
    scratch = np.zeros(max(64 << 20, 2 * largest_cache_bytes()) // 8)

    def flush() -> None:
        np.add(scratch, 1.0, out=scratch)

    return flush


# ----------------------------------------------------------------------------- timing


def _warm_up(fns: Iterable[Timed]) -> None:
    """Two calls of each: the first compiles, the second runs on warmed allocators."""
    for fn in fns:
        fn()
        fn()


def _seconds(fn: Timed, flush: Callable[[], None] | None) -> float:
    """One call of ``fn`` in seconds, after evicting the caches unless ``flush`` is None."""
    if flush is not None:
        flush()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(fns: dict[str, Timed], repeats: int, *, cold: bool = True) -> dict[str, float]:
    """Round-robin: one call of each function per round (cold caches unless ``cold`` is
    False), ``repeats`` rounds; the median ms of each."""
    flush = cache_flusher() if cold else None
    _warm_up(fns.values())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, flush))
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def quartiles(values: list[float]) -> dict[str, float]:
    """``{"ratio": median, "q1": 25th percentile, "q3": 75th percentile}``."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"ratio": float(med), "q1": float(q1), "q3": float(q3)}


def paired_ratios(
    base: Timed, others: dict[str, Timed], repeats: int, *, cold: bool = True
) -> dict[str, Any]:
    """``others[k]`` time / ``base`` time, the two timed back to back in each round (the
    order alternates; cold caches unless ``cold`` is False), over ``repeats`` rounds: per
    ``k`` the :func:`quartiles` of the ratios, and under ``"ms"`` the median ms of each
    (``"base"`` for ``base``).

    A ratio of neighbours cancels the slow drifts of a shared machine (other processes,
    clock changes) that make a ratio of two separate medians noisy by several percent.
    """
    flush = cache_flusher() if cold else None
    _warm_up((base, *others.values()))
    ratios: dict[str, list[float]] = {k: [] for k in others}
    times: dict[str, list[float]] = {"base": [], **{k: [] for k in others}}
    for r in range(repeats):
        for name, fn in others.items():
            pair = [("base", base), (name, fn)]
            spent = {key: _seconds(f, flush) for key, f in (pair[::-1] if r % 2 else pair)}
            ratios[name].append(spent[name] / spent["base"])
            times["base"].append(spent["base"])
            times[name].append(spent[name])
    out: dict[str, Any] = {name: quartiles(rs) for name, rs in ratios.items()}
    out["ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return out


# ----------------------------------------------------------------------------- workloads


class Donated:
    """Holds a state and calls ``state = fn(*args, state)`` (``state`` donated) per call."""

    def __init__(self, fn: Callable[..., Any], state: Any, *args: Any) -> None:
        self.fn = jax.jit(fn, donate_argnums=len(args))
        self.state = state
        self.args = args

    def __call__(self) -> None:
        self.state = self.fn(*self.args, self.state)
        jax.block_until_ready(self.state)


def leaf_shapes(n: int, leaves: int) -> list[tuple[int, ...]]:
    """``leaves`` leaves of ``n // leaves`` params, 2-D ``[rows, 100]`` like weight matrices."""
    size = n // leaves
    return [(size // 100, 100) if size % 100 == 0 else (size,) for _ in range(leaves)]


def host_params(n: int, leaves: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` fp32 params uniform in [-0.5, 0.5), in :func:`leaf_shapes`, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    return [rng.random(s, dtype=np.float32) - 0.5 for s in leaf_shapes(n, leaves)]


def device_params(n: int, leaves: int, seed: int = 0) -> list[jax.Array]:
    """:func:`host_params` on JAX's default device."""
    return [jnp.asarray(x) for x in host_params(n, leaves, seed)]


def flat(host: list[np.ndarray]) -> np.ndarray:
    """All leaves as one flat buffer (the references that have no leaf structure)."""
    return np.concatenate([x.ravel() for x in host])


def fresh_copy(tree: Any) -> Any:
    """A copy of every leaf, so a donated step never consumes the caller's arrays."""
    return jax.tree.map(lambda x: x + 0, tree)


def lerp(ema: Any, params: Any) -> Any:
    """``e + α(p - e)`` leaf by leaf: the EMA a user writes by hand."""
    return jax.tree.map(lambda e, p: e + ALPHA * (p - e), ema, params)


def flat_lerp(buffer: jax.Array) -> Donated:
    """One flat buffer ``e + α(p - e)``, donated: 12 B/param, the lower bound for XLA."""
    return Donated(lambda p, e: lerp(e, p), buffer + 0, buffer)


def hand_lerp(params: Any) -> Donated:
    """:func:`lerp` over the params' leaves, jitted, the average donated."""
    return Donated(lambda p, e: lerp(e, p), fresh_copy(params), params)


def cond_lerp(params: Any) -> Donated:
    """:func:`hand_lerp` skipped unless the sum of the leaves' sums is finite: the plain
    ``lax.cond(isfinite(Σ), lerp, identity)`` a user writes for a NaN guard (G3's floor)."""

    def step(p: Any, e: Any) -> Any:
        total = functools.reduce(jnp.add, [jnp.sum(x) for x in jax.tree.leaves(p)])
        return jax.lax.cond(jnp.isfinite(total), lambda e: lerp(e, p), lambda e: e, e)

    return Donated(step, fresh_copy(params), params)


def scale_in_place(buffer: jax.Array) -> Donated:
    """A donated in-place ``x * c`` over one flat buffer: 8 B/param (read + write)."""
    return Donated(lambda x: x * 1.0001, buffer + 0)


# ----------------------------------------------------------------------------- ema_jax


def ema_variants(prefix: str = "ema_jax") -> dict[str, Any]:
    """The two ``ema_jax.ema`` settings every section compares: the default (no NaN/Inf
    guard: the same work as torch's lerp) and ``" guard"`` (``skip_nonfinite=True``).

    Typed ``Any``: ``EmaTrainState.create`` wants the library's own transform type, which
    :class:`EmaTransform` only describes."""
    return {
        prefix: ema_jax.ema(DECAY),
        f"{prefix} guard": ema_jax.ema(DECAY, skip_nonfinite=True),
    }


def ema_state_after(tx: EmaTransform, params: Any, state: Any) -> Any:
    """The EMA state after one ``tx.update`` (which returns ``(shadow, state)``)."""
    return tx.update(params, state)[1]


def ema_update(tx: EmaTransform) -> Callable[[Any, Any], Any]:
    """``(params, state) -> state``: one update, in the shape :class:`Donated` calls."""

    def update(params: Any, state: Any) -> Any:
        return ema_state_after(tx, params, state)

    return update


def donated_ema_updates(params: Any) -> dict[str, Donated]:
    """One donated update per :func:`ema_variants` setting, over ``params``."""
    return {
        name: Donated(ema_update(tx), tx.init(params), params)
        for name, tx in ema_variants().items()
    }
