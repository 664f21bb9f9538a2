"""Issue 17: the faults an adversarial probe found, one test per item (``test_item_<n>_...``).

Each test fails on the code before the fix (base 856731b). References are closed forms or
float64 loops written here, independent of ema_jax. docs/guarantees.md lists what each
test guarantees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ema_jax

OPT = optax.sgd(0.1)


# ------------------------------------------------------------------------ misuse (9-11)


def test_item_9_obscure_errors_name_the_argument(tmp_path):
    """Item 9: each misuse raises a clear error naming the argument or path."""
    from ema_jax import checkpoint as ckpt

    with pytest.raises(TypeError, match=r"mngr must be .*CheckpointManager.*got str"):
        ckpt.restore(str(tmp_path), None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- checkpoints (12-17)


def _state(seed: float = 0.0) -> ema_jax.EmaTrainState:
    params = {"w": jnp.arange(1024.0) + seed, "b": jnp.full((3,), seed, jnp.float32)}
    return ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=OPT, ema=ema_jax.ema(0.9))


def _flip_a_byte(directory) -> None:
    """Flips one bit in the middle of the largest data file under ``directory``."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
    data = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))


def test_item_12_one_writing_run_per_directory(tmp_path):
    """Item 12: a second writing manager of a directory (this process, or another one)
    raises naming the holder; readers keep working; the lock goes with its holder, even
    killed with SIGKILL (the kernel drops the flock), and with ``close()``."""
    import signal
    import subprocess
    import sys

    from ema_jax import checkpoint as ckpt

    d = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time\nfrom ema_jax import checkpoint as ckpt\n"
         f"m = ckpt.manager({str(d)!r})\nprint('ready', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(RuntimeError, match=rf"already open for writing .*pid {holder.pid}"):
            ckpt.manager(d)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with ckpt.manager(d, async_save=False) as mngr:  # the killed holder's lock is gone
        assert ckpt.save(mngr, 1, _state())
        with pytest.raises(RuntimeError, match=rf"pid {__import__('os').getpid()}"):
            ckpt.manager(d)  # a second writer in this process
        with ckpt.manager(d, read_only=True) as reader:  # readers do not need the lock
            assert reader.all_steps() == [1]
            np.testing.assert_array_equal(
                ckpt.restore(reader, _state(5.0)).params["w"], _state().params["w"]
            )
            with pytest.raises(ValueError, match="read-only"):
                ckpt.save(reader, 2, _state())
        np.testing.assert_array_equal(ckpt.load_ema_params(d)["b"], np.zeros(3))
    ckpt.manager(d).close()  # released by close()


def test_item_13_rollback_is_refused_unless_overwrite(tmp_path):
    """Item 13: after ``restore(step=1)`` of steps 1-3, saving step 2 raises (the abandoned
    steps 2, 3 would stay as if current); ``overwrite=True`` deletes them first."""
    from ema_jax import checkpoint as ckpt

    with ckpt.manager(tmp_path, async_save=False) as mngr:
        for step in (1, 2, 3):
            ckpt.save(mngr, step, _state(step))
        state = ckpt.restore(mngr, _state(), step=1)
        with pytest.raises(ValueError, match=r"steps \[2, 3\] are saved already.*overwrite=True"):
            ckpt.save(mngr, 2, state)
        assert mngr.all_steps() == [1, 2, 3]
        assert ckpt.save(mngr, 2, _state(20.0), overwrite=True)
        assert mngr.all_steps() == [1, 2] and not (tmp_path / "3").exists()
        np.testing.assert_array_equal(ckpt.restore(mngr, _state()).params["b"], np.full(3, 20.0))


def test_item_14_failed_save_keeps_the_previous_step(tmp_path, monkeypatch):
    """Item 14: an async save that fails in the background (ENOSPC from a write) with
    ``max_to_keep=1``: the manager still lists and restores the intact previous step."""
    import errno

    import orbax.checkpoint as ocp

    from ema_jax import checkpoint as ckpt

    class NoSpace:
        def result(self, timeout=None):
            raise OSError(errno.ENOSPC, "No space left on device")

    write = ocp.StandardCheckpointHandler.async_save

    async def failing_write(self, *args, **kwargs):
        return [*(await write(self, *args, **kwargs) or []), NoSpace()]

    with ckpt.manager(tmp_path, max_to_keep=1) as mngr:
        ckpt.save(mngr, 1, _state(1.0))
        mngr.wait_until_finished()
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_write)
        with pytest.raises(OSError, match="No space left"):
            ckpt.save(mngr, 2, _state(2.0))
            mngr.wait_until_finished()
        monkeypatch.undo()
        assert mngr.all_steps() == [1]
        np.testing.assert_array_equal(ckpt.restore(mngr, _state()).params["b"], np.ones(3))


def test_item_15_corruption_is_detected(tmp_path):
    """Item 15: one flipped bit in a data file of an export, of a step's ``ema_params``
    item, or (``checksum_state=True``) of its ``state`` item raises naming the leaf."""
    from ema_jax import checkpoint as ckpt

    ckpt.export_ema_params(tmp_path / "export", _state())
    np.testing.assert_array_equal(ckpt.load_exported(tmp_path / "export")["b"], np.zeros(3))
    _flip_a_byte(tmp_path / "export")
    with pytest.raises(ValueError, match=r"export is corrupt: w does not match the checksum"):
        ckpt.load_exported(tmp_path / "export")
    with ckpt.manager(tmp_path / "run", async_save=False) as mngr:
        ckpt.save(mngr, 1, _state(), checksum_state=True)
        _flip_a_byte(tmp_path / "run" / "1" / "ema_params")
        with pytest.raises(ValueError, match=r"step 1 in .* is corrupt: w does not match"):
            ckpt.load_ema_params(tmp_path / "run")
        ckpt.restore(mngr, _state())  # the state item is intact
        _flip_a_byte(tmp_path / "run" / "1" / "state")
        with pytest.raises(ValueError, match=r"state item of step 1 .* is corrupt"):
            ckpt.restore(mngr, _state())


def test_item_16_damaged_metadata_names_step_file_and_earlier_step(tmp_path):
    """Item 16: a truncated or missing ``_METADATA`` of a step raises naming the step and
    the file, and that an earlier step restores (which it does)."""
    from ema_jax import checkpoint as ckpt

    with ckpt.manager(tmp_path, async_save=False) as mngr:
        for step in (1, 2):
            ckpt.save(mngr, step, _state(step))
        meta = tmp_path / "2" / "state" / "_METADATA"
        meta.write_bytes(meta.read_bytes()[:40])  # truncated
        with pytest.raises(ValueError, match=r"step 2 in .* state/_METADATA .* unreadable.*step=1"):
            ckpt.restore(mngr, _state())
        meta.unlink()  # missing
        with pytest.raises(ValueError, match=r"step 2 in .* state/_METADATA .* missing.*step=1"):
            ckpt.restore(mngr, _state())
        np.testing.assert_array_equal(ckpt.restore(mngr, _state(), step=1).params["b"], np.ones(3))
        (tmp_path / "2" / "ema_params" / "_METADATA").unlink()
        with pytest.raises(ValueError, match=r"step 2 in .* ema_params/_METADATA .*step=1"):
            ckpt.load_ema_params(tmp_path)


def test_item_17_export_exists_and_donated_state(tmp_path):
    """Item 17: exporting into an existing path says ``force=True``; saving or exporting a
    donated (deleted) state names the leaf and leaves nothing on disk."""
    from ema_jax import checkpoint as ckpt

    ckpt.export_ema_params(tmp_path / "export", _state())
    with pytest.raises(ValueError, match="already exists: pass force=True"):
        ckpt.export_ema_params(tmp_path / "export", _state())
    ckpt.export_ema_params(tmp_path / "export", _state(1.0), force=True)
    np.testing.assert_array_equal(ckpt.load_exported(tmp_path / "export")["b"], np.ones(3))
    donated = _state()
    jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else x, donated)
    with (
        ckpt.manager(tmp_path / "run") as mngr,
        pytest.raises(ValueError, match=r"state\.step was deleted \(donated"),
    ):
        ckpt.save(mngr, 1, donated)
    with pytest.raises(ValueError, match=r"state\.step was deleted"):
        ckpt.export_ema_params(tmp_path / "export2", donated)
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")]
    assert leftovers == [] and not (tmp_path / "export2").exists()
