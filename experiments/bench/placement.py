"""P5: where the EMA's bytes live: ``shard_over`` on a data-parallel mesh, host offload.

* :func:`bench_shard_over`: params replicated over a 1-D ``("data",)`` mesh of all devices
  (8 host CPU devices in a child process when this one has a single device), an Adam
  train step with the EMA replicated and with ``shard_over="data"``: the EMA's bytes on one
  device (must be 1/N up to the leaves no dimension of which N divides) and the collectives
  of the compiled, donated step (must be none).
* :func:`bench_offload`: on a GPU, the EMA's device bytes and the step time with the
  accumulators in device memory and in pinned host memory; elsewhere "not measured" (host
  and device memory are the same RAM on a CPU, there is nothing to save).

Run alone: ``python -m experiments.bench.placement [PARAMS LEAVES]`` prints the shard_over
row as JSON (what the child process does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax
from experiments.bench.harness import DECAY, host_params, median_ms

CHILD_DEVICES = 8
COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|collective-broadcast)"
)
NOT_MEASURED = "not measured (no GPU: host and device memory are the same RAM here)"


def _replicated_params(n: int, leaves: int, mesh: Mesh) -> list[jax.Array]:
    """``leaves`` fp32 leaves of ``n`` params in all, plus a 3-value bias no mesh of more
    than 3 devices divides, replicated over ``mesh``."""
    host = [*host_params(n, leaves), np.zeros(3, np.float32)]
    return [jax.device_put(x, NamedSharding(mesh, P())) for x in host]


def _adam_with(params: list[jax.Array], rule: Any) -> tuple[ema_jax.EmaTrainState, Any]:
    """An Adam train state over ``params`` with the EMA ``rule``, and zero gradients."""
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.adam(1e-4), ema=rule
    )
    return state, [jnp.zeros_like(p) for p in params]


def _step(state: ema_jax.EmaTrainState, grads: Any) -> ema_jax.EmaTrainState:
    return state.apply_gradients(grads=grads)


def _bytes_on(tree: Any, device: Any) -> int:
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def measure_shard_over(n: int, leaves: int) -> dict[str, Any]:
    """The shard_over row on this process's devices (see the module docstring)."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    out: dict[str, Any] = {"devices": mesh.size, "params": n, "leaves": leaves}
    for name, shard_over in (("replicated", None), ("shard_over", "data")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unsplittable bias, reported once
            state, grads = _adam_with(
                _replicated_params(n, leaves, mesh), ema_jax.ema(DECAY, shard_over=shard_over)
            )
        step = jax.jit(_step, donate_argnums=0)
        text = step.lower(state, grads).compile().as_text() or ""
        state = step(state, grads)
        out[name] = {
            "ema_bytes_per_device": _bytes_on(state.ema_state.ema, jax.devices()[0]),
            "ema_bytes": sum(x.nbytes for x in jax.tree.leaves(state.ema_state.ema)),
            "collectives": sorted(COLLECTIVE.findall(text)),
        }
    out["ratio"] = (
        out["shard_over"]["ema_bytes_per_device"] / out["replicated"]["ema_bytes_per_device"]
    )
    out["unsplittable_bytes"] = 3 * 4
    return out


def bench_shard_over(n: int, leaves: int) -> dict[str, Any]:
    """:func:`measure_shard_over` here with several devices, else in a child process on
    ``CHILD_DEVICES`` host CPU devices."""
    if jax.device_count() > 1:
        return measure_shard_over(n, leaves)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={CHILD_DEVICES}"
    )
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.placement", str(n), str(leaves)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the shard_over child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def bench_offload(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """On a GPU: the EMA's bytes in device memory and the median ms of a donated Adam + EMA
    train step, accumulators in device vs pinned host memory. Elsewhere: not measured."""
    if jax.default_backend() != "gpu":
        return {"backend": jax.default_backend(), "status": NOT_MEASURED}
    out: dict[str, Any] = {"backend": "gpu", "params": n, "leaves": leaves, "status": "measured"}
    steps: dict[str, Callable[[], Any]] = {}
    for name, kind in (("device", None), ("pinned_host", "pinned_host")):
        params = [jnp.asarray(x) for x in host_params(n, leaves)]
        state, grads = _adam_with(params, ema_jax.ema(DECAY, memory_kind=kind))
        step = jax.jit(_step, donate_argnums=0)
        holder = {"state": step(state, grads)}
        steps[name] = _stepper(step, holder, grads)
        ema = holder["state"].ema_state.ema
        out[name] = {
            "ema_device_bytes": sum(
                x.nbytes for x in jax.tree.leaves(ema) if x.sharding.memory_kind == "device"
            )
        }
    for name, ms in median_ms(steps, repeats, cold=False).items():
        out[name]["step_ms"] = ms
    return out


def _stepper(step: Any, holder: dict[str, Any], grads: Any) -> Callable[[], Any]:
    """A timed call: one donated step of ``holder["state"]``, kept for the next call."""

    def run() -> Any:
        holder["state"] = step(holder["state"], grads)
        return holder["state"]

    return run


def shard_over_section(row: dict[str, Any]) -> list[str]:
    """The Markdown of the shard_over row."""
    lines = [
        f"### P5: EMA bytes per device, {row['params']:.0e} fp32 params in {row['leaves']} "
        f"leaves + a 3-value bias, replicated over {row['devices']} devices",
        "",
        "| EMA layout | EMA bytes on device 0 | share of the EMA | collectives in the step |",
        "|---|---|---|---|",
    ]
    for name, key in (("replicated", "replicated"), ('shard_over="data"', "shard_over")):
        r = row[key]
        share = r["ema_bytes_per_device"] / r["ema_bytes"]
        found = ", ".join(r["collectives"]) or "none"
        lines.append(f"| {name} | {r['ema_bytes_per_device']:,} | {share:.4f} | {found} |")
    one_in = 1 / row["devices"]
    return [
        *lines,
        "",
        f"shard_over / replicated = {row['ratio']:.4f} (1/{row['devices']} = {one_in:.4f}; "
        f"the unsplittable bias, {row['unsplittable_bytes']} B, stays whole)",
    ]


def offload_section(row: dict[str, Any]) -> list[str]:
    """The Markdown of the offload row."""
    title = '### P6: host offload (memory_kind="pinned_host")'
    if row.get("status") != "measured":
        return [title, "", f"{row['backend']}: {row['status']}"]
    return [
        title,
        "",
        "| accumulators | EMA bytes in device memory | step ms (Adam + EMA, donated) |",
        "|---|---|---|",
        *(
            f"| {name} | {row[name]['ema_device_bytes']:,} | {row[name]['step_ms']:.3f} |"
            for name in ("device", "pinned_host")
        ),
    ]


if __name__ == "__main__":
    size, count = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (1_000_000, 10)
    print(json.dumps(measure_shard_over(size, count)))
