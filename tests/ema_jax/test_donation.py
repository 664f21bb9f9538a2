"""Donation end to end: the EMA costs exactly one accumulator copy.

* A donated update writes the new averages into the old buffers (same device pointers,
  old arrays deleted) — also on skipped steps (``update_every``, NaN) and for K decays.
* A donated train step leaves the number and bytes of ``jax.live_arrays()`` unchanged
  from step to step, and the process holds params + optimizer state + exactly one
  accumulator copy (+ three scalars) more than the same training without EMA.
* The compiled update needs no parameter-sized scratch buffer.
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from helpers import mse_loss, regression_batches

import ema_jax

EMA_SCALAR_BYTES = 4 + 4 + 4  # count (int32), num_skipped (int32), weight (float32)


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(128, 96)), dtype),
        "b": jnp.asarray(rng.normal(size=96), dtype),
        "n": jnp.arange(4, dtype=jnp.int32),
    }


def _pointers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 0.9},
        {"decay": 0.9, "debias": True, "skip_nonfinite": True},
        {"decay": 0.9, "update_every": 3, "skip_nonfinite": True},
        {"decay": (0.9, 0.99, 0.999), "debias": (False, True, False)},
    ],
    ids=["plain", "debias guarded", "update_every guarded", "three decays"],
)
def test_donated_update_writes_in_place(kwargs):
    """Over 5 steps (one with a NaN: skipped with the guard) every accumulator keeps its
    device buffer and the donated state is deleted: no step allocates a second copy of the
    average."""
    tx = ema_jax.ema(**kwargs)
    params = _params()
    bad = {**params, "w": params["w"].at[3, 4].set(jnp.nan)}
    update = jax.jit(lambda p, s: tx.update(p, s)[1], donate_argnums=1)
    state = tx.init(params)
    for step in range(5):
        before = _pointers(state.ema)
        old = jax.tree.leaves(state.ema)
        state = update(bad if step == 2 else params, state)
        assert all(x.is_deleted() for x in old)
        assert _pointers(state.ema) == before
    assert int(state.count) == 5
    assert int(state.num_skipped) == (1 if kwargs.get("skip_nonfinite", False) else 0)


def test_compiled_update_has_no_parameter_sized_scratch():
    """``memory_analysis`` of the donated update: every parameter-sized output reuses a
    donated input (unaliased outputs < 1% of the params: scalars) and scratch is < 1% of
    the params — the non-finite check reduces in place, it does not write a boolean copy."""
    params = {"w": jnp.ones((256, 256)), "v": jnp.ones((128, 512)), "b": jnp.ones(512)}
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    for tx in (ema_jax.ema(0.99), ema_jax.ema((0.9, 0.99)), ema_jax.ema(0.9, update_every=4)):
        update = jax.jit(lambda p, s, tx=tx: tx.update(p, s)[1], donate_argnums=1)
        analysis = update.lower(params, tx.init(params)).compile().memory_analysis()
        unaliased = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
        assert unaliased < 0.01 * param_bytes, unaliased
        assert analysis.temp_size_in_bytes < 0.01 * param_bytes, analysis.temp_size_in_bytes


def _live():
    gc.collect()
    arrays = jax.live_arrays()
    return len(arrays), sum(a.nbytes for a in arrays)


def _plain_train_step():
    def step(state, batch):
        loss, grads = jax.value_and_grad(mse_loss)(state.params, batch)
        return state.apply_gradients(grads=grads), {"loss": loss}

    return jax.jit(step, donate_argnums=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_train_step_live_arrays_are_stable_and_one_copy_larger(dtype):
    """A donated ``make_train_step`` (Adam + EMA) keeps ``jax.live_arrays()`` count and bytes
    identical across steps; compared with the same training without EMA the process holds
    exactly the accumulators (fp32 for bf16 params) and the three EMA scalars more."""
    batches = regression_batches(0, 8, 16, din=3, dout=2)
    params = {
        "w": jnp.zeros((3, 2), dtype),
        "b": jnp.zeros(2, dtype),
        "pad": jnp.zeros((64, 64), dtype),  # an unused leaf, large enough to see a copy
    }
    acc_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    held = {}
    for name in ("without", "with"):
        base = _live()
        fresh = jax.tree.map(jnp.copy, params)
        if name == "with":
            state = ema_jax.EmaTrainState.create(
                apply_fn=None, params=fresh, tx=optax.adam(1e-2), ema=ema_jax.ema(0.9)
            )
            step = ema_jax.make_train_step(mse_loss)
        else:
            state = train_state.TrainState.create(apply_fn=None, params=fresh, tx=optax.adam(1e-2))
            step = _plain_train_step()
        del fresh
        state = step(state, batches[0])[0]
        state = step(state, batches[1])[0]  # both compiled: python-int step, then array
        counts = []
        for batch in batches[2:]:
            state, metrics = step(state, batch)
            del metrics
            counts.append(_live())
        assert len(set(counts)) == 1, counts
        held[name] = counts[-1][1] - base[1]
        del state
    assert held["with"] - held["without"] == acc_bytes + EMA_SCALAR_BYTES
