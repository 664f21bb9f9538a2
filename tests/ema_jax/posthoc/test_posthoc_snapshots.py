"""ema_jax.posthoc's snapshots on disk: round trip, streaming memory, sharded targets,
mismatched snapshots, stored dtypes, complex params. (The snapshot manager's guarantees,
one writer and a failed save keeping the intact snapshots, are tested with the training
manager's in tests/ema_jax/checkpoint/test_checkpoint_safety.py.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from posthoc_support import PF, linen_run, tree
from test_posthoc_synthesis import complex128_reference, complex_snapshots

import ema_jax
from ema_jax import posthoc


def test_directory_round_trip(tmp_path: Path) -> None:
    """Snapshots written with Orbax (all kept) synthesize to what the in-memory snapshots do,
    in the params' dtypes, with and without a target; a target that differs names the path."""
    directory = tmp_path / "posthoc"
    memory = linen_run(directory)
    assert sorted(int(p) for p in os.listdir(directory)) == list(range(4, 25, 4))
    want = posthoc.synthesize(memory, 0.08, step=20)
    got = posthoc.synthesize_from(directory, 0.08, step=20)
    assert (
        got["dense"]["kernel"].dtype == jnp.bfloat16 and got["dense"]["bias"].dtype == jnp.float32
    )
    tree_allclose(
        got,
        jax.tree.map(lambda w, g: w.astype(g.dtype), want, got),
        rtol=1e-6,
    )
    target = jax.eval_shape(lambda: want)
    assert jax.tree.structure(
        posthoc.synthesize_from(directory, 0.08, target=target)
    ) == jax.tree.structure(target)
    with pytest.raises(
        ValueError, match=r"averages.dense.bias has shape \(3,\) in the snapshots, \(4,\)"
    ):
        posthoc.synthesize_from(
            directory,
            0.08,
            target={
                "dense": {
                    "kernel": target["dense"]["kernel"],
                    "bias": jax.ShapeDtypeStruct((4,), jnp.float32),
                }
            },
        )
    with pytest.raises(ValueError, match=r"every snapshot is after out_step=2 \(the earliest"):
        posthoc.synthesize_from(directory, 0.08, step=2)
    with pytest.raises(FileNotFoundError, match="no snapshots in"):
        posthoc.synthesize_from(tmp_path, 0.08)


def _peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def test_streaming_memory_stays_at_one_snapshot_plus_output(tmp_path: Path) -> None:
    """12 snapshots of 2 × 8 MB: synthesize_from's peak RSS rise stays under 5 snapshots'
    worth (80 MB; measured 55-59 MB: two snapshots, the one added and the next read
    meanwhile, Orbax's read buffers, the output; 238 MB if every snapshot is read before
    summing) where holding them all would take 192 MB. Peak RSS via VmHWM after
    resetting it (``/proc/self/clear_refs``)."""
    n = 2 * 1024 * 1024  # float32 values per average: 8 MB
    leaves = {f"l{i}": jnp.zeros((n // 4,), jnp.float32) for i in range(4)}
    with posthoc.snapshot_manager(tmp_path, async_save=False) as mngr:
        for s in range(1, 13):
            trees = [jax.tree.map(lambda x, s=s, j=j: x + s + j, leaves) for j in range(2)]
            posthoc.save_snapshot(mngr, 100 * s, trees)
    del trees
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss()
    out = posthoc.synthesize_from(tmp_path, 0.12)
    jax.block_until_ready(out)
    rise = _peak_rss_since_reset() - before
    snapshot = 2 * 4 * n
    print(
        f"peak RSS rise {rise / 2**20:.1f} MiB; one snapshot {snapshot / 2**20:.0f} MiB, "
        f"all {12 * snapshot / 2**20:.0f} MiB"
    )
    assert rise < 5 * snapshot, rise / 2**20


def test_sharded_target_lands_sharded(tmp_path: Path) -> None:
    """On 8 host CPU devices (tests/conftest.py): sharded params recorded, synthesized onto
    a target sharded another way: every leaf lands with the target's sharding (not the
    recorded one), values as in memory."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {"w": P("data", "model"), "b": P()}
    sharding = {k: NamedSharding(mesh, v) for k, v in specs.items()}
    params = jax.device_put({"w": jnp.arange(32.0).reshape(8, 4), "b": jnp.ones(4)}, sharding)
    tx = ema_jax.ema((PF(sigma_rel=0.05), PF(sigma_rel=0.10)), skip_nonfinite=False)
    state = tx.init(params)
    step = jax.jit(tx.update)
    memory = []
    with posthoc.snapshot_manager(tmp_path) as mngr:
        for t in range(1, 13):
            params = jax.tree.map(lambda p: p * 1.1 + 1.0, params)
            _, state = step(params, state)
            if t % 3 == 0:
                posthoc.save_snapshot(mngr, t, state)
                memory += [
                    (t, 0.05, ema_jax.accumulators(state, 0)),
                    (t, 0.10, ema_jax.accumulators(state, 1)),
                ]
    # Another layout than the recorded one: each snapshot is read straight into it.
    wanted = {"w": NamedSharding(mesh, P(None, "data")), "b": NamedSharding(mesh, P("model"))}
    target = {
        k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=wanted[k]) for k, x in params.items()
    }
    got = posthoc.synthesize_from(tmp_path, 0.07, target=target)
    for name, leaf in got.items():
        assert leaf.sharding.is_equivalent_to(wanted[name], leaf.ndim), (name, leaf.sharding)
    tree_allclose(got, posthoc.synthesize(memory, 0.07), rtol=1e-6)


def test_directory_with_mismatched_snapshots_names_the_path(tmp_path: Path) -> None:
    with posthoc.snapshot_manager(tmp_path, async_save=False) as mngr:
        posthoc.save_snapshot(mngr, 10, [tree(), tree(1)])
        posthoc.save_snapshot(mngr, 20, [{"w": jnp.ones((2, 3))}] * 2)
        with pytest.raises(ValueError, match="sigma_rels gives 1"):
            posthoc.save_snapshot(mngr, 30, [tree(), tree()], sigma_rels=(0.05,))
    with pytest.raises(
        ValueError,
        match=r"averages.b is in the snapshot of step 10 but not in the snapshot of step 20",
    ):
        posthoc.synthesize_from(tmp_path, 0.1)


def test_snapshots_in_a_chosen_dtype_synthesize_in_the_params_dtype(tmp_path: Path) -> None:
    """``dtype=bfloat16`` stores bf16 (half the bytes); the result is in the params' float32,
    equal to synthesizing the bf16-rounded snapshots."""
    trees = [{"w": jnp.linspace(0.0, 1.0, 6) + 0.001 * j} for j in range(4)]
    with posthoc.snapshot_manager(tmp_path, async_save=False) as mngr:
        posthoc.save_snapshot(mngr, 10, trees[:2], dtype=jnp.bfloat16)
        posthoc.save_snapshot(mngr, 20, trees[2:], dtype=jnp.bfloat16)
    got = posthoc.synthesize_from(tmp_path, 0.12)
    assert got["w"].dtype == jnp.float32
    rounded = [jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), t) for t in trees]
    steps_sigmas = [(10, 0.05), (10, 0.10), (20, 0.05), (20, 0.10)]
    want = posthoc.synthesize(
        [(s, g, t) for (s, g), t in zip(steps_sigmas, rounded, strict=True)], 0.12
    )
    tree_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_complex_snapshots_keep_their_imaginary_part(tmp_path: Path, dtype: Any) -> None:
    """Complex params written as snapshots (whatever real ``dtype`` the snapshots are
    stored in) synthesize from the directory to the complex128 reference, in complex64."""
    snapshots = complex_snapshots()
    with posthoc.snapshot_manager(tmp_path, async_save=False) as mngr:
        for i in range(0, len(snapshots), 2):
            step = snapshots[i][0]
            trees = [jax.tree.map(jnp.asarray, snapshots[i + j][2]) for j in range(2)]
            posthoc.save_snapshot(mngr, step, trees, dtype=dtype)
    got = posthoc.synthesize_from(tmp_path, 0.08)
    want = complex128_reference(snapshots, 0.08)
    assert got["z"].dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(got["z"]), want["z"], rtol=1e-5, atol=1e-5)


def test_several_widths_are_synthesized_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``synthesize_from(d, [σ_1..σ_K])`` reads each snapshot once and gives, in order, what
    K separate calls give (and what the in-memory synthesis gives)."""
    from ema_jax.posthoc import snapshots

    memory = linen_run(tmp_path / "posthoc")
    widths = [0.03, 0.08, 0.12, 0.2]
    reads: list[int] = []
    original = snapshots.Snapshot.read

    def counted(self: Any, target: Any, *args: Any) -> Any:
        reads.append(self.step)
        return original(self, target, *args)

    monkeypatch.setattr(snapshots.Snapshot, "read", counted)
    together = posthoc.synthesize_from(tmp_path / "posthoc", widths, step=20)
    assert sorted(reads) == [4, 8, 12, 16, 20]  # once each; step 24 is after step=20
    assert isinstance(together, list) and len(together) == len(widths)
    for sigma, got in zip(widths, together, strict=True):
        tree_allclose(got, posthoc.synthesize_from(tmp_path / "posthoc", sigma, step=20), rtol=0)
        want = posthoc.synthesize(memory, sigma, step=20)
        tree_allclose(got, jax.tree.map(lambda w, g: w.astype(g.dtype), want, got), rtol=1e-6)


def _bytes_under(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_snapshots_are_written_uncompressed_and_compressed_ones_still_synthesize(
    tmp_path: Path,
) -> None:
    """``save_snapshot`` stores the arrays as they are (constant arrays take their full
    size on disk, so reading them back is a copy, not a decompression); snapshots written
    compressed, as earlier versions wrote them, synthesize to the same values."""
    from ema_jax.posthoc import snapshots

    raw = 2 * 3 * 4 * 256 * 256  # float32 bytes of 3 snapshots of 2 averages
    written = {}
    for name, compress in (("uncompressed", False), ("compressed", True)):
        directory = tmp_path / name
        mngr = snapshots.open_manager(
            directory, (snapshots.ITEM,), async_save=False, compress=compress
        )
        with mngr:
            for s in (10, 20, 30):
                trees = [{"w": jnp.full((256, 256), s + j, jnp.float32)} for j in range(2)]
                posthoc.save_snapshot(mngr, s, trees)
        written[name] = _bytes_under(directory)
    assert written["uncompressed"] >= raw > 10 * written["compressed"], written
    tree_allclose(
        posthoc.synthesize_from(tmp_path / "uncompressed", 0.08),
        posthoc.synthesize_from(tmp_path / "compressed", 0.08),
        rtol=0,
    )
