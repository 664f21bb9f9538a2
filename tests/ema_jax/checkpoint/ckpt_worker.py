"""Subprocess side of the checkpoint tests (tests/ema_jax/checkpoint/), and the model both
sides share.

Not collected by pytest (no ``test_`` prefix).
Run as ``python tests/ema_jax/checkpoint/ckpt_worker.py MODE ...``:

* ``resume DIR OUT STEPS``: restore the latest checkpoint in DIR into an abstract target,
  train STEPS more steps, pickle the state's leaves to OUT.
* ``crash DIR MODE``: save step 1 and wait, then start saving step 2 and stay inside that
  save (MODE ``write``: a large state, killed while Orbax writes; ``commit``: Orbax's
  atomic rename is held, so the kill lands after the writes and before the commit).
* ``export PATH``: export a small state to PATH, then export a large one over it
  (``force=True``), killed while it writes.
* ``dp DIR OUT PROCESS_ID PORT STEPS``: one of 2 processes x 2 CPU devices; train
  data-parallel, save one checkpoint together, restore it, pickle the leaves to OUT.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax
from ema_jax import checkpoint as ckpt

IN, HIDDEN, OUT_DIM, BATCH = 8, 16, 4, 16
EXTRA = 4 * 1024 * 1024  # leaf size for the crash test's "write" mode (16 MiB per copy)


def make_params(seed: int = 0, dtype: Any = jnp.float32, extra: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    params = {
        "hidden": {
            "w": rng.normal(0, 0.5, (IN, HIDDEN)),
            "b": np.zeros(HIDDEN),
        },
        "out": {"w": rng.normal(0, 0.5, (HIDDEN, OUT_DIM)), "b": np.zeros(OUT_DIM)},
    }
    if extra:
        params["extra"] = rng.normal(0, 1.0, (extra,))
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


# Built once, so states made apart share their static fields: equal tree definitions, and
# one compiled train step for all of them.
TX = optax.adam(1e-2)
TWO_AVERAGES = ema_jax.ema((ema_jax.schedules.tf_warmup(0.99), 0.9), debias=(False, True))


def make_state(
    dtype: Any = jnp.float32, extra: int = 0, ema: Any = None, params: Any = None
) -> ema_jax.EmaTrainState:
    """Adam + two averages in one pass (a plain one with warm-up, a debiased one)."""
    return ema_jax.EmaTrainState.create(
        apply_fn=None,
        params=make_params(dtype=dtype, extra=extra) if params is None else params,
        tx=TX,
        ema=TWO_AVERAGES if ema is None else ema,
    )


def loss_fn(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    pred = h @ params["out"]["w"] + params["out"]["b"]
    loss = jnp.mean((pred.astype(jnp.float32) - y) ** 2)
    if "extra" in params:
        loss = loss + 1e-6 * jnp.sum(params["extra"].astype(jnp.float32) ** 2)
    return loss


def batch(i: int) -> tuple[np.ndarray, np.ndarray]:
    """The i-th training batch: a pure function of ``i``, the same in every process."""
    rng = np.random.default_rng(1000 + i)
    x = rng.normal(size=(BATCH, IN)).astype(np.float32)
    return x, np.sin(x[:, :OUT_DIM]).astype(np.float32)


train_step = ema_jax.make_train_step(loss_fn)


def train(state: ema_jax.EmaTrainState, start: int, steps: int) -> ema_jax.EmaTrainState:
    for i in range(start, start + steps):
        state, _ = train_step(state, batch(i))
    return state


def host_leaves(tree: Any) -> dict[str, np.ndarray]:
    """``{path: numpy value}``; a replicated global array is read from its local copy."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def dump(path: str, tree: Any) -> None:
    with open(path, "wb") as f:
        pickle.dump(host_leaves(tree), f)


def resume(directory: str, out: str, steps: int) -> None:
    target = jax.eval_shape(make_state)
    with ckpt.manager(directory) as mngr:
        start = int(mngr.latest_step())
        state = ckpt.restore(mngr, target)
    dump(out, train(state, start, steps))


def crash(directory: str, mode: str) -> None:
    state = train(make_state(extra=EXTRA if mode == "write" else 0), 0, 1)
    mngr = ckpt.manager(directory)
    ckpt.save(mngr, 1, state)
    mngr.wait_until_finished()
    state = train(state, 1, 1)
    if mode == "commit":  # hold step 2 at Orbax's commit (the tmp -> final rename)
        from orbax.checkpoint._src.path import atomicity

        async def hold(self: Any, *args: Any, **kwargs: Any) -> None:
            print("COMMITTING", flush=True)
            await asyncio.sleep(3600)

        atomicity.AtomicRenameTemporaryPath.finalize = hold  # type: ignore[method-assign]
    print("SAVING", flush=True)
    ckpt.save(mngr, 2, state)
    mngr.wait_until_finished()
    print("SAVED", flush=True)  # reached only if the parent was too late


def export(path: str) -> None:
    ckpt.export_ema_params(path, train(make_state(), 0, 1))
    print("EXPORTING", flush=True)
    ckpt.export_ema_params(path, train(make_state(extra=EXTRA), 0, 1), force=True)
    print("EXPORTED", flush=True)  # reached only if the parent was too late


def data_parallel(directory: str, out: str, process_id: int, port: int, steps: int) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated = NamedSharding(mesh, P())
    by_row = NamedSharding(mesh, P("data"))

    def global_array(x: Any, sharding: NamedSharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    local = make_state()
    state = jax.tree.map(lambda x: global_array(x, replicated), local)
    for i in range(steps):
        state, _ = train_step(state, jax.tree.map(lambda x: global_array(x, by_row), batch(i)))
    with ckpt.manager(directory) as mngr:
        ckpt.save(mngr, steps, state)
        mngr.wait_until_finished()
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
        )
        restored = ckpt.restore(mngr, target)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored))
    if process_id == 0:
        dump(out, {"trained": state, "restored": restored})
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "resume":
        resume(args[0], args[1], int(args[2]))
    elif mode == "crash":
        crash(args[0], args[1])
    elif mode == "export":
        export(args[0])
    elif mode == "dp":
        data_parallel(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
