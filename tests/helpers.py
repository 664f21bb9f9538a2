"""Shared test helpers: float64 NumPy references, a scan runner and tiny models.

The references are written independently of ``ema_jax`` (plain loops / explicit products
in float64), so a test comparing against them can fail.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

import ema_jax


def f32(x: float) -> float:
    """``x`` rounded to float32, back as a Python float: the β the transform computes with."""
    return float(np.float32(x))


def np_plain_ema(init: np.ndarray, seq: np.ndarray, betas: Sequence[float]) -> np.ndarray:
    """Float64 loop ``ema ← β_t·ema + (1-β_t)·θ_t`` from ``ema = θ_0``; returns every step."""
    ema = np.asarray(init, np.float64).copy()
    out = []
    for theta, beta in zip(seq, betas, strict=True):
        ema = beta * ema + (1.0 - beta) * np.asarray(theta, np.float64)
        out.append(ema.copy())
    return np.stack(out)


def np_debiased_closed_form(
    seq: np.ndarray, betas: Sequence[float], applied: Sequence[bool]
) -> np.ndarray:
    """``Σ_k (1-β_k)·Π_{j>k} β_j·θ_k / (1 - Π_j β_j)`` over the applied steps, at every step.

    Explicit products (no recursion), float64. Before the first applied step there is no
    average: those rows are NaN.
    """
    seq = np.asarray(seq, np.float64)
    out = []
    for n in range(len(seq)):
        used = [k for k in range(n + 1) if applied[k]]
        if not used:
            out.append(np.full(seq.shape[1:], np.nan))
            continue
        total = np.zeros(seq.shape[1:])
        for k in used:
            tail = np.prod([betas[j] for j in used if j > k])
            total += (1.0 - betas[k]) * tail * seq[k]
        out.append(total / (1.0 - np.prod([betas[j] for j in used])))
    return np.stack(out)


def np_sgd_ema_switch(
    params: dict, epochs: Sequence[Sequence[Any]], lr: float, beta: float, switch_after: set[int]
) -> tuple[dict, dict]:
    """Float64 loop over ``epochs`` (lists of ``(x, y)`` batches) of SGD on :func:`mse_loss`,
    then ``ema ← β·ema + (1-β)·θ`` (from ``ema = θ_0``), and at the end of each epoch in
    ``switch_after`` (from 0) ``θ ← ema``: Switch EMA by hand. Returns ``(params, ema)``."""
    theta = {k: np.asarray(v, np.float64) for k, v in params.items()}
    ema = {k: v.copy() for k, v in theta.items()}
    for epoch, batches in enumerate(epochs):
        for x, y in batches:
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            residual = 2.0 * (x @ theta["w"] + theta["b"] - y) / y.size
            grads = {"w": x.T @ residual, "b": residual.sum(axis=0)}
            theta = {k: theta[k] - lr * grads[k] for k in theta}
            ema = {k: beta * ema[k] + (1.0 - beta) * theta[k] for k in theta}
        if epoch in switch_after:
            theta = {k: v.copy() for k, v in ema.items()}
    return theta, ema


def scan_runner(tx: ema_jax.EmaTransform) -> Any:
    """A jitted ``(init_params, seq) -> (shadows, final_state)``: ``tx.init(init_params)``,
    then ``tx.update`` on each slice of ``seq`` (leading axis). ``shadows`` stacks the shadow
    after every update. Build it once and reuse it: it compiles once per shape."""

    @jax.jit
    def run(init_params: Any, seq: Any) -> tuple[Any, Any]:
        def body(state: Any, params: Any) -> tuple[Any, Any]:
            out, state = tx.update(params, state)
            return state, out

        state, outs = jax.lax.scan(body, tx.init(init_params), seq)
        return outs, state

    return run


def scan_updates(tx: ema_jax.EmaTransform, init_params: Any, seq: Any) -> tuple[Any, Any]:
    """``scan_runner(tx)(init_params, seq)``, for one-off runs."""
    return scan_runner(tx)(init_params, seq)


def linear_params(key: jax.Array, din: int = 3, dout: int = 2, dtype: Any = jnp.float32) -> dict:
    kw, kb = jax.random.split(key)
    return {
        "w": jax.random.normal(kw, (din, dout), dtype),
        "b": jax.random.normal(kb, (dout,), dtype),
    }


def mse_loss(params: dict, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    pred = x @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)
    return jnp.mean((pred - y) ** 2)


def regression_batches(
    seed: int, num: int, batch_size: int, din: int = 3, dout: int = 2
) -> list[tuple[jax.Array, jax.Array]]:
    """``num`` batches of a fixed linear target plus noise."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(din, dout))
    batches = []
    for _ in range(num):
        x = rng.normal(size=(batch_size, din))
        y = x @ w_true + 0.1 * rng.normal(size=(batch_size, dout))
        batches.append((jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    return batches


def tree_allclose(a: Any, b: Any, **kwargs: Any) -> None:
    """``chex.assert_trees_all_close`` in float64 (so a float32 result can be compared with
    a float64 reference); ``rtol`` / ``atol`` as in ``np.testing.assert_allclose``."""

    def to64(tree: Any) -> Any:
        return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)

    chex.assert_trees_all_close(to64(a), to64(b), **kwargs)


def host_copy(tree: Any) -> Any:
    """NumPy copies of a tree's arrays that keep no reference to the device buffers.

    (``jax.device_get`` on CPU may return zero-copy views; a live view makes XLA skip the
    donation of that buffer, so tests that check donation snapshot with this.)
    """
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a JAX coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_together(
    commands: Sequence[tuple[list[str], dict[str, str]]], cwd: Any, timeout: float
) -> None:
    """Starts every ``(argv, env)`` at once (processes of one distributed run), waits for all,
    kills any left after ``timeout`` s, and asserts each exited 0 (its stderr's tail if not)."""
    procs = [
        subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for argv, env in commands
    ]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-4000:]
