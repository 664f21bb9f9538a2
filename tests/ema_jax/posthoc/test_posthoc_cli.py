"""``python -m ema_jax.posthoc``: a real process writes an export that ``load_exported``
reads; bad input exits with status 2 and one line naming the flag or the directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tree_allclose
from posthoc_support import linen_run, small_checkpoint

from ema_jax import checkpoint, posthoc


@pytest.fixture(scope="module")
def recorded_dir(tmp_path_factory: Any) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "posthoc"
    linen_run(directory)
    return directory  # type: ignore[no-any-return]


def test_cli_writes_an_export_that_load_exported_reads(recorded_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ema_jax.posthoc",
            str(recorded_dir),
            "--sigma-rel",
            "0.08",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    tree_allclose(
        checkpoint.load_exported(out), posthoc.synthesize_from(recorded_dir, 0.08), rtol=0
    )
    with pytest.raises(SystemExit) as exit_info:
        posthoc.main([str(recorded_dir), "--sigma-rel", "0.3", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and not (tmp_path / "bad").exists()


def test_several_sigma_rels_write_one_export_each(recorded_dir: Path, tmp_path: Path) -> None:
    """One run, one pass: ``--out DIR/sigma_rel_<S>`` per ``--sigma-rel``, each what
    ``synthesize_from`` gives for that width."""
    out = tmp_path / "exports"
    assert (
        posthoc.main(
            [str(recorded_dir), "--sigma-rel", "0.05", "--sigma-rel", "0.15", "--out", str(out)]
        )
        == 0
    )
    assert sorted(os.listdir(out)) == ["sigma_rel_0.05", "sigma_rel_0.15"]
    for sigma in (0.05, 0.15):
        tree_allclose(
            checkpoint.load_exported(out / f"sigma_rel_{sigma:g}"),
            posthoc.synthesize_from(recorded_dir, sigma),
            rtol=0,
        )


BAD_INPUT: dict[str, tuple[Callable[[Path, Path], list[str]], list[str], list[str]]] = {
    "sigma_rel out of range": (
        lambda d, tmp: [str(d), "--sigma-rel", "0.3", "--out", str(tmp / "out")],
        [r"--sigma-rel must be finite and in \(0, 0.288"],
        ["out_sigma_rel"],
    ),
    "step 0": (
        lambda d, tmp: [str(d), "--sigma-rel", "0.1", "--step", "0", "--out", str(tmp / "out")],
        ["--step must be >= 1"],
        [],
    ),
    "existing --out": (
        lambda d, tmp: [str(d), "--sigma-rel", "0.1", "--out", str(tmp)],
        ["already exists: pass --force to overwrite it"],
        ["force=True"],
    ),
    "no snapshots": (
        lambda d, tmp: [str(tmp), "--sigma-rel", "0.1", "--out", str(tmp / "out")],
        ["no snapshots in"],
        [],
    ),
    "a training checkpoint": (
        lambda d, tmp: [
            str(small_checkpoint(tmp / "ckpt")),
            "--sigma-rel",
            "0.1",
            "--out",
            str(tmp / "out"),
        ],
        [r"is a training checkpoint: .*load_ema_params", "not a post-hoc snapshot directory"],
        ["_METADATA", "damaged"],
    ),
    "several widths into an export": (
        lambda d, tmp: [
            str(d),
            *("--sigma-rel", "0.1", "--sigma-rel", "0.2", "--force", "--out"),
            str(_an_export(tmp / "export")),
        ],
        [r"is an export .*: with several --sigma-rel, --out is a directory holding one export"],
        [],
    ),
}


def _an_export(path: Path) -> Path:
    checkpoint.export_params(path, {"w": np.ones(3, np.float32)})
    return path


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_naming_the_flag_or_directory(
    recorded_dir: Path, tmp_path: Path, capsys: Any, case: str
) -> None:
    argv, said, unsaid = BAD_INPUT[case]
    with pytest.raises(SystemExit) as exit_info:
        posthoc.main(argv(recorded_dir, tmp_path))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m ema_jax.posthoc: error: ")
    for message in said:
        assert re.search(message, error), (message, error)
    for message in unsaid:
        assert message not in error, (message, error)
    assert not (tmp_path / "out").exists()
