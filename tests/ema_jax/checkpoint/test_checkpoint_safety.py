"""ema_jax.checkpoint: nothing lost, nothing silently wrong: a killed save, two writers, a
run that went back, a failed save, flipped bits, damaged metadata, donated buffers; the
post-hoc snapshot manager keeps the same guarantees."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import ckpt_worker as w
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ckpt_support import (
    ROOT,
    assert_trees_bitwise,
    flip_a_byte,
    kill_worker_inside,
    small_state,
)

from ema_jax import checkpoint as ckpt
from ema_jax import posthoc

# Crash safety -------------------------------------------------------------------------


def tmp_dirs(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]


@pytest.mark.parametrize("moment", ["write", "commit"])
def test_sigkill_mid_save_leaves_previous_step(tmp_path: Path, moment: str) -> None:
    directory = tmp_path / "ckpt"
    marker = "SAVING" if moment == "write" else "COMMITTING"
    # "write": killed once array data of step 2 is on disk, while the rest is being written.
    returncode = kill_worker_inside(
        ["crash", str(directory), moment],
        marker,
        lambda: any(f.is_file() for f in directory.glob("2.*/state*/**/*")),
    )
    assert returncode == -signal.SIGKILL
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
            expected.ema_params, ckpt.load_ema_params(directory, expected.ema_params, 1)
        )
        # Training goes on and step 2 can be written again.
        assert ckpt.save(mngr, 2, w.train(expected, 1, 1))
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # tmp dir cleaned up


# One writer per directory -------------------------------------------------------------


def test_one_writing_run_per_directory(tmp_path: Path) -> None:
    """A second writing manager of a directory (this process, or another one) raises
    naming the holder; readers keep working; the lock goes with its holder, even killed
    with SIGKILL (the kernel drops the flock), and with ``close()``."""
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
        assert ckpt.save(mngr, 1, small_state())
        with pytest.raises(RuntimeError, match=rf"pid {os.getpid()}"):
            ckpt.manager(d)  # a second writer in this process
        with ckpt.manager(d, read_only=True) as reader:  # readers do not need the lock
            assert reader.all_steps() == [1]
            np.testing.assert_array_equal(
                ckpt.restore(reader, small_state(5.0)).params["w"], small_state().params["w"]
            )
            with pytest.raises(ValueError, match="read-only"):
                ckpt.save(reader, 2, small_state())
        np.testing.assert_array_equal(ckpt.load_ema_params(d)["b"], np.zeros(3))
    ckpt.manager(d).close()  # released by close()


def test_without_fcntl_the_package_imports_and_a_writer_warns(tmp_path: Path) -> None:
    """Where ``fcntl`` does not exist (Windows), ``ema_jax.checkpoint`` still imports; a
    writing manager works without the lock and says so with a ``UserWarning``."""
    script = (
        "import sys, warnings\n"
        "sys.modules['fcntl'] = None  # what `import fcntl` finds on Windows: ImportError\n"
        "from ema_jax import checkpoint as ckpt\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    ckpt.manager({str(tmp_path)!r}).close()\n"
        "print([str(c.message) for c in caught if c.category is UserWarning])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no fcntl" in proc.stdout and "without the one-writer lock" in proc.stdout


# Going back, failing, damage ----------------------------------------------------------


def test_rollback_is_refused_unless_overwrite(tmp_path: Path) -> None:
    """After ``restore(step=1)`` of steps 1-3, saving step 2 raises (the abandoned steps 2,
    3 would stay as if current); ``overwrite=True`` deletes them first."""
    with ckpt.manager(tmp_path, async_save=False) as mngr:
        for step in (1, 2, 3):
            ckpt.save(mngr, step, small_state(step))
        state = ckpt.restore(mngr, small_state(), step=1)
        with pytest.raises(ValueError, match=r"steps \[2, 3\] are saved already.*overwrite=True"):
            ckpt.save(mngr, 2, state)
        assert mngr.all_steps() == [1, 2, 3]
        assert ckpt.save(mngr, 2, small_state(20.0), overwrite=True)
        assert mngr.all_steps() == [1, 2] and not (tmp_path / "3").exists()
        np.testing.assert_array_equal(
            ckpt.restore(mngr, small_state()).params["b"], np.full(3, 20.0)
        )


class NoSpace:
    """A background write that fails: what an ``ocp`` future of a full disk raises."""

    def result(self, timeout: Any = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def fail_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every later item save fails in the background (ENOSPC): Orbax's
    ``PyTreeCheckpointHandler`` writes them all (training items through the standard
    handler, snapshots uncompressed directly)."""
    write = ocp.PyTreeCheckpointHandler.async_save

    async def failing_write(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return [*(await write(self, *args, **kwargs) or []), NoSpace()]

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", failing_write)


def test_failed_save_keeps_the_previous_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async save that fails in the background (ENOSPC from a write) with
    ``max_to_keep=1``: the manager still lists and restores the intact previous step."""
    with ckpt.manager(tmp_path, max_to_keep=1) as mngr:
        ckpt.save(mngr, 1, small_state(1.0))
        mngr.wait_until_finished()
        fail_writes(monkeypatch)
        with pytest.raises(OSError, match="No space left"):
            ckpt.save(mngr, 2, small_state(2.0))
            mngr.wait_until_finished()
        monkeypatch.undo()
        assert mngr.all_steps() == [1]
        np.testing.assert_array_equal(ckpt.restore(mngr, small_state()).params["b"], np.ones(3))


def test_failed_snapshot_save_keeps_the_intact_snapshots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Post-hoc snapshots are written by the same manager: a snapshot save that fails in
    the background (ENOSPC) leaves the snapshots written before listed, and they
    synthesize as before."""
    trees = [small_state(1.0).params, small_state(2.0).params]
    with posthoc.snapshot_manager(tmp_path) as mngr:
        posthoc.save_snapshot(mngr, 10, trees)
        mngr.wait_until_finished()
        fail_writes(monkeypatch)
        with pytest.raises(OSError, match="No space left"):
            posthoc.save_snapshot(mngr, 20, trees)
            mngr.wait_until_finished()
        monkeypatch.undo()
        assert mngr.all_steps() == [10]
    want = posthoc.synthesize([(10, 0.05, trees[0]), (10, 0.10, trees[1])], 0.1)
    np.testing.assert_array_equal(posthoc.synthesize_from(tmp_path, 0.1)["b"], want["b"])


def test_a_second_snapshot_writer_is_refused(tmp_path: Path) -> None:
    """One writing run per snapshot directory, as for training checkpoints; reading needs
    no lock."""
    with posthoc.snapshot_manager(tmp_path, async_save=False) as mngr:
        posthoc.save_snapshot(mngr, 10, [small_state().params] * 2)
        with pytest.raises(RuntimeError, match=rf"already open for writing .*pid {os.getpid()}"):
            posthoc.snapshot_manager(tmp_path)
        assert posthoc.synthesize_from(tmp_path, 0.1)["w"].shape == (1024,)
    posthoc.snapshot_manager(tmp_path).close()  # released by close()


def test_corruption_is_detected(tmp_path: Path) -> None:
    """One flipped bit in a data file of an export, of a step's ``ema_params`` item, or
    (``checksum_state=True``) of its ``state`` item raises naming the leaf."""
    ckpt.export_ema_params(tmp_path / "export", small_state())
    np.testing.assert_array_equal(ckpt.load_exported(tmp_path / "export")["b"], np.zeros(3))
    flip_a_byte(tmp_path / "export")
    with pytest.raises(ValueError, match=r"export is corrupt: w does not match the checksum"):
        ckpt.load_exported(tmp_path / "export")
    with ckpt.manager(tmp_path / "run", async_save=False) as mngr:
        ckpt.save(mngr, 1, small_state(), checksum_state=True)
        flip_a_byte(tmp_path / "run" / "1" / "ema_params")
        with pytest.raises(ValueError, match=r"step 1 in .* is corrupt: w does not match"):
            ckpt.load_ema_params(tmp_path / "run")
        ckpt.restore(mngr, small_state())  # the state item is intact
        flip_a_byte(tmp_path / "run" / "1" / "state")
        with pytest.raises(ValueError, match=r"state item of step 1 .* is corrupt"):
            ckpt.restore(mngr, small_state())


def test_damaged_metadata_names_step_file_and_earlier_step(tmp_path: Path) -> None:
    """A truncated or missing ``_METADATA`` of a step raises naming the step and the file,
    and that an earlier step restores (which it does)."""
    with ckpt.manager(tmp_path, async_save=False) as mngr:
        for step in (1, 2):
            ckpt.save(mngr, step, small_state(step))
        meta = tmp_path / "2" / "state" / "_METADATA"
        meta.write_bytes(meta.read_bytes()[:40])  # truncated
        with pytest.raises(ValueError, match=r"step 2 in .* state/_METADATA .* unreadable.*step=1"):
            ckpt.restore(mngr, small_state())
        meta.unlink()  # missing
        with pytest.raises(ValueError, match=r"step 2 in .* state/_METADATA .* missing.*step=1"):
            ckpt.restore(mngr, small_state())
        np.testing.assert_array_equal(
            ckpt.restore(mngr, small_state(), step=1).params["b"], np.ones(3)
        )
        (tmp_path / "2" / "ema_params" / "_METADATA").unlink()
        with pytest.raises(ValueError, match=r"step 2 in .* ema_params/_METADATA .*step=1"):
            ckpt.load_ema_params(tmp_path)


def test_donated_state_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    """Saving or exporting a donated (deleted) state names the leaf and leaves nothing on
    disk."""
    donated = small_state()
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
