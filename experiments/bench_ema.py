"""Benchmark: the EMA update at memory-bandwidth speed (issue 5), measured side by side.

An EMA update is pure memory traffic: read the average, read the params, write the
average — 12 B per fp32 parameter. Every implementation below runs in the same process,
round-robin (one update of each, repeated, each starting with cold CPU caches as in a
training loop), and the median is reported:

* ``ema_jax``        ``ema_jax.ema(0.999)`` jitted, state donated (the default: NaN/Inf guard on)
* ``ema_jax nochk``  the same with ``skip_nonfinite=False``
* ``flat lerp``      one flat jax buffer ``e + α(p - e)``, donated (a lower bound for XLA)
* ``flat lerp+chk``  the same, skipped unless ``Σ p`` is finite (the guard's semantics on one
                     buffer: the floor for ``ema_jax`` with its default guard)
* ``optax.ema``      ``optax.ema(0.999, debias=False)`` jitted without donation (the naive way)
* ``np copy``        ``np.copyto`` of the params (8 B/param): the machine's copy bandwidth
* ``torch foreach``  ``torch._foreach_lerp_`` over the same leaves (timm ModelEmaV3's kernel),
                     with torch's default threads and with 1 thread (``1T``); the faster counts.
                     ``+guard``: skipped unless ``Σ|θ|`` is finite (torch's analogue of the
                     NaN/Inf guard that ema_jax runs by default)

and, on the same machine: P2 (a train step of the RUL model and an Adam step with and
without EMA), P3 (memory of params + Adam + EMA, donated), P4 (K decays in one update),
the measured effect of each implementation choice, and a few XLA_FLAGS.

    python -m experiments.bench_ema --quick            # smoke run, ~1 minute
    python -m experiments.bench_ema --bandwidth-only   # the device goal alone (on a GPU)
    python -m experiments.bench_ema --json experiments/results/bench_cpu.json \\
        --md experiments/results/bench_cpu.md          # the full table (several minutes)

torch is optional (``pip install -e '.[bench]'``); without it its column is empty.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import ema_jax
from experiments.models import MODELS, make_model

# torch's OpenMP threads busy-wait by default and then starve XLA's (and vice versa) when
# the two alternate on few cores; passive waiting keeps the side-by-side timings honest.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # optional: the benchmark extra
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]  # (typed as a module where torch is installed)

DECAY = 0.999
ALPHA = 1.0 - DECAY


# ----------------------------------------------------------------------------- timing


def _largest_cache_bytes() -> int:
    """The size of CPU 0's largest cache (Linux sysfs), 0 where it cannot be read."""
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes)


def _cache_flusher() -> Callable[[], None]:
    """A function that evicts the CPU caches: it rewrites a buffer twice the size of the
    largest cache (at least 64 MiB).

    Every timed call starts cold, as an EMA update does in training (the forward and
    backward passes run in between). Without it an update whose buffers fit in the cache
    is timed warm when few functions alternate (2 in a pair) and cold when many do (a
    round-robin of 9): at 1M params torch's ``_foreach_lerp_`` took 0.19 vs 0.36 ms.
    """
    scratch = np.zeros(max(64 << 20, 2 * _largest_cache_bytes()) // 8)

    def flush() -> None:
        np.add(scratch, 1.0, out=scratch)

    return flush


def _median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Round-robin: one call of each function per round, ``repeats`` rounds; median ms.
    Each timed call starts with cold caches (:func:`_cache_flusher`)."""
    flush = _cache_flusher()
    for fn in fns.values():  # compile and warm up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            flush()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _paired_ratios(
    base: Callable[[], Any], others: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, dict[str, float]]:
    """``others[k]`` time / ``base`` time, measured back to back in each round (the order
    alternates), over ``repeats`` rounds: median, quartiles, and the medians' ms.

    A ratio of neighbours cancels the slow drifts of a shared machine (other processes,
    clock changes) that make a ratio of two separate medians noisy by several percent.
    Each timed call starts with cold caches (:func:`_cache_flusher`).
    """
    flush = _cache_flusher()
    for fn in (base, *others.values()):  # compile and warm up
        fn()
        fn()
    ratios: dict[str, list[float]] = {k: [] for k in others}
    times: dict[str, list[float]] = {"base": [], **{k: [] for k in others}}
    for r in range(repeats):
        for name, fn in others.items():
            pair = [("base", base), (name, fn)]
            spent = {}
            for key, f in pair if r % 2 == 0 else pair[::-1]:
                flush()
                start = time.perf_counter()
                f()
                spent[key] = time.perf_counter() - start
            ratios[name].append(spent[name] / spent["base"])
            times["base"].append(spent["base"])
            times[name].append(spent[name])
    out = {}
    for name, rs in ratios.items():
        q1, med, q3 = np.percentile(rs, [25, 50, 75])
        out[name] = {"ratio": float(med), "q1": float(q1), "q3": float(q3)}
    out["ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return out


class _Donated:
    """Holds a state and calls ``state = fn(*args, state)`` (``state`` donated) per step."""

    def __init__(self, fn: Callable[..., Any], state: Any, *args: Any) -> None:
        self.fn = jax.jit(fn, donate_argnums=len(args))
        self.state = state
        self.args = args

    def __call__(self) -> None:
        self.state = self.fn(*self.args, self.state)
        jax.block_until_ready(self.state)


def _flat_lerp(flat: jax.Array) -> _Donated:
    """One flat buffer ``e + α(p - e)``, donated: 12 B/param, the lower bound for XLA."""
    return _Donated(lambda p, e: e + ALPHA * (p - e), flat + 0, flat)


def _scale_in_place(flat: jax.Array) -> _Donated:
    """A donated in-place ``x * c`` over one flat buffer: 8 B/param (read + write)."""
    return _Donated(lambda x: x * 1.0001, flat + 0)


def _leaf_shapes(n: int, leaves: int) -> list[tuple[int, ...]]:
    """``leaves`` leaves of ``n // leaves`` params, 2-D ``[rows, 100]`` like weight matrices."""
    size = n // leaves
    return [(size // 100, 100) if size % 100 == 0 else (size,) for _ in range(leaves)]


def _params(n: int, leaves: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(s, dtype=np.float32) - 0.5 for s in _leaf_shapes(n, leaves)]


# ----------------------------------------------------------------------------- P1


def _ema_update(tx: optax.GradientTransformation) -> Callable[[Any, Any], Any]:
    def update(params: Any, state: Any) -> Any:
        return tx.update(params, state)[1]

    return update


def _update_fns(n: int, leaves: int) -> dict[str, Callable[[], Any]]:
    """One EMA update of ``n`` fp32 params in ``leaves`` leaves, per implementation."""
    host = _params(n, leaves)
    params = [jnp.asarray(x) for x in host]
    fns: dict[str, Callable[[], Any]] = {}
    for name, tx in [
        ("ema_jax", ema_jax.ema(DECAY)),
        ("ema_jax nochk", ema_jax.ema(DECAY, skip_nonfinite=False)),
    ]:
        fns[name] = _Donated(_ema_update(tx), tx.init(params), params)

    flat_p = jnp.asarray(np.concatenate([x.ravel() for x in host]))
    fns["flat lerp"] = _flat_lerp(flat_p)

    def flat_guarded(p: jax.Array, e: jax.Array) -> jax.Array:
        return jax.lax.cond(jnp.isfinite(jnp.sum(p)), lambda e: e + ALPHA * (p - e), lambda e: e, e)

    fns["flat lerp+chk"] = _Donated(flat_guarded, flat_p + 0, flat_p)

    naive = optax.ema(DECAY, debias=False)
    naive_update = jax.jit(naive.update)
    naive_state = {"s": naive.init(params)}

    def optax_step() -> None:
        out, naive_state["s"] = naive_update(params, naive_state["s"])
        jax.block_until_ready((out, naive_state["s"]))

    fns["optax.ema"] = optax_step

    src = np.concatenate([x.ravel() for x in host])
    dst = np.empty_like(src)
    fns["np copy"] = lambda: np.copyto(dst, src)

    if torch is not None:
        t_params = [torch.from_numpy(x.copy()) for x in host]
        t_ema = [torch.from_numpy(x.copy()) for x in host]
        threads = torch.get_num_threads()

        def torch_foreach(num_threads: int) -> Callable[[], None]:
            def run() -> None:
                torch.set_num_threads(num_threads)
                torch._foreach_lerp_(t_ema, t_params, ALPHA)

            return run

        fns["torch foreach"] = torch_foreach(threads)
        fns["torch foreach 1T"] = torch_foreach(1)

        def torch_guarded() -> None:
            # The same guard as ema_jax's fast path: a finite Σ|x| (one read) proves θ finite.
            torch.set_num_threads(threads)
            if bool(torch.isfinite(torch.stack(torch._foreach_norm(t_params, 1))).all()):
                torch._foreach_lerp_(t_ema, t_params, ALPHA)

        fns["torch foreach+guard"] = torch_guarded
    return fns


def _torch_threads_kept(measure: Callable[[], Any]) -> Any:
    """``measure()``, with torch's thread count as it was before (the torch rows change it)."""
    threads = torch.get_num_threads() if torch is not None else None
    try:
        return measure()
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


def bench_update(n: int, leaves: int, repeats: int) -> dict[str, float]:
    """One EMA update of ``n`` fp32 params in ``leaves`` leaves: ms per implementation."""
    fns = _update_fns(n, leaves)
    return cast(dict[str, float], _torch_threads_kept(lambda: _median_ms(fns, repeats)))


def bench_p1(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """:func:`bench_update`'s medians (``ms``) and, with torch, ``paired``: ema_jax's speed
    relative to the faster torch setting, the two timed back to back in each round
    (:func:`_paired_ratios`): median and quartiles of torch time / ema_jax time, with and
    without the NaN/Inf check (``{}`` without torch). One set of buffers serves both."""
    fns = _update_fns(n, leaves)
    names = ("ema_jax", "ema_jax nochk")

    def measure() -> dict[str, Any]:
        ms = _median_ms(fns, repeats)
        if torch is None:
            return {"ms": ms, "paired": {}}
        torch_key = min(("torch foreach", "torch foreach 1T"), key=ms.__getitem__)
        paired = _paired_ratios(fns[torch_key], {k: fns[k] for k in names}, repeats)
        # time ratios ema_jax / torch → speeds torch / ema_jax: the quartiles swap.
        speeds = {
            k: {
                "speed": 1 / paired[k]["ratio"],
                "q1": 1 / paired[k]["q3"],
                "q3": 1 / paired[k]["q1"],
            }
            for k in names
        }
        return {"ms": ms, "paired": {"torch": torch_key, "rounds": repeats, **speeds}}

    return cast(dict[str, Any], _torch_threads_kept(measure))


# ----------------------------------------------------------------------------- P2


def bench_train_step(model_name: str, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """The RUL experiment's jitted, donated train step (model, Adam, dropout rng) without
    an EMA (flax ``TrainState``, the same step code) vs with ``ema_jax.ema`` (with and
    without the NaN/Inf check): ratios of back-to-back blocks of ``steps`` steps."""
    model = make_model(model_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 30, 14)).astype(np.float32))
    y = jnp.asarray(rng.random(batch).astype(np.float32))
    params = model.init(jax.random.key(0), x[:1])["params"]
    key = jax.random.key(1)

    def loss_fn(p: Any, b: tuple[jax.Array, jax.Array], rng: jax.Array) -> jax.Array:
        pred = cast(jax.Array, model.apply({"params": p}, b[0], train=True, rngs={"dropout": rng}))
        return jnp.mean((pred - b[1]) ** 2)

    def plain_step(s: train_state.TrainState, b: Any, rng: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(s.params, b, jax.random.fold_in(rng, s.step))
        return s.apply_gradients(grads=grads), {"loss": loss}

    def copy() -> Any:
        return jax.tree.map(jnp.copy, params)

    runs: dict[str, tuple[Callable[..., Any], Any]] = {
        "without EMA": (
            jax.jit(plain_step, donate_argnums=0),
            train_state.TrainState.create(apply_fn=model.apply, params=copy(), tx=optax.adam(1e-3)),
        )
    }
    for name, tx in (
        ("with EMA", ema_jax.ema(DECAY)),
        ("with EMA nochk", ema_jax.ema(DECAY, skip_nonfinite=False)),
    ):
        runs[name] = (
            ema_jax.make_train_step(loss_fn),
            ema_jax.EmaTrainState.create(
                apply_fn=model.apply, params=copy(), tx=optax.adam(1e-3), ema=tx
            ),
        )
    states = {k: s for k, (_, s) in runs.items()}

    def block(name: str) -> Callable[[], None]:
        step = runs[name][0]

        def run() -> None:
            for _ in range(steps):
                states[name], metrics = step(states[name], (x, y), key)
            jax.block_until_ready((states[name], metrics))

        return run

    paired = _paired_ratios(
        block("without EMA"), {k: block(k) for k in runs if k != "without EMA"}, repeats
    )
    ms = paired.pop("ms")
    return {
        "model": model_name,
        "params": sum(int(np.size(p)) for p in jax.tree.leaves(params)),
        "leaves": len(jax.tree.leaves(params)),
        "batch": batch,
        "steps_per_block": steps,
        "rounds": repeats,
        "ms_per_step": {
            "without EMA": ms["base"] / steps,
            **{k: v / steps for k, v in ms.items() if k != "base"},
        },
        "ratios": paired,
        "ratio": paired["with EMA"]["ratio"],
    }


def _adam_apply(
    adam: optax.GradientTransformation, grads: Any, state: tuple[Any, Any]
) -> tuple[Any, Any]:
    params, opt_state = state
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def bench_adam_step(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """Adam step (grads given) on ``n`` params with vs without EMA, and the 8 B/param cost.

    The cost of 8 B/param is measured as a donated in-place ``x * c`` over ``n`` params
    (read 4 B + write 4 B): the bandwidth XLA reaches on this machine.
    """
    host = _params(n, leaves)
    params = [jnp.asarray(x) for x in host]
    grads = [jnp.asarray(x * 1e-3) for x in _params(n, leaves, seed=1)]
    adam = optax.adam(1e-4)

    def with_ema(tx: optax.GradientTransformation) -> Callable[..., Any]:
        def step(g: Any, state: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
            params, opt_state = _adam_apply(adam, g, state[:2])
            return params, opt_state, tx.update(params, state[2])[1]

        return step

    def fresh() -> list[jax.Array]:
        return [p + 0 for p in params]

    fns: dict[str, Callable[[], Any]] = {
        "adam": _Donated(lambda g, s: _adam_apply(adam, g, s), (fresh(), adam.init(params)), grads)
    }
    for name, tx in [
        ("adam+ema_jax", ema_jax.ema(DECAY)),
        ("adam+ema_jax nochk", ema_jax.ema(DECAY, skip_nonfinite=False)),
    ]:
        fns[name] = _Donated(with_ema(tx), (fresh(), adam.init(params), tx.init(params)), grads)

    def with_lerp(branch: bool) -> Callable[..., Any]:
        """References: a bare per-leaf lerp after Adam (the least an unfused EMA costs on
        XLA), and the same inside a ``lax.cond`` (ema_jax's shape when steps can be skipped)."""

        def step(g: Any, state: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
            params, opt_state = _adam_apply(adam, g, state[:2])

            def lerp(ema: Any) -> Any:
                return [e + ALPHA * (p - e) for e, p in zip(ema, params, strict=True)]

            if not branch:
                return params, opt_state, lerp(state[2])
            count = cast(Any, opt_state)[0].count  # a traced predicate, always true
            return params, opt_state, jax.lax.cond(count > 0, lerp, lambda e: e, state[2])

        return step

    fns["adam+lerp"] = _Donated(with_lerp(False), (fresh(), adam.init(params), fresh()), grads)
    fns["adam+lerp in cond"] = _Donated(
        with_lerp(True), (fresh(), adam.init(params), fresh()), grads
    )
    flat = jnp.asarray(np.concatenate([x.ravel() for x in host]))
    fns["scale 8B/param"] = _scale_in_place(flat)
    ms = _median_ms(fns, repeats)
    cost8 = ms["scale 8B/param"]
    extra = {k: v - ms["adam"] for k, v in ms.items() if k.startswith("adam+")}
    # The same extras from Adam steps with and without EMA timed back to back.
    steps_with_ema = ("adam+ema_jax", "adam+ema_jax nochk", "adam+lerp")
    paired = _paired_ratios(fns["adam"], {k: fns[k] for k in steps_with_ema}, repeats)
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


# ----------------------------------------------------------------------------- device goal


def bench_bandwidth(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """The update's share of the copy bandwidth on JAX's default backend (the GPU goal).

    References over one flat buffer of ``n`` params, 8 B/param each: ``copy`` (a jitted
    ``jnp.copy`` into a fresh buffer) and ``scale in place`` (donated ``x * c``); the faster
    is the copy bandwidth. The updates are counted at 12 B/param (read the average and the
    params, write the average): the check's extra read is not useful traffic.

    ``sum`` (4 B/param, read only) is what the NaN/Inf check costs on its own, so
    ``checked_ceiling`` = flat lerp ms / (flat lerp ms + sum ms), times the flat lerp's share,
    is the most a checked update can reach on this backend: the two passes at the speeds
    this machine gives each.
    """
    host = _params(n, leaves)
    params = [jnp.asarray(x) for x in host]
    flat = jnp.asarray(np.concatenate([x.ravel() for x in host]))
    copy = jax.jit(jnp.copy)

    total = jax.jit(jnp.sum)

    def fresh_copy() -> None:
        jax.block_until_ready(copy(flat))

    def read_sum() -> None:
        jax.block_until_ready(total(flat))

    fns: dict[str, Callable[[], Any]] = {
        "copy": fresh_copy,
        "scale in place": _scale_in_place(flat),
        "sum": read_sum,
        "flat lerp": _flat_lerp(flat),
    }
    for name, tx in [
        ("ema_jax", ema_jax.ema(DECAY)),
        ("ema_jax nochk", ema_jax.ema(DECAY, skip_nonfinite=False)),
    ]:
        fns[name] = _Donated(_ema_update(tx), tx.init(params), params)
    ms = _median_ms(fns, repeats)
    moved = {"copy": 8, "scale in place": 8, "sum": 4}
    gbps = {k: moved.get(k, 12) * n / (v * 1e-3) / 1e9 for k, v in ms.items()}
    reference = max(gbps["copy"], gbps["scale in place"])
    lerp_share = gbps["flat lerp"] / reference
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "params": n,
        "leaves": leaves,
        "ms": ms,
        "GBps": gbps,
        "share_of_copy": {
            k: gbps[k] / reference for k in ("flat lerp", "ema_jax", "ema_jax nochk")
        },
        "checked_ceiling": lerp_share * ms["flat lerp"] / (ms["flat lerp"] + ms["sum"]),
    }


# ----------------------------------------------------------------------------- P3


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def bench_memory(n: int, leaves: int, steps: int = 3) -> dict[str, Any]:
    """Bytes held by params + Adam state (+ EMA), donated, after ``steps`` steps.

    Two figures: ``jax.live_arrays()`` bytes (what the process holds between steps) and the
    compiled step's ``memory_analysis()``: ``temp`` (scratch during the step) and the bytes
    of outputs that do not reuse a donated input (a transient second copy would show here).
    """
    params = [jnp.asarray(x) for x in _params(n, leaves)]
    grads = [jnp.zeros_like(p) for p in params]
    adam = optax.adam(1e-4)
    tx = ema_jax.ema(DECAY)
    param_bytes = sum(p.nbytes for p in params)

    def plain(g: Any, s: Any) -> Any:
        return _adam_apply(adam, g, s)

    def with_ema(g: Any, s: Any) -> Any:
        p, o = _adam_apply(adam, g, s[:2])
        return p, o, tx.update(p, s[2])[1]

    out: dict[str, Any] = {"params": n, "leaves": leaves, "param_bytes": param_bytes}
    for name, fn, make in [
        ("without EMA", plain, lambda p: (p, adam.init(p))),
        ("with EMA", with_ema, lambda p: (p, adam.init(p), tx.init(p))),
    ]:
        base = _live_bytes()
        state = make([p + 0 for p in params])
        step = jax.jit(fn, donate_argnums=1)
        analysis = step.lower(grads, state).compile().memory_analysis()
        if analysis is None:  # a backend without XLA's memory analysis
            raise RuntimeError(f"{jax.default_backend()} gives no memory analysis for P3")
        for _ in range(steps):
            state = step(grads, state)
        jax.block_until_ready(state)
        live = _live_bytes() - base
        out[name] = {
            "live_bytes": live,
            "live_copies": live / param_bytes,
            "temp_bytes": int(analysis.temp_size_in_bytes),
            "unaliased_output_bytes": int(
                analysis.output_size_in_bytes - analysis.alias_size_in_bytes
            ),
        }
        del state, step
    out["extra_bytes"] = out["with EMA"]["live_bytes"] - out["without EMA"]["live_bytes"]
    out["extra_copies"] = out["extra_bytes"] / param_bytes
    return out


# ----------------------------------------------------------------------------- P4


def bench_multi_decay(
    n: int, leaves: int, repeats: int, k: int = 3, skip_nonfinite: bool = True
) -> dict[str, Any]:
    """``ema(decay=(β_1..β_K))`` vs K separate single-decay updates (target (1+2K)/(3K)).

    Also the layout ema_jax used before: K trees of accumulators updated in one jitted
    function (``K trees, one jit``; XLA:CPU then runs K loops, each reading the params), vs
    the K averages side by side in one ``[..., K]`` array per leaf (one loop per leaf).
    """
    params = [jnp.asarray(x) for x in _params(n, leaves)]
    decays = (0.99, 0.999, 0.9999, 0.99999)[:k]
    fns: dict[str, Callable[[], Any]] = {}
    multi = ema_jax.ema(decays, skip_nonfinite=skip_nonfinite)
    fns["K decays, one update"] = _Donated(_ema_update(multi), multi.init(params), params)
    alphas = [1.0 - d for d in decays]

    def k_trees(p: list[jax.Array], trees: list[list[jax.Array]]) -> list[list[jax.Array]]:
        return [
            [e + a * (x - e) for e, x in zip(t, p, strict=True)]
            for a, t in zip(alphas, trees, strict=True)
        ]

    fns["K trees, one jit"] = _Donated(k_trees, [[x + 0 for x in params] for _ in decays], params)
    singles = [ema_jax.ema(d, skip_nonfinite=skip_nonfinite) for d in decays]
    separate = [_Donated(_ema_update(tx), tx.init(params), params) for tx in singles]

    def run_separate() -> None:
        for step in separate:
            step()

    fns["K separate updates"] = run_separate
    ms = _median_ms(fns, repeats)
    ratio = ms["K decays, one update"] / ms["K separate updates"]
    return {
        "K": k,
        "params": n,
        "leaves": leaves,
        "skip_nonfinite": skip_nonfinite,
        "ms": ms,
        "ratio": ratio,
        "target": (1 + 2 * k) / (3 * k),
    }


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
        fns: dict[str, Callable[[], Any]] = {
            "jit no-op": _Donated(lambda p, e: [x + 0 for x in e], [x + 0 for x in ones], ones)
        }
        for name, tx in [
            ("ema_jax", ema_jax.ema(DECAY)),
            ("ema_jax nochk", ema_jax.ema(DECAY, skip_nonfinite=False)),
        ]:
            fns[name] = _Donated(_ema_update(tx), tx.init(ones), ones)
        if torch is not None:
            t_p = [torch.full((1,), 0.5) for _ in range(count)]
            t_e = [torch.full((1,), 0.5) for _ in range(count)]

            def torch_foreach(t_e: list[Any] = t_e, t_p: list[Any] = t_p) -> None:
                torch._foreach_lerp_(t_e, t_p, ALPHA)

            fns["torch foreach"] = torch_foreach
        ms = _median_ms(fns, repeats)
        rows.append(
            {"leaves": count, "ms": ms, "us_per_leaf": {k: 1e3 * v / count for k, v in ms.items()}}
        )
    return rows


# ----------------------------------------------------------------------------- choices


def bench_choices(n: int, leaves: int, repeats: int) -> dict[str, float]:
    """The effect of each implementation choice, as ms per optimizer step.

    ``v0`` re-implements the first version's hot path for comparison: the NaN/Inf guard as
    ``all(isfinite(x))`` per leaf and the skip as ``where(apply, lerp, ema)`` (a full pass
    over memory even on steps that do not update).
    """
    params = [jnp.asarray(x) for x in _params(n, leaves)]

    def v0(update_every: int) -> Callable[[Any, Any], Any]:
        def update(p: Any, state: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
            count, ema = state
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in p]))
            apply = finite & ((count + 1) % update_every == 0)
            new = [jnp.where(apply, e + ALPHA * (x - e), e) for e, x in zip(ema, p, strict=True)]
            return count + 1, new

        return update

    def per_step(step: Callable[[], None], k: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(k):
                step()

        return run

    fns: dict[str, Callable[[], Any]] = {}
    fresh = lambda: (jnp.zeros([], jnp.int32), [p + 0 for p in params])  # noqa: E731
    fns["v0: isfinite guard + select"] = _Donated(v0(1), fresh(), params)
    tx = ema_jax.ema(DECAY)
    fns["now: sum guard + cond"] = _Donated(_ema_update(tx), tx.init(params), params)
    nochk = ema_jax.ema(DECAY, skip_nonfinite=False)
    fns["no guard"] = _Donated(_ema_update(nochk), nochk.init(params), params)
    every = ema_jax.ema(DECAY, update_every=4)
    fns["update_every=4, v0 select (4 steps)"] = per_step(_Donated(v0(4), fresh(), params), 4)
    fns["update_every=4, now cond (4 steps)"] = per_step(
        _Donated(_ema_update(every), every.init(params), params), 4
    )
    undonated = jax.jit(_ema_update(tx))
    state = {"s": tx.init(params)}

    def not_donated() -> None:
        state["s"] = undonated(params, state["s"])
        jax.block_until_ready(state["s"])

    fns["now, not donated"] = not_donated
    ms = _median_ms(fns, repeats)
    for key in list(ms):
        if "(4 steps)" in key:
            ms[key.replace("(4 steps)", "per step")] = ms.pop(key) / 4
    return ms


# ----------------------------------------------------------------------------- XLA flags


def bench_flags(n: int, leaves: int, repeats: int, flag_sets: list[str]) -> list[dict[str, Any]]:
    """The update (P1) and the Adam step (P2) under other XLA_FLAGS, each in a fresh process."""
    rows = []
    for flags in flag_sets:
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        code = (
            "import json, experiments.bench_ema as b; "
            f"print(json.dumps({{'update': b.bench_update({n}, {leaves}, {repeats}), "
            f"'adam': b.bench_adam_step({n}, {leaves}, {repeats})}}))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            rows.append({"flags": flags, "error": proc.stderr.strip().splitlines()[-1]})
            continue
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"flags": flags or "(default)", "ms": measured["update"], **measured})
    return rows


# ----------------------------------------------------------------------------- report


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _best_torch(ms: dict[str, float]) -> float | None:
    """The faster of torch's two thread settings (the stricter comparison for ema_jax)."""
    found = [ms[k] for k in ("torch foreach", "torch foreach 1T") if k in ms]
    return min(found) if found else None


def _p1_table(rows: list[dict[str, Any]]) -> list[str]:
    cols = [
        "ema_jax",
        "ema_jax nochk",
        "flat lerp",
        "flat lerp+chk",
        "optax.ema",
        "np copy",
        "torch foreach",
        "torch foreach 1T",
        "torch foreach+guard",
    ]
    lines = [
        "| params | leaves | " + " | ".join(f"{c} ms" for c in cols) + " | ema_jax GB/s "
        "| ema_jax speed vs torch | nochk speed vs torch | ema_jax speed vs optax.ema |",
        "|" + "---|" * (len(cols) + 6),
    ]
    for r in rows:
        ms = r["ms"]
        torch_ms = _best_torch(ms)
        gbps = 12 * r["params"] / (ms["ema_jax"] * 1e-3) / 1e9
        cells = [_fmt(ms.get(c)) for c in cols]
        lines.append(
            f"| {r['params']:.0e} | {r['leaves']} | "
            + " | ".join(cells)
            + f" | {gbps:.1f} | {_fmt(torch_ms and torch_ms / ms['ema_jax'])}"
            f" | {_fmt(torch_ms and torch_ms / ms['ema_jax nochk'])}"
            f" | {_fmt(ms['optax.ema'] / ms['ema_jax'])} |"
        )
    return lines


def report(results: dict[str, Any]) -> str:
    out = [f"## EMA benchmark ({results['machine']})", "", f"load before: {results['load']}", ""]
    if results["p1"]:
        out.append(
            "### P1: one update, fp32, ms (median); speed = other ms / ema_jax ms (torch: the "
            "faster of its two thread settings); > 1: ema_jax is faster"
        )
        out += _p1_table(results["p1"])
    summary = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for r in results["p1"]:
        t = _best_torch(r["ms"])
        if t is not None:
            ratio = t / r["ms"]["ema_jax"]
            nochk = t / r["ms"]["ema_jax nochk"]
            guarded = r["ms"]["torch foreach+guard"] / r["ms"]["ema_jax"]
            floor = t / r["ms"]["flat lerp+chk"]
            paired = r.get("paired") or {}
            detail = ""
            if paired:  # the better estimate: the measured column then gives its median
                a, b = paired["ema_jax"], paired["ema_jax nochk"]
                detail = (
                    f"; paired with `{paired['torch']}` over {paired['rounds']} rounds: "
                    f"{a['speed']:.2f}× ({a['q1']:.2f}–{a['q3']:.2f}), skip_nonfinite=False "
                    f"{b['speed']:.2f}× ({b['q1']:.2f}–{b['q3']:.2f})"
                )
                ratio = a["speed"]
            summary.append(
                f"| P1 throughput ema_jax / torch foreach, {r['params']:.0e} params, "
                f"{r['leaves']} leaves (ratio of medians {t / r['ms']['ema_jax']:.2f}×, "
                f"skip_nonfinite=False {nochk:.2f}×; both guarded: {guarded:.2f}×; one guarded "
                f"flat buffer vs torch: {floor:.2f}×{detail}) "
                f"| {ratio:.2f}× | ≥ 1.0× | {'yes' if ratio >= 1 else 'no'} |"
            )
    if "p2_model" in results:
        p = results["p2_model"]
        for k, r in p["ratios"].items():
            summary.append(
                f"| P2 train step {k} / without ({p['model']}, {p['params']} params in "
                f"{p['leaves']} leaves, batch {p['batch']}: {p['ms_per_step']['without EMA']:.3f}"
                f" vs {p['ms_per_step'][k]:.3f} ms/step; median of {p['rounds']} paired blocks "
                f"of {p['steps_per_block']} steps, quartiles {r['q1']:.3f}–{r['q3']:.3f}) "
                f"| {r['ratio']:.3f} | ≤ 1.03 | {'yes' if r['ratio'] <= 1.03 else 'no'} |"
            )
    if "p2_adam" in results:
        p = results["p2_adam"]
        refs = p["extra_bytes_per_param"]
        paired = p["paired_extra_bytes_per_param"]
        lerp = paired["adam+lerp"]
        for k in ("adam+ema_jax", "adam+ema_jax nochk"):
            b = paired[k]["ratio"]  # the better estimate; the ratio of medians is below
            summary.append(
                f"| P2 {k} − adam, {p['params']:.0e} params, at {p['bandwidth_GBps']:.1f} GB/s:"
                f" extra {b:.1f} B/param paired back to back (quartiles {paired[k]['q1']:.1f}–"
                f"{paired[k]['q3']:.1f}; difference of medians {p['extra_ms'][k]:.2f} ms = "
                f"{refs[k]:.1f} B/param; references: a bare lerp after Adam {lerp['ratio']:.1f} "
                f"paired, {refs['adam+lerp']:.1f} of medians, the same in a cond "
                f"{refs['adam+lerp in cond']:.1f}) "
                f"| {b:.1f} B/param | ≤ 8 B/param | {'yes' if b <= 8 else 'no'} |"
            )
    if "p3" in results:
        p = results["p3"]
        w, wo = p["with EMA"], p["without EMA"]
        summary.append(
            f"| P3 live bytes with − without EMA, {p['params']:.0e} params (params+Adam: "
            f"{wo['live_copies']:.3f} copies; +EMA: {w['live_copies']:.3f}; step temp "
            f"{wo['temp_bytes']}/{w['temp_bytes']} B, unaliased outputs "
            f"{wo['unaliased_output_bytes']}/{w['unaliased_output_bytes']} B) "
            f"| {p['extra_copies']:.4f} copies | 1 copy | "
            f"{'yes' if abs(p['extra_copies'] - 1) < 1e-3 else 'no'} |"
        )
    for p in results.get("p4", []):
        summary.append(
            f"| P4 K={p['K']} decays / K separate updates, {p['params']:.0e} params, "
            f"{p['leaves']} leaves, skip_nonfinite={p['skip_nonfinite']} "
            f"({p['ms']['K decays, one update']:.2f} / {p['ms']['K separate updates']:.2f} ms; "
            f"the former K-trees layout: {p['ms']['K trees, one jit']:.2f} ms) "
            f"| {p['ratio']:.3f} | ≤ {p['target']:.3f} "
            f"| {'yes' if p['ratio'] <= p['target'] else 'no'} |"
        )
    bandwidth = results.get("bandwidth", [])
    for b in bandwidth:
        shares = b["share_of_copy"]
        share = shares["ema_jax"]
        on_gpu = b["backend"] == "gpu"
        summary.append(
            f"| device goal: ema_jax update GB/s (12 B/param) / copy GB/s, {b['params']:.0e} "
            f"params, {b['leaves']} leaves, {b['backend']} {b['device']} (nochk "
            f"{shares['ema_jax nochk']:.2f}; flat lerp {shares['flat lerp']:.2f}; a checked "
            f"update's ceiling here, flat lerp + sum: {b['checked_ceiling']:.2f})"
            f"{'' if on_gpu else ' — the goal is for a GPU; informative here'} "
            f"| {share:.2f} | ≥ 0.80 | {('yes' if share >= 0.8 else 'no') if on_gpu else 'n/a'} |"
        )
    out += ["", "### Goals", *summary]
    if bandwidth:
        names = list(bandwidth[0]["GBps"])
        out += [
            "",
            f"### Bandwidth on {bandwidth[0]['backend']} ({bandwidth[0]['device']}): GB/s "
            "(copy, scale: 8 B/param; sum: 4 B/param, read only; updates: 12 B/param)",
            "| params | leaves | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        out += [
            f"| {b['params']:.0e} | {b['leaves']} | "
            + " | ".join(f"{b['GBps'][k]:.1f}" for k in names)
            + " |"
            for b in bandwidth
        ]
    if results.get("leaf_overhead"):
        rows = results["leaf_overhead"]
        names = list(rows[0]["ms"])
        out += [
            "",
            "### Fixed cost per leaf (one-element leaves: no memory traffic), µs per leaf: "
            "time / leaves; `a→b`: the cost of each leaf added from a to b leaves (the "
            "per-call cost cancels)",
            "| leaves | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        out += [
            f"| {r['leaves']} | " + " | ".join(f"{r['us_per_leaf'][k]:.2f}" for k in names) + " |"
            for r in rows
        ]
        out += [
            f"| {a['leaves']}→{b['leaves']} | "
            + " | ".join(
                f"{1e3 * (b['ms'][k] - a['ms'][k]) / (b['leaves'] - a['leaves']):.2f}"
                for k in names
            )
            + " |"
            for a, b in itertools.pairwise(rows)
        ]
    if results.get("choices"):
        c = results["choices"]
        out += ["", f"### Choices ({c['params']:.0e} params, {c['leaves']} leaves): ms per step"]
        out += ["| variant | ms |", "|---|---|"]
        out += [f"| {k} | {v:.2f} |" for k, v in c["ms"].items()]
    if results.get("flags"):
        out += [
            "",
            "### XLA flags (fresh process each, at the P2 Adam size): update ms (P1), "
            "Adam step ms and the EMA's extra B/param in it (P2)",
            "| XLA_FLAGS | ema_jax | ema_jax nochk | flat lerp | torch foreach (best) "
            "| adam | adam+ema_jax | extra B/param | nochk extra B/param |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["flags"]:
            if "error" in r:
                out.append(f"| {r['flags']} | error: {r['error']} | | | | | | | |")
                continue
            ms, adam = r["ms"], r.get("adam")
            adam_cells = (
                f"{adam['ms']['adam']:.2f} | {adam['ms']['adam+ema_jax']:.2f} "
                f"| {adam['extra_bytes_per_param']['adam+ema_jax']:.1f} "
                f"| {adam['extra_bytes_per_param']['adam+ema_jax nochk']:.1f}"
                if adam
                else "— | — | — | —"
            )
            out.append(
                f"| {r['flags']} | {_fmt(ms['ema_jax'])} | {_fmt(ms['ema_jax nochk'])} "
                f"| {_fmt(ms['flat lerp'])} | {_fmt(_best_torch(ms))} | {adam_cells} |"
            )
    out += ["", f"load after: {results['load_after']}", ""]
    return "\n".join(out)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:  # pragma: no cover
        return "n/a"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument("--md", metavar="PATH", help="write the printed tables as Markdown")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per measurement")
    parser.add_argument("--no-flags", action="store_true", help="skip the XLA_FLAGS section")
    parser.add_argument(
        "--bandwidth-only",
        action="store_true",
        help="only the device goal (update vs copy bandwidth) on JAX's default backend: "
        "the section to run on a GPU",
    )
    parser.add_argument(
        "--p2-model",
        default="dcnn_li",
        choices=sorted(MODELS),
        help="RUL model of the P2 train step (default dcnn_li, the one the FD001 results use)",
    )
    parser.add_argument(
        "--p2-batch", type=int, default=512, help="batch of the P2 train step (default 512)"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.p2_batch < 1:
        parser.error("--p2-batch must be >= 1")

    if args.quick:
        sizes = [(1_000_000, 10), (1_000_000, 100)]
        repeats = args.repeats or 5
        adam_size, flag_size = (1_000_000, 100), (1_000_000, 100)
    else:
        sizes = [(n, k) for n in (1_000_000, 10_000_000, 100_000_000) for k in (10, 100, 1000)]
        repeats = args.repeats or 30
        adam_size, flag_size = (10_000_000, 100), (10_000_000, 100)

    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, torch {torch.__version__ if torch else 'not installed'}",
        "load": _load(),
        "repeats": repeats,
        "p1": [],
    }
    bandwidth_sizes = [(1_000_000, 10)] if args.quick else [(10_000_000, 100), (100_000_000, 100)]
    results["bandwidth"] = [bench_bandwidth(n, k, repeats) for n, k in bandwidth_sizes]
    if not args.bandwidth_only:
        _measure_goals(results, args, sizes, repeats, adam_size, flag_size)
    results["load_after"] = _load()
    text = report(results)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _measure_goals(
    results: dict[str, Any],
    args: argparse.Namespace,
    sizes: list[tuple[int, int]],
    repeats: int,
    adam_size: tuple[int, int],
    flag_size: tuple[int, int],
) -> None:
    """P1–P4, the per-leaf cost, the choices and the flags, into ``results``."""
    for n, k in sizes:
        reps = max(3, repeats // 3) if n >= 100_000_000 else repeats
        row = {"params": n, "leaves": k, "repeats": reps, **bench_p1(n, k, reps)}
        ms = row["ms"]
        results["p1"].append(row)
        print(
            f"P1 {n:.0e} params / {k} leaves: " + ", ".join(f"{a} {b:.2f}" for a, b in ms.items()),
            flush=True,
        )
    results["p2_model"] = bench_train_step(
        args.p2_model, args.p2_batch, steps=20, repeats=4 if args.quick else 41
    )
    print("P2 model:", results["p2_model"], flush=True)
    results["p2_adam"] = bench_adam_step(*adam_size, repeats=repeats)
    print("P2 adam:", results["p2_adam"], flush=True)
    results["p3"] = bench_memory(*adam_size)
    results["p4"] = [
        bench_multi_decay(n, k, repeats, skip_nonfinite=chk)
        for n, k in [adam_size, (adam_size[0], 10)]
        for chk in (True, False)
    ]
    results["leaf_overhead"] = bench_leaf_overhead((10, 100, 1000), repeats)
    results["choices"] = {
        "params": adam_size[0],
        "leaves": adam_size[1],
        "ms": bench_choices(*adam_size, repeats),
    }
    if not args.no_flags:
        flag_sets = [
            "",
            "--xla_cpu_multi_thread_eigen=false",
            "--xla_cpu_use_fusion_emitters=false",
            "--xla_cpu_enable_fast_math=true",
            # XLA:CPU's multi-output fusion pass is a backend option, not a flag of its own.
            "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion",
        ]
        results["flags"] = bench_flags(
            *flag_size, max(5, repeats // 2), flag_sets[: 2 if args.quick else None]
        )


if __name__ == "__main__":
    main()
