"""experiments.cmapss_files: NASA's three files read back, and a missing or malformed one
named by file (and line) instead of numpy's traceback."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from experiments import cmapss_files, synthetic
from experiments.cmapss_files import DataFileError, RawSubset


@cache
def small_raw() -> RawSubset:
    return synthetic.generate(n_train=8, n_test=5, seed=3)


@pytest.mark.parametrize(
    ("subset", "error", "match"),
    [
        ("FD001", FileNotFoundError, r"RUL_FD001\.txt"),
        ("FD002", FileNotFoundError, r"train_FD002\.txt"),
        ("FD005", ValueError, "subset must be one of"),
    ],
)
def test_read_subset_names_the_missing_file(tmp_path: Path, subset, error, match):
    synthetic.write(tmp_path, small_raw())
    (tmp_path / "RUL_FD001.txt").unlink()
    with pytest.raises(error, match=match):
        cmapss_files.read_subset(tmp_path, subset)


def _short_rul(directory: Path, raw: RawSubset) -> None:
    synthetic.write(directory, RawSubset(raw.train, raw.test, raw.rul[:-1]))


def _narrow_train(directory: Path, raw: RawSubset) -> None:
    synthetic.write(directory, raw)
    np.savetxt(directory / "train_FD001.txt", raw.train[:, :20])


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_short_rul, "one value per test unit"),
        (_narrow_train, r"train_FD001\.txt, line 1: 20 fields, expected 26"),
    ],
)
def test_read_subset_rejects_malformed_files(tmp_path: Path, damage, match):
    damage(tmp_path, small_raw())
    with pytest.raises(ValueError, match=match):
        cmapss_files.read_subset(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("hello world", r"line 4: 2 fields, expected 26"),
        (" ".join(["1"] * 25 + ["nan?"]), r"line 4, field 26: 'nan\?' is not a number"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(tmp_path: Path, line: str, message: str):
    """numpy's own message ("could not convert string 'hello' to float64 at row 0, column 1")
    names neither the file nor its line (numpy counts data rows, skipping blank lines)."""
    synthetic.write(tmp_path, small_raw())
    path = tmp_path / "test_FD001.txt"
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[0], "", rows[1], line, *rows[2:]]) + "\n")
    with pytest.raises(DataFileError, match=re.escape(str(path)) + ", " + message):
        cmapss_files.read_subset(tmp_path)


def test_a_binary_file_is_named_not_a_text_file(tmp_path: Path):
    synthetic.write(tmp_path, small_raw())
    (tmp_path / "test_FD001.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataFileError, match="not a text file"):
        cmapss_files.read_subset(tmp_path)


def test_the_reader_is_re_exported_by_cmapss():
    from experiments import cmapss

    assert cmapss.read_subset is cmapss_files.read_subset
    assert cmapss.RawSubset is RawSubset and cmapss.DataFileError is DataFileError
