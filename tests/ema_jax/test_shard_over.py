"""``ema(..., shard_over=axes)`` on 8 host CPU devices: the accumulators of params
replicated over ``axes`` are split over them (1/N of the bytes per device), the update has
no collective and leaves the params replicated, and every average is the replicated one."""

from __future__ import annotations

import functools
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

COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|collective-broadcast)"
)


def _auto_mesh():
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def _explicit_mesh():
    return jax.make_mesh((4, 2), ("data", "model"))  # explicit axes in this jax


MESHES = {"automatic axes": _auto_mesh, "explicit axes": _explicit_mesh}


def _params(mesh):
    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    return {
        "w": put(jnp.arange(64.0).reshape(16, 4), P()),  # replicated: split on dim 0
        "v": put(jnp.ones((3, 8)), P()),  # dim 0 too short: split on dim 1
        "m": put(jnp.ones((8, 6)), P(None, "model")),  # tensor-parallel: split on dim 0
        "f": put(jnp.ones((8, 2)), P("data")),  # FSDP: its own layout
        "h": put(jnp.ones((4, 8), jnp.bfloat16), P()),
        "n": put(jnp.arange(8), P()),  # copied, split too
    }


def _state(mesh, decay=(0.9, 0.5), **options):
    params = _params(mesh)
    return ema_jax.EmaTrainState.create(
        apply_fn=None,
        params=params,
        tx=optax.sgd(0.1),
        ema=ema_jax.ema(decay, debias=(True, False), shard_over="data", **options),
    )


def _step(state):
    return state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))


def _device_bytes(tree) -> int:
    """Bytes of ``tree`` held on device 0."""
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == jax.devices()[0]
    )


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_accumulators_of_replicated_params_are_split_over_the_axis(mesh_name):
    """Each replicated leaf's accumulator is sharded over "data" on its first divisible
    dimension (the averages axis replicated), an FSDP leaf keeps its layout, and device 0
    holds a quarter of the replicated accumulators' bytes."""
    state = _state(MESHES[mesh_name]())
    specs = {k: tuple(v.sharding.spec) + (None,) * 3 for k, v in state.ema_state.ema.items()}
    assert specs["w"][:3] == ("data", None, None)
    assert specs["v"][:3] == (None, "data", None)
    assert specs["m"][:3] == ("data", "model", None)
    assert specs["f"][:3] == ("data", None, None)
    assert specs["n"][:2] == ("data", None)
    replicated = {k: v for k, v in state.ema_state.ema.items() if k != "m" and k != "f"}
    total = sum(x.nbytes for x in jax.tree.leaves(replicated))
    assert _device_bytes(replicated) * 4 == total


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_update_has_no_collective_and_keeps_params_replicated(mesh_name):
    """The compiled, donated train step has no collective; after it the params keep their
    layouts and the accumulators theirs; the shadows are bitwise the replicated EMA's."""
    state = _state(MESHES[mesh_name]())
    reference = ema_jax.EmaTrainState.create(
        apply_fn=None,
        params=jax.device_get(state.params),
        tx=optax.sgd(0.1),
        ema=ema_jax.ema((0.9, 0.5), debias=(True, False)),
    )
    param_shardings = jax.tree.map(lambda x: x.sharding, state.params)
    ema_shardings = jax.tree.map(lambda x: x.sharding, state.ema_state.ema)
    step = jax.jit(_step, donate_argnums=0)
    assert not COLLECTIVE.findall(step.lower(state).compile().as_text())
    for _ in range(3):
        state = step(state)
        reference = jax.jit(_step)(reference)
    for x, want in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(param_shardings), strict=True
    ):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    for x, want in zip(
        jax.tree.leaves(state.ema_state.ema), jax.tree.leaves(ema_shardings), strict=True
    ):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    assert bits(state.ema_params) == bits(reference.ema_params)


def test_unsplittable_leaf_is_reported_once_at_init():
    """A leaf with no dimension divisible by the axes' size stays replicated: one warning
    naming it at ``init``, none at the updates."""
    mesh = _auto_mesh()
    params = {"odd": jax.device_put(jnp.ones((3, 5)), NamedSharding(mesh, P()))}
    tx = ema_jax.ema(0.9, shard_over="data")
    with pytest.warns(UserWarning, match=r"params\['odd'\] \(3, 5\)") as record:
        state = tx.init(params)
    assert len(record) == 1
    assert state.ema["odd"].sharding.is_fully_replicated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(tx.update)(params, state)
        tx.update(params, state)


def test_a_tuple_of_axes_splits_over_their_product():
    """``shard_over=("data", "model")`` splits a replicated accumulator 8 ways."""
    mesh = _auto_mesh()
    params = {"w": jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P()))}
    tx = ema_jax.ema(0.9, shard_over=("data", "model"))
    state = tx.init(params)
    assert {s.data.shape for s in state.ema["w"].addressable_shards} == {(2, 4)}
    _, state = jax.jit(tx.update, donate_argnums=1)(params, state)
    assert {s.data.shape for s in state.ema["w"].addressable_shards} == {(2, 4)}


def test_shard_over_composes_with_offload():
    """With ``memory_kind="pinned_host"`` each device's slice lives in its host memory."""
    state = jax.jit(_step, donate_argnums=0)(_state(_auto_mesh(), memory_kind="pinned_host"))
    w = state.ema_state.ema["w"]
    assert w.sharding.memory_kind == "pinned_host"
    assert {s.data.shape for s in w.addressable_shards} == {(4, 4, 2)}


class _Model(nnx.Module):
    def __init__(self, mesh):
        self.w = nnx.Param(
            jax.device_put(jnp.linspace(0, 1, 32).reshape(8, 4), NamedSharding(mesh, P()))
        )


def test_nnx_ema_shard_over():
    """``ema_jax.nnx.EMA(model, decay, shard_over="data")``: the accumulator is split in a
    donating ``nnx.jit`` step, and the shadow is the replicated EMA's, bit for bit."""
    mesh = _auto_mesh()
    model = _Model(mesh)
    split = ema_jax.nnx.EMA(model, 0.9, shard_over="data")
    reference = ema_jax.nnx.EMA(model, 0.9)

    train_nnx_pair(model, split, reference)
    (accumulator,) = split.accumulators
    assert {s.data.shape for s in accumulator.get_value().addressable_shards} == {(2, 4)}
    assert model.w.get_value().sharding.is_fully_replicated
    assert bits(split.params) == bits(reference.params)


@pytest.mark.parametrize("donate", [False, True], ids=["eager", "jit donating the state"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_switch_gives_the_params_their_own_layout_back(mesh_name, donate):
    """``switch`` with split accumulators: each param keeps its layout (replicated, tensor-
    or FSDP-sharded), holds the shadow bit for bit, and the donated train step after it is
    not traced again (the same input shardings). ``nnx.EMA.switch`` likewise."""
    state = _state(MESHES[mesh_name]())
    param_shardings = jax.tree.map(lambda x: x.sharding, state.params)
    traces = []

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state):
        traces.append(None)
        return _step(state)

    state = step(step(state))  # the second call: a step's own output as input
    traced = len(traces)
    shadow = bits(state.select_params(True, 1))
    switch = jax.jit(lambda s: s.switch(1), donate_argnums=0) if donate else lambda s: s.switch(1)
    state = switch(state)
    assert bits(state.params) == shadow
    for x, want in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(param_shardings), strict=True
    ):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    step(state)
    assert len(traces) == traced

    model = _Model(MESHES[mesh_name]())
    average = ema_jax.nnx.EMA(model, 0.9, shard_over="data")
    train_nnx_pair(model, average, ema_jax.nnx.EMA(model, 0.5))
    shadow = bits(average.params)
    nnx.jit(lambda a, m: a.switch(m), donate_argnums=(0, 1))(average, model)
    assert bits(nnx.state(model, nnx.Param)) == shadow
    assert model.w.get_value().sharding.is_fully_replicated


def _target(state, mesh):
    """Abstract arrays of ``state`` with its shardings; scalars replicated over ``mesh``."""

    def abstract(x):
        sharding = x.sharding if isinstance(x.sharding, NamedSharding) else NamedSharding(mesh, P())
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(abstract, state)


def test_checkpoint_saves_sharded_and_restores_onto_a_mesh_of_another_size(tmp_path: Path):
    """Saved from a 4x2 mesh, restored onto a 2x2 mesh (target: a state made there): the
    accumulators come back split over that mesh's "data", bitwise; the export is the
    gathered shadow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unsplittable-leaf warnings of the small mesh
        state = jax.jit(_step)(_state(_auto_mesh()))
        small = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
        target = _target(_state(small), small)
    with ckpt.manager(tmp_path / "run") as mngr:
        ckpt.save(mngr, 1, state)
        mngr.wait_until_finished()
        restored = ckpt.restore(mngr, target)
    assert bits(restored) == bits(state)
    w = restored.ema_state.ema["w"]
    assert len(w.sharding.device_set) == 4 and {s.data.shape for s in w.addressable_shards} == {
        (8, 4, 2)
    }
    restored = jax.jit(_step)(restored)  # and it trains on there
    ckpt.export_ema_params(tmp_path / "export", state)
    exported = ckpt.load_exported(tmp_path / "export")
    assert exported["w"].shape == (16, 4)  # the first average, whole
    assert bits(exported) == bits(state.select_params(True))


@pytest.mark.parametrize("bad", [1, "", ("data", "data"), (), ("data", 2)])
def test_malformed_shard_over_is_refused(bad):
    with pytest.raises(TypeError, match="shard_over must be a mesh axis name"):
        ema_jax.ema(0.9, shard_over=bad)


def test_shard_over_an_axis_the_mesh_lacks_is_refused():
    params = {"w": jax.device_put(jnp.ones(8), NamedSharding(_auto_mesh(), P()))}
    with pytest.raises(
        ValueError, match=r"names axes \['batch'\] that the params' mesh does not have"
    ):
        ema_jax.ema(0.9, shard_over="batch").init(params)


def test_shard_over_needs_concrete_params_at_init():
    params = {"w": jax.device_put(jnp.ones(8), NamedSharding(_auto_mesh(), P()))}
    with pytest.raises(ValueError, match="call init with concrete"):
        jax.jit(ema_jax.ema(0.9, shard_over="data").init)(params)
