"""ema_jax.checkpoint: a restored state is the saved one, bit for bit: in a new process, in
other dtypes, on other meshes, from two processes, for random trees."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ckpt_worker as w
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ckpt_support import (
    ROOT,
    TIMEOUT,
    WORKER,
    assert_bitwise,
    assert_trees_bitwise,
    load_pickle,
    run_worker,
    saved,
    worker_env,
)
from helpers import free_port, run_together
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ema_jax
from ema_jax import checkpoint as ckpt

# Bitwise resume across processes ------------------------------------------------------


def test_resume_in_a_new_process_is_bitwise(tmp_path: Path) -> None:
    n = 3
    reference = w.train(w.make_state(), 0, 2 * n)
    half = w.train(w.make_state(), 0, n)
    mngr = ckpt.manager(tmp_path / "ckpt")  # async by default
    assert ckpt.save(mngr, n, half)
    # The save is still running; train on, donating the saved buffers.
    continued = w.train(half, n, n)
    mngr.wait_until_finished()
    mngr.close()
    out = tmp_path / "resumed.pkl"
    run_worker("resume", tmp_path / "ckpt", out, n)
    resumed = load_pickle(out)
    assert resumed[".step"] == 2 * n
    assert_bitwise(w.host_leaves(reference), resumed)
    assert_trees_bitwise(reference, continued)
    # Not vacuous: the second half of training changed every float leaf of the state.
    first_half = w.host_leaves(w.train(w.make_state(), 0, n))
    for key, value in w.host_leaves(reference).items():
        if np.issubdtype(value.dtype, np.floating) and ".ema_state.ema" in key:
            assert not np.array_equal(value, first_half[key]), key


def test_restore_defaults_to_latest_and_respects_manager_options(tmp_path: Path) -> None:
    state = w.make_state()
    with ckpt.manager(tmp_path, max_to_keep=2, save_interval_steps=2, async_save=False) as mngr:
        saves = {}
        for step in range(6):
            saves[step] = ckpt.save(mngr, step, state.replace(step=step))
        assert saves == {0: True, 1: False, 2: True, 3: False, 4: True, 5: False}
        assert list(mngr.all_steps()) == [2, 4]
        assert mngr.latest_step() == 4
        assert ckpt.restore(mngr, state).step == 4
        assert ckpt.restore(mngr, state, step=2).step == 2
        with pytest.raises(FileNotFoundError, match="step 0"):
            ckpt.restore(mngr, state, step=0)


# Dtypes are kept ----------------------------------------------------------------------


def test_fp32_accumulators_of_bf16_params_survive(tmp_path: Path) -> None:
    state = w.train(w.make_state(dtype=jnp.bfloat16, ema=ema_jax.ema(0.9)), 0, 3)
    accumulators = state.ema_state.ema
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(accumulators))
    # Not vacuous: the fp32 average holds values a bf16 round trip would lose.
    w_acc = np.asarray(accumulators["hidden"]["w"])
    assert not np.array_equal(w_acc, w_acc.astype(ml_dtypes.bfloat16).astype(np.float32))

    saved(tmp_path / "ckpt", state)
    with ckpt.manager(tmp_path / "ckpt") as mngr:
        restored = ckpt.restore(mngr, jax.eval_shape(lambda: state))
    assert_trees_bitwise(state, restored)
    assert restored.ema_state.param_dtypes == (np.dtype(jnp.bfloat16),) * 4

    ckpt.export_ema_params(tmp_path / "deploy", state)
    deployed = ckpt.load_exported(tmp_path / "deploy")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(deployed))
    assert_trees_bitwise(state.ema_params, deployed)

    ckpt.export_ema_params(tmp_path / "deploy32", state, dtype=jnp.float32)
    assert_trees_bitwise(accumulators, ckpt.load_exported(tmp_path / "deploy32"))
    with pytest.raises(ValueError, match="exists"):
        ckpt.export_ema_params(tmp_path / "deploy", state)
    ckpt.export_ema_params(tmp_path / "deploy", state, dtype=jnp.float32, force=True)
    assert_trees_bitwise(accumulators, ckpt.load_exported(tmp_path / "deploy", accumulators))


def test_averaged_model_state_is_restored_and_exported(tmp_path: Path) -> None:
    params = w.make_params()
    state = ema_jax.EmaTrainState.create(
        apply_fn=None,
        params=params,
        tx=w.TX,
        ema=ema_jax.ema(0.5),
        model_state={"mean": jnp.ones(3)},
        average_model_state=True,
    )
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
    assert_trees_bitwise(state.ema_params, ckpt.deploy_params(state))
    assert_trees_bitwise(state.ema_state.ema["params"], ckpt.deploy_params(state, dtype="float32"))
    saved(tmp_path, state, step=1)
    with ckpt.manager(tmp_path) as mngr:
        assert_trees_bitwise(state, ckpt.restore(mngr, state))
        plain = ema_jax.EmaTrainState.create(
            apply_fn=None, params=params, tx=state.tx, ema=state.ema, model_state={"mean": 0}
        )
        with pytest.raises(ValueError, match=r"ema_state\.ema\.(model_state|params)"):
            ckpt.restore(mngr, plain)


leaf_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
leaf_dtypes = st.sampled_from(["float32", "bfloat16", "float16", "int32"])
param_trees = st.dictionaries(
    st.text("abcdef", min_size=1, max_size=3),
    st.tuples(leaf_shapes, leaf_dtypes),
    min_size=1,
    max_size=4,
)


@settings(max_examples=6, deadline=None)
@given(spec=param_trees, seed=st.integers(0, 2**16))
def test_round_trip_of_random_trees(tmp_path_factory: Any, spec: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    params = {
        name: jnp.asarray(rng.normal(size=shape) * 10, dtype)
        for name, (shape, dtype) in spec.items()
    }
    state = ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=w.TX, ema=ema_jax.ema(0.5)
    )
    noisy = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    state = state.replace(params=noisy)
    state = state.replace(ema_state=state.ema.update(noisy, state.ema_state)[1])
    directory = tmp_path_factory.mktemp("prop")
    with ckpt.manager(directory, async_save=False) as mngr:
        ckpt.save(mngr, 0, state)
        assert_trees_bitwise(state, ckpt.restore(mngr, state))
    assert_trees_bitwise(state.ema_params, ckpt.load_ema_params(directory, target=params))


# Sharded ------------------------------------------------------------------------------


def fsdp(mesh: jax.sharding.Mesh) -> Any:
    """FSDP-style: matrices (and stacked accumulators) split along their first axis when it
    divides evenly, everything else replicated."""
    return lambda x: NamedSharding(
        mesh, P("fsdp") if np.ndim(x) >= 2 and np.shape(x)[0] % mesh.size == 0 else P()
    )


def test_sharded_save_restores_onto_other_meshes(tmp_path: Path, trained: Any) -> None:
    mesh8 = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
    mesh4 = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    assert mesh8.size == 8
    state = jax.device_put(trained, jax.tree.map(fsdp(mesh8), trained))
    w_ema = state.ema_state.ema["hidden"]["w"]  # two averages side by side: [8, 16, 2]
    assert len(w_ema.addressable_shards) == 8
    assert w_ema.addressable_shards[0].data.shape == (1, 16, 2)
    saved(tmp_path, state)

    single = SingleDeviceSharding(jax.devices()[5])
    for name, rule in (("4-device mesh", fsdp(mesh4)), ("1 device", lambda x: single)):
        target = jax.tree.map(
            lambda x, rule=rule: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rule(x)), trained
        )
        with ckpt.manager(tmp_path) as mngr:
            restored = ckpt.restore(mngr, target)
        assert_trees_bitwise(trained, restored)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
            assert got.sharding.is_equivalent_to(want.sharding, want.ndim), name
        ema_target = jax.tree.map(
            lambda x, rule=rule: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rule(x)),
            trained.ema_params,
        )
        loaded = ckpt.load_ema_params(tmp_path, target=ema_target)
        assert_trees_bitwise(trained.ema_params, loaded)
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(ema_target), strict=True):
            assert got.sharding.is_equivalent_to(want.sharding, want.ndim), name
    assert restored.params["hidden"]["w"].sharding == single
    # Spot check of the 4-device layout: 8 rows over 4 devices.
    on4 = jax.device_put(trained, jax.tree.map(fsdp(mesh4), trained))
    assert on4.params["hidden"]["w"].addressable_shards[0].data.shape == (2, 16)


# Multi-process ------------------------------------------------------------------------


def test_two_processes_train_save_and_restore_together(tmp_path: Path) -> None:
    steps, port = 3, free_port()
    out = tmp_path / "dp.pkl"
    argv = [sys.executable, WORKER, "dp", str(tmp_path / "ckpt"), str(out)]
    run_together(
        [([*argv, str(i), str(port), str(steps)], worker_env(devices=2)) for i in range(2)],
        cwd=ROOT,
        timeout=TIMEOUT,
    )

    result = load_pickle(out)
    trained = {k[len("['trained']") :]: v for k, v in result.items() if "['trained']" in k}
    restored = {k[len("['restored']") :]: v for k, v in result.items() if "['restored']" in k}
    assert_bitwise(trained, restored)  # the restore is exact
    # Same steps in one process on one device: equal up to float32 reduction order.
    reference = w.host_leaves(w.train(w.make_state(), 0, steps))
    assert list(reference) == list(trained)
    for key, value in reference.items():
        np.testing.assert_allclose(trained[key], value, rtol=2e-5, atol=2e-6, err_msg=key)
    # The 2-process checkpoint restores in a single process too.
    with ckpt.manager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == steps
        target = jax.eval_shape(w.make_state)  # no shardings: lands on this process's device 0
        assert_bitwise(trained, w.host_leaves(ckpt.restore(mngr, target)))
        ema_target = jax.eval_shape(lambda: w.make_state().ema_params)
        ema_params = ckpt.load_ema_params(tmp_path / "ckpt", target=ema_target)
    # float32 params: each shadow is its slice of the stacked accumulators, bit for bit
    ema_trained = {
        f"[{k}]{path[len('.ema_state.ema') :]}": value[..., k]
        for k in range(2)
        for path, value in trained.items()
        if ".ema_state.ema" in path
    }
    assert_bitwise(ema_trained, w.host_leaves(ema_params))
