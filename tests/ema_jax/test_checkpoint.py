"""ema_jax.checkpoint: real Orbax writes to tmp dirs, new processes, meshes, kills.

The subprocess side (and the tiny model both sides train) is tests/ema_jax/ckpt_worker.py.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ckpt_worker as w
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import free_port, run_together
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ema_jax
from ema_jax import checkpoint as ckpt

WORKER = str(Path(__file__).with_name("ckpt_worker.py"))
ROOT = str(Path(__file__).resolve().parents[2])
TIMEOUT = 180


def worker_env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_worker(*args: Any) -> None:
    proc = subprocess.run(
        [sys.executable, WORKER, *map(str, args)],
        env=worker_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def load_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)  # type: ignore[no-any-return]


def assert_bitwise(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert list(expected) == list(actual)
    for key, value in expected.items():
        got = actual[key]
        if key == ".step":  # a fresh target's Python-int step comes back as a Python int
            assert int(value) == int(got)
            continue
        assert np.asarray(value).dtype == np.asarray(got).dtype, key
        assert np.shape(value) == np.shape(got), key
        assert np.asarray(value).tobytes() == np.asarray(got).tobytes(), key


def assert_trees_bitwise(expected: Any, actual: Any) -> None:
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    assert_bitwise(w.host_leaves(expected), w.host_leaves(actual))


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def trained() -> ema_jax.EmaTrainState:
    """3 Adam steps with two averages; never donated by the tests."""
    return w.train(w.make_state(), 0, 3)


def saved(directory: Path, state: ema_jax.EmaTrainState, step: int = 3) -> None:
    with ckpt.manager(directory) as mngr:
        assert ckpt.save(mngr, step, state)


# 1. Bitwise resume across processes ---------------------------------------------------


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


# 2. EMA-only load ---------------------------------------------------------------------


def test_load_ema_params_reads_only_the_ema_item(tmp_path: Path, capsys: Any) -> None:
    # An Adam-trained model big enough for array bytes to dominate the metadata.
    state = w.train(w.make_state(extra=65536, ema=ema_jax.ema(0.999)), 0, 2)
    saved(tmp_path, state, step=2)
    step_dir = tmp_path / "2"
    total, ema_bytes = disk_bytes(step_dir), disk_bytes(step_dir / ckpt.EMA_PARAMS)
    ratio = ema_bytes / total
    with capsys.disabled():
        print(
            f"\n[checkpoint size] step dir {total} B, ema_params item {ema_bytes} B "
            f"= {100 * ratio:.1f}% (Adam, {ckpt.STATE} item {disk_bytes(step_dir / 'state')} B)"
        )
    assert ratio <= 0.40

    # Corrupt every file of the "state" item: only "ema_params" may be read.
    for f in (step_dir / ckpt.STATE).rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with ckpt.manager(tmp_path) as mngr, pytest.raises(Exception):  # noqa: B017
        ckpt.restore(mngr, state)  # the corruption is real
    for target in (None, state.ema_params):
        loaded = ckpt.load_ema_params(tmp_path, target=target)
        assert_trees_bitwise(state.ema_params, loaded)
    assert_trees_bitwise(state.ema_params, ckpt.load_ema_params(tmp_path, step=2))


def test_load_ema_params_multi_decay_tree(tmp_path: Path, trained: Any) -> None:
    saved(tmp_path, trained)
    assert_trees_bitwise(trained.ema_params, ckpt.load_ema_params(tmp_path, 3, trained.ema_params))
    # Without a target the tree is Orbax's: the K-tuple comes back as a list.
    loaded = ckpt.load_ema_params(tmp_path)
    assert isinstance(loaded, list)
    assert_trees_bitwise(trained.ema_params, tuple(loaded))


# 3. Dtypes are kept -------------------------------------------------------------------


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


def test_export_picks_one_average(tmp_path: Path, trained: Any) -> None:
    ckpt.export_ema_params(tmp_path / "second", trained, ema_index=1)
    assert_trees_bitwise(trained.ema_params[1], ckpt.load_exported(tmp_path / "second"))
    assert_trees_bitwise(trained.ema_params[0], ckpt.deploy_params(trained))
    with pytest.raises(ValueError, match=r"ema_index must be in \[0, 2\)"):
        ckpt.deploy_params(trained, ema_index=2)
    with pytest.raises(ValueError, match=r"ema_index must be in \[0, 2\)"):
        ckpt.deploy_params(trained, dtype=jnp.float32, ema_index=5)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        ckpt.deploy_params(trained, dtype=jnp.int32)


def test_export_with_averaged_model_state(tmp_path: Path) -> None:
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


# 4. Sharded ---------------------------------------------------------------------------


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


# 5. Multi-process ---------------------------------------------------------------------


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


# 6. Crash safety ----------------------------------------------------------------------


def tmp_dirs(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]


@pytest.mark.parametrize("moment", ["write", "commit"])
def test_sigkill_mid_save_leaves_previous_step(tmp_path: Path, moment: str) -> None:
    directory = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, WORKER, "crash", str(directory), moment],
        env=worker_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        marker = "SAVING" if moment == "write" else "COMMITTING"
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == marker:
                break
        else:
            pytest.fail(f"worker exited (rc={proc.wait()}) before {marker}")
        # "write": kill once array data of step 2 is on disk, while the rest is being written.
        deadline = time.monotonic() + 60
        while not any(f.is_file() for f in directory.glob("2.*/state*/**/*")):
            assert time.monotonic() < deadline, "step 2 never started writing"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The kill landed inside the save: step 2 exists only as Orbax's temporary directory.
    assert not (directory / "2").exists()
    assert any(p.name.startswith("2.") for p in tmp_dirs(directory))

    extra = w.EXTRA if moment == "write" else 0
    expected = w.train(w.make_state(extra=extra), 0, 1)
    with ckpt.manager(directory) as mngr:  # the next start: no exception
        assert mngr.latest_step() == 1
        assert list(mngr.all_steps()) == [1]
        assert_trees_bitwise(expected, ckpt.restore(mngr, w.make_state(extra=extra)))
        with pytest.raises(FileNotFoundError, match="step 2"):
            ckpt.restore(mngr, expected, step=2)
        assert_trees_bitwise(
            expected.ema_params, ckpt.load_ema_params(directory, 1, expected.ema_params)
        )
        # Training goes on and step 2 can be written again.
        assert ckpt.save(mngr, 2, w.train(expected, 1, 1))
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # tmp dir cleaned up


# 7. Mismatch is loud ------------------------------------------------------------------


def other_params(change: str) -> Any:
    params = w.make_params()
    if change == "extra_layer":
        params["zz"] = {"b": jnp.zeros(2)}
    elif change == "missing_layer":
        del params["out"]
    elif change == "shape":
        params["hidden"]["b"] = jnp.zeros(17)
    return params


MISMATCHES = {
    "single decay vs two": (
        lambda: w.make_state(ema=ema_jax.ema(0.9)),
        r"state\.ema_state\.weight has shape \(2,\) in the checkpoint, \(\) in the target",
    ),
    "three decays vs two": (
        lambda: w.make_state(ema=ema_jax.ema((0.9, 0.99, 0.999))),
        r"state\.ema_state\.weight has shape \(2,\) in the checkpoint, \(3,\) in the target",
    ),
    "bf16 accumulators": (
        lambda: w.make_state(ema=ema_jax.ema((0.9, 0.9), accumulator_dtype=jnp.bfloat16)),
        r"state\.ema_state\.ema\.hidden\.b has dtype float32 in the checkpoint, "
        r"bfloat16 in the target",
    ),
    "bf16 params": (
        lambda: w.make_state(dtype=jnp.bfloat16),
        r"state\.params\.hidden\.b has dtype float32 in the checkpoint, bfloat16",
    ),
    "extra layer": (
        lambda: w.make_state(params=other_params("extra_layer")),
        r"state\.params\.zz\.b is in the target but not in the checkpoint",
    ),
    "missing layer": (
        lambda: w.make_state(params=other_params("missing_layer")),
        r"out\.b is in the checkpoint but not in the target",
    ),
    "leaf shape": (
        lambda: w.make_state(params=other_params("shape")),
        r"state\.params\.hidden\.b has shape \(16,\) in the checkpoint, \(17,\) in the target",
    ),
    "param_dtypes": (
        lambda: w.make_state().replace(
            ema_state=w.make_state().ema_state.replace(param_dtypes=(np.dtype("float16"),) * 4)
        ),
        r"ema_state\.param_dtypes is \['float32', 'float32', 'float32', 'float32'\] in the "
        r"checkpoint, \['float16'",
    ),
}


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: Any, trained: Any) -> Path:
    directory = tmp_path_factory.mktemp("saved")
    saved(directory, trained)
    return directory  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatched_target_is_loud(saved_dir: Path, case: str) -> None:
    make_target, message = MISMATCHES[case]
    target = make_target()
    with ckpt.manager(saved_dir) as mngr:
        with pytest.raises(ValueError, match=message):
            ckpt.restore(mngr, target)
        with pytest.raises(ValueError, match=message):
            ckpt.restore(mngr, jax.eval_shape(lambda: target))


def test_mismatched_params_target_is_loud(saved_dir: Path, trained: Any, tmp_path: Path) -> None:
    wrong = (other_params("shape"), w.make_params())
    with pytest.raises(ValueError, match=r"ema_params\.0\.hidden\.b has shape \(16,\)"):
        ckpt.load_ema_params(saved_dir, target=wrong)
    with pytest.raises(ValueError, match=r"ema_params\.0\.hidden\.b has dtype float32 in the c"):
        ckpt.load_ema_params(saved_dir, target=jax.tree.map(jnp.bfloat16, trained.ema_params))
    ckpt.export_ema_params(tmp_path / "deploy", trained)
    with pytest.raises(ValueError, match=r"params\.zz\.b is in the target but not"):
        ckpt.load_exported(tmp_path / "deploy", other_params("extra_layer"))


def test_no_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    with ckpt.manager(tmp_path / "empty") as mngr:
        assert mngr.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(mngr, w.make_state())
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.load_ema_params(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="step 7 is not in"):
        ckpt.load_ema_params(tmp_path / "empty", step=7)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.load_ema_params(tmp_path / "never_created")
    with pytest.raises(FileNotFoundError, match="no Orbax checkpoint at"):
        ckpt.load_exported(tmp_path / "nothing")


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_to_keep must be >= 1"):
        ckpt.manager(tmp_path, max_to_keep=0)
    with pytest.raises(TypeError, match="save_interval_steps must be an int"):
        ckpt.manager(tmp_path, save_interval_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async_save must be a bool"):
        ckpt.manager(tmp_path, async_save="yes")  # type: ignore[arg-type]
    with ckpt.manager(tmp_path) as mngr:
        with pytest.raises(ValueError, match="step must be >= 0"):
            ckpt.save(mngr, -1, w.make_state())
        with pytest.raises(TypeError, match="state must be an EmaTrainState or an NNX object"):
            ckpt.save(mngr, 0, {"params": 1})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="step must be an int >= 0"):
            ckpt.restore(mngr, w.make_state(), step="last")  # type: ignore[arg-type]


# Round trip over random trees (property) ---------------------------------------------

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
