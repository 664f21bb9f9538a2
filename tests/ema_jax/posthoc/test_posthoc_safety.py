"""ema_jax.posthoc when things go wrong: a corrupted snapshot is detected (in Python and by
the command line, which then writes nothing), a resumed run's snapshots are not lost or
mixed with the abandoned run's, a step past the last snapshot and a single snapshot are
named, the command line never writes over a snapshot directory and reports a library
error in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import pytest
from helpers import tree_allclose

from ema_jax import posthoc


def _record(directory: Path, steps: range, shift: float = 0.0, **kwargs: Any) -> None:
    """Snapshots of two averages ``{"w": value}`` at ``steps`` (values differ per step)."""
    with posthoc.snapshot_manager(directory, async_save=False) as mngr:
        for s in steps:
            trees = [{"w": jnp.full((64, 64), s + shift + j)} for j in range(2)]
            posthoc.save_snapshot(mngr, s, trees, **kwargs)


def _flip_a_byte_of_the_largest_file(directory: Path) -> Path:
    files = [Path(r) / f for r, _, fs in os.walk(directory) for f in fs]
    data = [f for f in files if f.parent.name == "d"]
    largest = max(data, key=lambda f: f.stat().st_size)
    raw = bytearray(largest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    largest.write_bytes(bytes(raw))
    return largest


@pytest.fixture
def corrupted(tmp_path: Path) -> Path:
    directory = tmp_path / "posthoc"
    with posthoc.snapshot_manager(directory, async_save=False) as mngr:
        for s in (10, 20, 30):
            trees = [{"w": jnp.arange(4096.0).reshape(64, 64) * (s + j)} for j in range(2)]
            posthoc.save_snapshot(mngr, s, trees)
    _flip_a_byte_of_the_largest_file(directory / "30")
    return directory


def test_a_flipped_byte_in_a_snapshot_is_detected(corrupted: Path) -> None:
    with pytest.raises(ValueError, match=r"snapshot of step 30 .* is corrupt: .*w does not match"):
        posthoc.synthesize_from(corrupted, 0.1)


def test_the_command_line_refuses_a_corrupted_snapshot_and_writes_nothing(
    corrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    argv = [str(corrupted), "--sigma-rel", "0.1", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "ema_jax.posthoc", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "is corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_resumed_run_is_refused_over_later_snapshots_unless_overwrite(tmp_path: Path) -> None:
    """A run recorded to step 40, resumed from step 20: saving step 30 names the later
    snapshots and the fix, writing nothing; ``overwrite=True`` deletes steps >= 30 first,
    so the synthesis uses the resumed run's snapshots alone."""
    directory = tmp_path / "posthoc"
    _record(directory, range(10, 41, 10))
    with posthoc.snapshot_manager(directory, async_save=False) as mngr:
        trees = [{"w": jnp.full((64, 64), -1.0)}] * 2
        with pytest.raises(
            ValueError, match=r"snapshots of steps \[30, 40\] are saved.*overwrite=True"
        ):
            posthoc.save_snapshot(mngr, 30, trees, sigma_rels=(0.05, 0.10))
        with pytest.raises(ValueError, match=r"steps \[20, 30, 40\]"):  # the same step too
            posthoc.save_snapshot(mngr, 20, trees)
        assert mngr.all_steps() == [10, 20, 30, 40]
    _record(directory, range(30, 41, 10), shift=100.0, overwrite=True)
    assert sorted(int(p) for p in os.listdir(directory) if p.isdigit()) == [10, 20, 30, 40]
    want_dir = tmp_path / "reference"
    _record(want_dir, range(10, 21, 10))
    with posthoc.snapshot_manager(want_dir, async_save=False) as mngr:
        for s in (30, 40):
            posthoc.save_snapshot(
                mngr, s, [{"w": jnp.full((64, 64), s + 100.0 + j)} for j in range(2)]
            )
    tree_allclose(
        posthoc.synthesize_from(directory, 0.1), posthoc.synthesize_from(want_dir, 0.1), rtol=0
    )


def test_a_step_after_the_last_snapshot_names_it(tmp_path: Path) -> None:
    _record(tmp_path, range(10, 31, 10))
    with pytest.raises(ValueError, match=r"step=31 is after the last snapshot \(step 30 in "):
        posthoc.synthesize_from(tmp_path, 0.1, step=31)


def test_one_snapshot_warns_that_sigma_rel_cannot_be_chosen(tmp_path: Path) -> None:
    _record(tmp_path, range(10, 11))
    with pytest.warns(UserWarning, match="at least 2 snapshots"):
        posthoc.synthesize_from(tmp_path, 0.1)
    _record(tmp_path / "two", range(10, 21, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        posthoc.synthesize_from(tmp_path / "two", 0.1)


def _cli_error(argv: list[str], capsys: Any) -> str:
    with pytest.raises(SystemExit) as exit_info:
        posthoc.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("python -m ema_jax.posthoc: error: ")
    return lines[-1]


OVER_WHAT = {
    "the snapshot directory itself": lambda snaps, tmp: snaps,
    "the folder holding it": lambda snaps, tmp: snaps.parent,
    "a training checkpoint": lambda snaps, tmp: tmp / "ckpt",
}


@pytest.mark.parametrize("case", list(OVER_WHAT))
def test_out_force_never_writes_over_anything_but_an_export(
    tmp_path: Path, capsys: Any, case: str
) -> None:
    from posthoc_support import small_checkpoint

    snaps = tmp_path / "run" / "posthoc"
    _record(snaps, range(10, 31, 10))
    small_checkpoint(tmp_path / "ckpt")
    out = OVER_WHAT[case](snaps, tmp_path)
    before = sorted(str(p) for p in out.rglob("*"))
    error = _cli_error([str(snaps), "--sigma-rel", "0.1", "--out", str(out), "--force"], capsys)
    assert "refusing to" in error and "--out" in error, error
    assert sorted(str(p) for p in out.rglob("*")) == before


def test_a_step_past_the_last_snapshot_is_one_line_naming_step(tmp_path: Path, capsys: Any) -> None:
    _record(tmp_path / "s", range(10, 31, 10))
    error = _cli_error(
        [str(tmp_path / "s"), "--sigma-rel", "0.1", "--step", "99", "--out", str(tmp_path / "o")],
        capsys,
    )
    assert "step=99 is after the last snapshot (step 30" in error
    assert not (tmp_path / "o").exists()


def test_a_library_error_is_one_line_and_status_2(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orbax and TensorStore raise bare ``Exception`` s with long messages: one line."""
    from ema_jax.posthoc import streaming

    _record(tmp_path / "s", range(10, 31, 10))

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise Exception("INTERNAL: tensorstore read failed\n" + "  at frame\n" * 130)

    monkeypatch.setattr(streaming.snapshots.Snapshot, "read", fails)
    error = _cli_error(
        [str(tmp_path / "s"), "--sigma-rel", "0.1", "--out", str(tmp_path / "o")], capsys
    )
    assert "Exception: INTERNAL: tensorstore read failed" in error and "Traceback" not in error
    assert not (tmp_path / "o").exists()
