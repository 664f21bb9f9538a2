"""The device goal: the EMA update's share of the copy bandwidth on JAX's default backend.

The goal (≥ 0.80 of the copy bandwidth) is for a GPU; on a CPU the figures are
informative. ``python -m experiments.bench --bandwidth-only`` runs this section alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from experiments.bench.harness import (
    Timed,
    donated_ema_updates,
    flat,
    flat_lerp,
    host_params,
    median_ms,
    scale_in_place,
)

BYTES_PER_PARAM = {"copy": 8, "scale in place": 8, "sum": 4}
"""Bytes each reference moves per param; every update moves 12 (read the average and the
params, write the average): the check's extra read is not useful traffic."""
UPDATE_BYTES_PER_PARAM = 12


def _undonated(fn: Any, buffer: jax.Array) -> Timed:
    """``fn(buffer)`` jitted, not donated: each call returns a fresh buffer."""
    jitted = jax.jit(fn)

    def run() -> None:
        jax.block_until_ready(jitted(buffer))

    return run


def bench_bandwidth(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """GB/s of each update and reference over ``n`` params, and the updates' shares of
    the copy bandwidth.

    References over one flat buffer, 8 B/param each: ``copy`` (a jitted ``jnp.copy`` into
    a fresh buffer) and ``scale in place`` (donated ``x * c``); the faster is the copy
    bandwidth. ``sum`` (4 B/param, read only) is what the NaN/Inf check costs on its own,
    so ``checked_ceiling`` = flat lerp ms / (flat lerp ms + sum ms), times the flat lerp's
    share, is the most a checked update can reach on this backend: the two passes at the
    speeds this machine gives each.
    """
    host = host_params(n, leaves)
    params = [jnp.asarray(x) for x in host]
    buffer = jnp.asarray(flat(host))
    fns: dict[str, Timed] = {
        "copy": _undonated(jnp.copy, buffer),
        "scale in place": scale_in_place(buffer),
        "sum": _undonated(jnp.sum, buffer),
        "flat lerp": flat_lerp(buffer),
        **donated_ema_updates(params),
    }
    ms = median_ms(fns, repeats)
    gbps = {
        k: BYTES_PER_PARAM.get(k, UPDATE_BYTES_PER_PARAM) * n / (v * 1e-3) / 1e9
        for k, v in ms.items()
    }
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
            k: gbps[k] / reference for k in ("flat lerp", "ema_jax", "ema_jax guard")
        },
        "checked_ceiling": lerp_share * ms["flat lerp"] / (ms["flat lerp"] + ms["sum"]),
    }
