"""ema_jax.checkpoint: what the checksum detects (every change of one or two elements),
checksums of 0.1.0 still verified, exports replaced atomically, unreadable arrays and
steps pruned while read named for what they are."""

from __future__ import annotations

import signal
from pathlib import Path

import ckpt_worker as w
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ckpt_support import assert_trees_bitwise, kill_worker_inside, small_state

from ema_jax import checkpoint as ckpt
from ema_jax.checkpoint import integrity, items

# The checksum ------------------------------------------------------------------------


def checksum(x: np.ndarray) -> int:
    return integrity.checksums({"x": jnp.asarray(x)})["x"]


def with_bits(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``x`` with its raw bits replaced (same dtype and shape)."""
    return bits.view(x.dtype).reshape(x.shape)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "complex64"])
def test_every_single_bit_flip_changes_the_checksum(dtype: str) -> None:
    x = np.random.default_rng(0).normal(size=6).astype(np.dtype(ml_dtypes.bfloat16)
        if dtype == "bfloat16" else np.float32)  # fmt: skip
    x = (x * 50).astype(np.int8) if dtype == "int8" else x
    x = (x + 1j * x[::-1]).astype(np.complex64) if dtype == "complex64" else x
    raw = np.frombuffer(x.tobytes(), np.uint8)
    reference = checksum(x)
    flips = 0
    for byte in range(raw.size):
        for bit in range(8):
            bits = raw.copy()
            bits[byte] ^= 1 << bit
            assert checksum(with_bits(x, bits)) != reference, (byte, bit)
            flips += 1
    assert flips == 8 * x.nbytes


def test_every_change_of_two_elements_changes_the_checksum() -> None:
    """Random pairs of changed float32 elements, and the structured changes a position-
    weighted sum mod 2^32 misses: two weights negated (two sign-bit flips), a swap, equal
    and opposite changes of two words."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=257).astype(np.float32)
    words = x.view(np.uint32)
    reference = checksum(x)
    old = integrity.checksums({"x": jnp.asarray(x)}, integrity.WORD_SUM)["x"]
    missed_by_word_sum = 0
    for trial in range(600):
        i, j = rng.choice(x.size, 2, replace=False)
        changed = words.copy()
        if trial % 3 == 0:  # negate both: flips bit 31 of each
            changed[[i, j]] ^= np.uint32(1 << 31)
        elif trial % 3 == 1:  # swap
            changed[[i, j]] = changed[[j, i]]
        else:  # any two new words
            changed[[i, j]] = rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
        if np.array_equal(changed, words):
            continue
        y = changed.view(np.float32)
        assert checksum(y) != reference, (trial, i, j)
        missed_by_word_sum += (
            integrity.checksums({"x": jnp.asarray(y)}, integrity.WORD_SUM)["x"] == old
        )
    # Not vacuous: 0.1.0's checksum misses every negated pair (200 of them).
    assert missed_by_word_sum >= 200


def test_negating_two_exported_weights_is_detected(tmp_path: Path) -> None:
    state = small_state(1.0)
    ckpt.export_ema_params(tmp_path / "export", state)
    params = state.ema_params
    negated = {**params, "w": params["w"].at[jnp.array([3, 700])].multiply(-1)}
    saved = items.metadata(str(tmp_path / "export"))
    with pytest.raises(ValueError, match=r"is corrupt: w does not match"):
        integrity.verify(negated, items.custom(saved), "the export")
    integrity.verify(params, items.custom(saved), "the export")  # the intact tree passes


def test_checksums_written_by_earlier_versions_are_still_verified(tmp_path: Path) -> None:
    """An artefact whose metadata holds checksums without a kind (0.1.0) is verified with
    0.1.0's function: it loads, and a flipped bit is still found."""
    params = small_state(2.0).ema_params
    old = {integrity.CHECKSUMS: integrity.checksums(params, integrity.WORD_SUM)}
    path = tmp_path / "old_export"
    items.write(str(path), params)  # then its metadata as 0.1.0 wrote it:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path, args=ocp.args.StandardSave(params, custom_metadata={"ema_jax": old}), force=True
        )
    assert_trees_bitwise(params, ckpt.load_exported(path))
    with pytest.raises(ValueError, match="does not match the checksum"):
        integrity.verify({**params, "b": params["b"] + 1}, old, "the old export")


# Exports are replaced atomically -----------------------------------------------------


def test_sigkill_during_a_forced_export_keeps_the_old_export(tmp_path: Path) -> None:
    path = tmp_path / "deploy"
    # Killed once array data of the new export is on disk, while the rest is written.
    returncode = kill_worker_inside(
        ["export", str(path)],
        "EXPORTING",
        lambda: any(f.is_file() for f in tmp_path.glob("*orbax-checkpoint-tmp*/d/*")),
    )
    assert returncode == -signal.SIGKILL
    old = w.train(w.make_state(), 0, 1)
    assert_trees_bitwise(old.ema_params[0], ckpt.load_exported(path, old.ema_params[0]))
    # The next export replaces it, and what the killed one left beside it is cleared.
    ckpt.export_ema_params(path, small_state(), force=True)
    np.testing.assert_array_equal(ckpt.load_exported(path)["b"], np.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]


def test_a_failed_forced_export_keeps_the_old_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails half-way (an error from the array writer) leaves the old export
    whole and loadable."""
    path = tmp_path / "deploy"
    ckpt.export_ema_params(path, small_state(1.0))

    async def failing_write(self: object, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_write)
    with pytest.raises(OSError, match="No space left"):
        ckpt.export_ema_params(path, small_state(2.0), force=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(ckpt.load_exported(path)["b"], np.ones(3))


# Unreadable or vanished arrays -------------------------------------------------------


@pytest.mark.parametrize("damage", ["manifest", "array data"])
def test_unreadable_arrays_name_the_step_item_and_earlier_step(tmp_path: Path, damage: str) -> None:
    """Files of an item overwritten after writing: Orbax's and TensorStore's error (a
    pybind11 exception with pages of spec) becomes one line, a ``ValueError`` naming the
    step, the item and the step that restores, with the original as its cause."""
    with ckpt.manager(tmp_path, async_save=False) as mngr:
        for step in (1, 2):
            ckpt.save(mngr, step, small_state(step))
    item = tmp_path / "2" / "ema_params"
    files = [f for f in item.rglob("*") if f.is_file()]
    if damage == "manifest":
        files = [f for f in files if f.name == "manifest.ocdbt"]
    else:
        files = [f for f in files if f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"\x00garbage")
    with pytest.raises(
        ValueError, match=r"step 2 in .* is damaged: its ema_params.*step=1"
    ) as caught:
        ckpt.load_ema_params(tmp_path)
    assert caught.value.__cause__ is not None
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 800
    np.testing.assert_array_equal(ckpt.load_ema_params(tmp_path, step=1)["b"], np.ones(3))


def test_a_polling_reader_sees_new_steps_and_names_a_pruned_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``read_only`` manager opened before the writer saved sees every new step (its
    ``latest_step``, ``all_steps`` and ``restore``); a step the writer prunes while the
    reader reads it raises ``FileNotFoundError`` saying so, not "damaged"."""
    writer = ckpt.manager(tmp_path, max_to_keep=2, async_save=False)
    reader = ckpt.manager(tmp_path, read_only=True)
    try:
        assert reader.latest_step() is None
        for step in (1, 2, 3):
            ckpt.save(writer, step, small_state(step))
            assert reader.latest_step() == step
            np.testing.assert_array_equal(
                ckpt.restore(reader, small_state()).params["b"], np.full(3, float(step))
            )
        assert reader.all_steps() == [2, 3]
        read = items.metadata

        def writer_saves_meanwhile(*args: object, **kwargs: object) -> object:
            ckpt.save(writer, 4, small_state(4.0))  # prunes step 2
            ckpt.save(writer, 5, small_state(5.0))  # prunes step 3
            return read(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(items, "metadata", writer_saves_meanwhile)
        with pytest.raises(FileNotFoundError, match=r"step 3 in .* was deleted while it was "
                           r"read: its writer pruned it") as caught:  # fmt: skip
            ckpt.restore(reader, small_state())
        assert "damaged" not in str(caught.value)
        monkeypatch.undo()
        assert reader.latest_step() == 5
    finally:
        writer.close()
        reader.close()
