"""NASA's C-MAPSS files: their columns, the raw subset they hold, and the reader.

Every C-MAPSS subset FD001–FD004 is three whitespace-separated text files: ``train_FD00x.txt``
(engines run to failure), ``test_FD00x.txt`` (engines stopped some time before failure) and
``RUL_FD00x.txt`` (the true remaining useful life after each test engine's last cycle). Every
row is one operational cycle with 26 columns (:data:`COLUMNS`). :func:`read_subset` reads them
as a :class:`RawSubset`; :mod:`experiments.synthetic` makes and writes data of the same form;
:mod:`experiments.cmapss` prepares either for a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from experiments.config import SUBSETS

SENSORS: tuple[str, ...] = tuple(f"s_{i}" for i in range(1, 22))
SETTINGS: tuple[str, ...] = ("setting_1", "setting_2", "setting_3")
COLUMNS: tuple[str, ...] = ("unit", "cycle", *SETTINGS, *SENSORS)
"""The 26 columns of every C-MAPSS file, in file order."""

UNIT, CYCLE = 0, 1
"""The columns of the engine number and of its cycle count."""
SETTING_COLUMNS = slice(2, 5)
"""The three operational settings' columns."""
SENSOR_OFFSET = 5
"""The column of the first sensor, ``s_1``."""


@dataclass(frozen=True)
class RawSubset:
    """One C-MAPSS subset exactly as NASA's three files hold it."""

    train: np.ndarray  # [rows, 26] float64: train_FD00x.txt
    test: np.ndarray  # [rows, 26] float64: test_FD00x.txt
    rul: np.ndarray  # [test units] float64: RUL_FD00x.txt, true RUL after each last test cycle


def check_subset(subset: str) -> None:
    """Raise a ``ValueError`` unless ``subset`` names one of the four subsets."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")


class DataFileError(ValueError):
    """A C-MAPSS file that is not what NASA's files are; the message names the file and,
    where one is to blame, the line."""


def _read_numbers(path: Path, columns: int) -> np.ndarray:
    """The whitespace-separated numbers of ``path``, ``columns`` per line (blank lines
    skipped), as ``[rows, columns]`` float64; a :class:`DataFileError` naming the first line
    that has another count of fields or a field that is no number."""
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except UnicodeDecodeError as error:  # a ValueError too: before the handler below
        raise DataFileError(f"{path}: not a text file ({error.reason})") from None
    except ValueError as error:  # find the line: numpy counts data rows, not lines
        with path.open() as lines:
            for number, line in enumerate(lines, 1):
                words = line.split()
                if words and len(words) != columns:
                    raise DataFileError(
                        f"{path}, line {number}: {len(words)} fields, expected {columns}"
                    ) from None
                for column, word in enumerate(words, 1):
                    try:
                        float(word)
                    except ValueError:
                        raise DataFileError(
                            f"{path}, line {number}, field {column}: {word!r} is not a number"
                        ) from None
        raise DataFileError(f"{path}: {error}") from None
    if table.size == 0:
        raise DataFileError(f"{path} has no rows")
    if table.shape[1] != columns:
        raise DataFileError(f"{path}, line 1: {table.shape[1]} fields, expected {columns}")
    return table


def read_subset(data_dir: str | PathLike[str], subset: str = "FD001") -> RawSubset:
    """Read NASA's ``train_``, ``test_`` and ``RUL_<subset>.txt`` from ``data_dir``.

    Raises FileNotFoundError naming the first missing file, :class:`DataFileError` (a
    ValueError) naming a malformed one and its first bad line.
    """
    check_subset(subset)
    directory = Path(data_dir)
    paths = {part: directory / f"{part}_{subset}.txt" for part in ("train", "test", "RUL")}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"C-MAPSS file {path} not found: data_dir must hold NASA's train_{subset}.txt, "
                f"test_{subset}.txt and RUL_{subset}.txt"
            )
    train = _read_numbers(paths["train"], len(COLUMNS))
    test = _read_numbers(paths["test"], len(COLUMNS))
    rul = _read_numbers(paths["RUL"], 1)[:, 0]
    n_test_units = len(np.unique(test[:, UNIT]))
    if rul.shape != (n_test_units,):
        raise DataFileError(
            f"{paths['RUL']} must hold one value per test unit ({n_test_units}), got {rul.shape}"
        )
    return RawSubset(train=train, test=test, rul=rul)


__all__ = [
    "COLUMNS",
    "CYCLE",
    "SENSORS",
    "SENSOR_OFFSET",
    "SETTINGS",
    "SETTING_COLUMNS",
    "UNIT",
    "DataFileError",
    "RawSubset",
    "check_subset",
    "read_subset",
]
