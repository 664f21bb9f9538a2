"""G5: ``ema_jax.nnx.EMA`` against flax's ``nnx.EMA`` and the functional update.

The same fp32 params, held by an NNX module as ``nnx.Param`` s, each average updated by
``nnx.jit(lambda ema, model: ema.update(model), donate_argnums=0)``, in NNX's graph mode
(the default) and its tree mode (``graph=False``):

* ``ema_jax.nnx``  ``ema_jax.nnx.EMA(model, 0.999)``
* ``nnx.EMA``      flax's ``nnx.EMA(model, 0.999)`` (graph mode: its documented use)
* ``nnx.jit no-op`` the same ``nnx.jit`` call over ``(ema_jax.nnx.EMA, model)`` doing
                   nothing: what NNX's call costs before any update
* ``ema_jax``      the functional ``ema_jax.ema(0.999)`` on the params' arrays, jitted, the
                   state donated (:func:`~experiments.bench.harness.donated_ema_updates`)
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

import ema_jax.nnx
from experiments.bench.harness import (
    DECAY,
    Timed,
    device_params,
    donated_ema_updates,
    median_ms,
    paired_ratios,
)

MODES = {"": None, " tree": False}
"""Name suffix -> ``graph`` of ``nnx.jit``: graph mode (NNX's default) and tree mode."""


def _nnx_update(averager: Any, model: Any, graph: bool | None, update: bool = True) -> Timed:
    """``averager.update(model)`` (or nothing) under ``nnx.jit`` with the average donated."""

    def body(e: Any, m: Any) -> None:
        if update:
            e.update(m)

    step = nnx.jit(body, donate_argnums=0, graph=graph)

    def run() -> None:
        step(averager, model)
        jax.block_until_ready(nnx.state(averager))

    return run


def nnx_fns(n: int, leaves: int) -> dict[str, Timed]:
    """Every implementation of the module docstring, in both NNX modes."""
    params = device_params(n, leaves)
    fns: dict[str, Timed] = {}
    for suffix, graph in MODES.items():
        model = nnx.List([nnx.Param(x) for x in params])
        ours = ema_jax.nnx.EMA(model, DECAY)
        fns["ema_jax.nnx" + suffix] = _nnx_update(ours, model, graph)
        fns["nnx.EMA" + suffix] = _nnx_update(nnx.EMA(model, DECAY), model, graph)
        fns["nnx.jit no-op" + suffix] = _nnx_update(ours, model, graph, update=False)
    fns["ema_jax"] = donated_ema_updates(params)["ema_jax"]
    return fns


def bench_nnx(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """Round-robin medians of every implementation (``ms``), and per mode ``ema_jax.nnx``
    paired with flax's ``nnx.EMA`` (same mode) and with the functional update: quartiles of
    other time / ``ema_jax.nnx`` time (its speed)."""
    fns = nnx_fns(n, leaves)
    ms = median_ms(fns, repeats)
    paired = {}
    for suffix in MODES:
        ours = "ema_jax.nnx" + suffix
        others = {"nnx.EMA": fns["nnx.EMA" + suffix], "ema_jax": fns["ema_jax"]}
        out = paired_ratios(fns[ours], others, repeats)
        paired[ours] = {k: out[k] for k in others}
    return {"params": n, "leaves": leaves, "repeats": repeats, "ms": ms, "paired": paired}
