"""Host offload (``ema(..., memory_kind="pinned_host")``): the accumulators live in pinned
host memory from ``init`` on and after every jitted, donated update, and every average is
bit for bit the on-device one. jax on CPU exposes ``pinned_host``, so all of it runs here."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from placement_support import bits, train_nnx_pair

import ema_jax
import ema_jax.nnx
from ema_jax import checkpoint as ckpt

HOST = "pinned_host"
PARAMS = {
    "w": jnp.arange(12.0).reshape(3, 4),
    "h": jnp.linspace(-1, 1, 5).astype(jnp.bfloat16),
    "n": jnp.arange(3),
}


def _kinds(tree) -> set[str]:
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def _moved(params, i: int):
    return jax.tree.map(lambda x: (x + i).astype(x.dtype), params)


@pytest.mark.parametrize(
    "options",
    [{"debias": True}, {"update_every": 2, "skip_nonfinite": True}],
    ids=["every step", "update_every and the guard (a conditional update)"],
)
@pytest.mark.parametrize("decay", [0.9, (0.9, 0.5)], ids=["one decay", "two decays"])
def test_accumulators_stay_in_host_memory_and_match_the_device_path(decay, options):
    """After ``init``, jitted donated updates and eager updates, every accumulator is in
    pinned host memory and the scalars in device memory; the shadows are bitwise those of
    the same EMA on the device."""
    offloaded = ema_jax.ema(decay, memory_kind=HOST, **options)
    on_device = ema_jax.ema(decay, **options)
    state, reference = offloaded.init(PARAMS), on_device.init(PARAMS)
    assert _kinds(state.ema) == {HOST}
    update = jax.jit(offloaded.update, donate_argnums=1)
    for i in range(1, 4):
        shadow, state = update(_moved(PARAMS, i), state)
        _, reference = jax.jit(on_device.update)(_moved(PARAMS, i), reference)
        assert _kinds(state.ema) == _kinds(shadow) == {HOST}
        assert _kinds((state.count, state.weight)) == {"device"}
    _, state = offloaded.update(_moved(PARAMS, 4), state)  # eagerly
    _, reference = on_device.update(_moved(PARAMS, 4), reference)
    assert _kinds(state.ema) == {HOST}
    assert bits(ema_jax.shadows(state)) == bits(ema_jax.shadows(reference))
    assert _kinds(ema_jax.shadows(state)) == {"device"}  # reading brings them to the devices


def _compiled(tx, params) -> str:
    return jax.jit(tx.update, donate_argnums=1).lower(params, tx.init(params)).compile().as_text()


def test_only_the_offloaded_update_moves_memory():
    """The compiled offloaded update holds host-memory buffers (``S(5)``); the default one
    has none (no extra work when ``memory_kind`` is unset)."""
    host_space = re.compile(r"S\(5\)")
    assert host_space.search(_compiled(ema_jax.ema(0.9, memory_kind=HOST), PARAMS))
    assert not host_space.search(_compiled(ema_jax.ema(0.9), PARAMS))


def _loss(params, batch):
    return jnp.sum((params["w"] * batch) ** 2)


def _train_state(memory_kind):
    return ema_jax.EmaTrainState.create(
        apply_fn=None,
        params={"w": jnp.linspace(0.5, 1.5, 4)},
        tx=optax.MultiSteps(optax.sgd(0.1), 2),
        ema=ema_jax.ema((0.9, 0.5), memory_kind=memory_kind),
    )


def test_train_and_eval_steps_read_the_ema_where_it_lives():
    """``make_train_step`` (donating, with gradient accumulation) keeps the accumulators in
    host memory; ``make_eval_step`` and ``make_paired_eval_step`` read them and give the
    on-device metrics bit for bit."""
    train_step = ema_jax.make_train_step(_loss)
    eval_step = ema_jax.make_eval_step(_loss)
    paired = ema_jax.make_paired_eval_step(_loss)
    offloaded, reference = _train_state(HOST), _train_state(None)
    batch = jnp.ones(4)
    for _ in range(4):
        offloaded, _ = train_step(offloaded, batch)
        reference, _ = train_step(reference, batch)
    assert _kinds(offloaded.ema_state.ema) == {HOST}
    assert int(offloaded.ema_state.count) == 2
    for index in (0, 1):
        got = eval_step(offloaded, batch, ema_index=index)
        assert (
            np.asarray(got).tobytes()
            == np.asarray(eval_step(reference, batch, ema_index=index)).tobytes()
        )
    assert bits(paired(offloaded, batch)) == bits(paired(reference, batch))


def test_each_shard_is_offloaded_on_its_own_device():
    """Sharded params (4x2 mesh): each accumulator keeps its param's sharding, with the
    memory kind pinned_host, shard by shard, after a donated update."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    params = {
        "w": jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data", "model")))
    }
    tx = ema_jax.ema(0.9, memory_kind=HOST)
    state = tx.init(params)
    _, state = jax.jit(tx.update, donate_argnums=1)(params, state)
    sharding = state.ema["w"].sharding
    assert sharding.memory_kind == HOST
    assert sharding.is_equivalent_to(params["w"].sharding.with_memory_kind(HOST), 2)
    assert {s.data.shape for s in state.ema["w"].addressable_shards} == {(2, 2)}


class _Model(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.linspace(0.0, 1.0, 6).reshape(2, 3))


def test_nnx_ema_offloaded_through_the_options_it_forwards():
    """``ema_jax.nnx.EMA(model, decay, memory_kind=...)`` in a donating ``nnx.jit`` step:
    accumulators in host memory, params bitwise those of the on-device EMA."""
    model = _Model()
    offloaded = ema_jax.nnx.EMA(model, 0.9, debias=True, memory_kind=HOST)
    reference = ema_jax.nnx.EMA(model, 0.9, debias=True)

    train_nnx_pair(model, offloaded, reference)
    assert {a.get_value().sharding.memory_kind for a in offloaded.accumulators} == {HOST}
    assert bits(offloaded.params) == bits(reference.params)


def test_checkpoint_restores_into_host_memory_and_exports(tmp_path: Path):
    """A saved offloaded state restores (target: a fresh offloaded state's shardings) with
    its accumulators back in pinned host memory, bit for bit; the export is the shadow."""
    train_step = ema_jax.make_train_step(_loss, donate=False)
    state, _ = train_step(_train_state(HOST), jnp.ones(4))
    state, _ = train_step(state, jnp.ones(4))
    with ckpt.manager(tmp_path / "run") as mngr:
        ckpt.save(mngr, 2, state)
        mngr.wait_until_finished()
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            _train_state(HOST),
        )
        restored = ckpt.restore(mngr, target)
    assert _kinds(restored.ema_state.ema) == {HOST}
    assert bits(restored) == bits(state)
    ckpt.export_ema_params(tmp_path / "export", state, ema_index=1)
    exported = ckpt.load_exported(tmp_path / "export")
    assert bits(exported) == bits(state.select_params(True, ema_index=1))


@pytest.mark.parametrize("bad", ["unpinned_host", "host", "gpu", 1])
def test_unknown_memory_kind_is_refused(bad):
    with pytest.raises(ValueError, match="memory_kind must be None"):
        ema_jax.ema(0.9, memory_kind=bad)


def test_device_memory_kind_is_the_default():
    """``memory_kind="device"`` is the default placement: equal transforms, one compile."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ema_jax.ema(0.9, memory_kind="device") == ema_jax.ema(0.9)


_SWITCH_DONATED = """
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import ema_jax, ema_jax.nnx

params = {"w": jnp.arange(4.0), "b": jnp.ones(())}
tx = ema_jax.ema(0.5, memory_kind="pinned_host")
state = ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1), ema=tx)
state = state.apply_gradients(grads={"w": jnp.ones(4), "b": jnp.ones(())})
shadow = jax.tree.map(np.array, state.ema_params)
state = jax.jit(lambda s: s.switch(), donate_argnums=0)(state)
assert all(np.array_equal(state.params[k], shadow[k]) for k in shadow)
assert {x.sharding.memory_kind for x in jax.tree.leaves(state.ema_state.ema)} == {"pinned_host"}

model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
ema = ema_jax.nnx.EMA(model, 0.5, memory_kind="pinned_host")
model.kernel.set_value(model.kernel.get_value() + 1.0)
ema.update(model)
shadow = np.array(ema.shadow()["kernel"])
nnx.jit(lambda m, e: e.switch(m), donate_argnums=(0, 1))(model, ema)
assert np.array_equal(model.kernel.get_value(), shadow)
"""


def test_a_donated_jitted_switch_keeps_offloaded_accumulators_apart_from_the_params():
    """``EmaTrainState.switch`` and ``nnx.EMA.switch`` jitted with the state donated give the
    shadow as params and keep the accumulators in host memory. (jax matches donated buffers
    to outputs ignoring memory kinds: were the old params dropped from the computation, a
    host accumulator would be aliased to a device output and the process abort, hence a
    process of its own.)"""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _SWITCH_DONATED], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
