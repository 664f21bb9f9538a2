"""Sharded params on 8 host CPU devices: the EMA state keeps the params' shardings
and the update is shard-local except for one scalar all-reduce of the non-finite check."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax

COLLECTIVE = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>all-reduce|all-gather|all-to-all|collective-permute|"
    r"reduce-scatter|collective-broadcast)(?:-start)?\("
)
SCALAR = re.compile(r"[a-z]+[0-9]*\[\]")  # a rank-0 result: pred[], f32[], ...


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 host CPU devices"
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def _params(mesh, *, two_sharded_floats=False):
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    params = {
        "w": put(jnp.arange(32.0).reshape(8, 4), P("data", "model")),  # sharded 4x2
        "b": put(jnp.ones(4), P()),  # replicated
        "n": put(jnp.arange(8, dtype=jnp.int32), P("data")),  # sharded, not averaged
    }
    if two_sharded_floats:
        params["h"] = put(jnp.ones((4, 6), jnp.bfloat16), P(None, "model"))
    return params


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _assert_same_shardings(tree, params):
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim), (
            got.sharding,
            want.sharding,
        )


def test_state_and_update_keep_param_shardings(mesh):
    """After ``init`` (eager and jitted) and after a jitted update, every EMA
    accumulator and every shadow leaf has its param's sharding (bf16 → f32 included)."""
    params = _params(mesh, two_sharded_floats=True)
    tx = ema_jax.ema(0.9)
    eager = tx.init(params)
    jitted = jax.jit(tx.init)(params)
    for state in (eager, jitted):
        _assert_same_shardings(state.ema, params)
        assert state.ema["h"].dtype == jnp.float32
    shadow, new_state = jax.jit(tx.update)(params, eager)
    _assert_same_shardings(new_state.ema, params)
    _assert_same_shardings(shadow, params)
    assert shadow["h"].dtype == jnp.bfloat16
    # It is the same average as on one device.
    single = jax.device_get(params)
    want, _ = tx.update(single, tx.init(single))
    for got, ref in zip(jax.tree.leaves(shadow), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def _collectives(tx, params):
    """``{computation name: [(op, result shape), ...]}`` of the compiled ``tx.update``."""
    text = jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text()
    found: dict[str, list[tuple[str, str]]] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("ENTRY"):
            name = "ENTRY"
        elif line.startswith("%"):
            name = line.split()[0]
        for m in COLLECTIVE.finditer(line):
            found.setdefault(name, []).append((m["op"], m["shape"]))
    return found


def _is_scalar_all_reduce(op, shape):
    parts = [s.strip() for s in shape.strip("()").split(",")]
    return op == "all-reduce" and all(SCALAR.fullmatch(p) for p in parts)


def test_update_has_no_collective_without_the_nonfinite_check(mesh):
    """With ``skip_nonfinite=False`` the compiled update is purely shard-local."""
    params = _params(mesh, two_sharded_floats=True)
    for tx in (
        ema_jax.ema(0.9, skip_nonfinite=False),
        ema_jax.ema(0.99, debias=True, update_every=2, skip_nonfinite=False),
    ):
        assert _collectives(tx, params) == {}


def test_nonfinite_check_is_one_scalar_all_reduce():
    """With ``skip_nonfinite=True`` and params on a 1-D mesh (one leaf sharded, one
    replicated, one int leaf sharded) the compiled update's only collective on the path that
    always runs is one all-reduce of one scalar (the predicate); any other collective sits
    in a conditional branch and is a scalar all-reduce too. With ``update_every=3`` the
    check itself runs only on due steps, so the path that always runs has none."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    params = {
        "w": jax.device_put(jnp.ones((16, 3)), NamedSharding(mesh, P("data"))),
        "b": jax.device_put(jnp.ones(3), NamedSharding(mesh, P())),
        "n": jax.device_put(jnp.arange(8), NamedSharding(mesh, P("data"))),
    }
    guarded = {"skip_nonfinite": True}
    for tx, always in (
        (ema_jax.ema(0.9, **guarded), 1),
        (ema_jax.ema(0.9, debias=True, update_every=3, **guarded), 0),
    ):
        found = _collectives(tx, params)
        entry = found.pop("ENTRY", [])
        assert len(entry) == always and all(_is_scalar_all_reduce(*c) for c in entry), entry
        assert any(found.values()) or always, "the non-finite check must reach every shard"
        for ops in found.values():
            assert all(_is_scalar_all_reduce(*c) for c in ops), ops


def test_nonfinite_check_on_a_2d_mesh_reduces_only_scalars(mesh):
    """On a 4x2 mesh (a leaf sharded over both axes, a bf16 leaf over one) XLA
    reduces axis by axis, so there may be more than one all-reduce — but each carries only
    scalars; no parameter-sized data moves."""
    found = _collectives(
        ema_jax.ema(0.9, skip_nonfinite=True), _params(mesh, two_sharded_floats=True)
    )
    assert found.get("ENTRY"), "the non-finite check must reach every shard"
    for ops in found.values():
        assert all(_is_scalar_all_reduce(*c) for c in ops), ops


def test_skip_decision_is_global(mesh):
    """A NaN on one shard skips the update on every shard (the all-reduce is real)."""
    params = _params(mesh)
    tx = ema_jax.ema(0.5, skip_nonfinite=True)
    state = tx.init(params)
    bad = dict(params, w=params["w"].at[7, 3].set(jnp.nan))  # lives on the last device only
    bad["w"] = jax.device_put(bad["w"], params["w"].sharding)
    _, new_state = jax.jit(tx.update)(bad, state)
    assert int(new_state.num_skipped) == 1
    np.testing.assert_array_equal(np.asarray(new_state.ema["w"]), np.asarray(state.ema["w"]))
