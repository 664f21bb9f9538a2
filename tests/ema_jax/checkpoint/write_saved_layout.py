"""Writes ``saved_layout/``: checkpoints as ema_jax 0.1.0 (commit 9c6bd21) laid them out, read
back by test_checkpoint_layout.py so that later versions keep loading them.

Run once, with that version's code, from the repository root::

    git worktree add /tmp/v010 9c6bd21
    export PYTHONPATH=/tmp/v010:tests/ema_jax/checkpoint:tests/ema_jax
    python tests/ema_jax/checkpoint/write_saved_layout.py

It writes a Linen training checkpoint (two averages, a best metric, the state's checksum),
an NNX one, an export and post-hoc snapshots, with the arrays they hold in ``expected.npz``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ckpt_worker as w
import jax
import jax.numpy as jnp
import nnx_worker
import numpy as np

import ema_jax
from ema_jax import checkpoint as ckpt
from ema_jax import posthoc

OUT = Path(__file__).with_name("saved_layout")


def leaves(prefix: str, tree: object) -> dict[str, np.ndarray]:
    """``{prefix + keystr: value}``, RNG keys as their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    expected: dict[str, np.ndarray] = {}
    states = [w.train(w.make_state(), 0, n) for n in (1, 2)]
    with ckpt.manager(OUT / "linen", async_save=False, best_metric="val") as mngr:
        for n, (state, val) in enumerate(zip(states, (0.5, 0.7), strict=True), start=1):
            ckpt.save(mngr, n, state, checksum_state=True, metrics={"val": val})
            expected |= leaves(f"linen/{n}", state)
    ckpt.export_ema_params(OUT / "export", states[1], ema_index=1)
    expected |= leaves("export", states[1].ema_params[1])

    nnx_state = nnx_worker.train(nnx_worker.make(), range(2))
    with ckpt.manager(OUT / "nnx", async_save=False) as mngr:
        ckpt.save(mngr, 2, nnx_state)
    expected |= leaves("nnx", nnx_worker.leaves(nnx_state))

    tx = ema_jax.ema(
        tuple(ema_jax.schedules.power_function(sigma_rel=s) for s in posthoc.SIGMA_RELS)
    )
    params = {"w": jnp.linspace(0.0, 1.0, 6, dtype=jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
    ema_state = tx.init(params)
    with posthoc.snapshot_manager(OUT / "posthoc", async_save=False) as mngr:
        for step in (10, 20):
            params = jax.tree.map(lambda p: p * 1.5 + 1, params)
            ema_state = tx.update(params, ema_state)[1]
            posthoc.save_snapshot(mngr, step, ema_state)
    expected |= leaves("posthoc", posthoc.synthesize_from(OUT / "posthoc", 0.08))
    np.savez(OUT / "expected.npz", **expected)


if __name__ == "__main__":
    sys.exit(main())
