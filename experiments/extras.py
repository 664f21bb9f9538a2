"""The experiments' optional dependencies: a command without them says how to install them.

``pip install -e ".[experiments]"`` adds :data:`EXTRAS` to the library's dependencies. The
experiment modules import them where they are used (the progress bar, the t-intervals, the
plots), so every command can call :func:`require` first and, where one is missing, end with
one line naming the install command (exit status 2, like a usage error) instead of a
``ModuleNotFoundError`` traceback, possibly after training.
"""

from __future__ import annotations

import importlib.util
import sys

EXTRAS = ("tqdm", "matplotlib", "scipy")
"""The modules of the ``experiments`` extra of ``pyproject.toml``."""
INSTALL = 'pip install -e ".[experiments]"'


def missing() -> list[str]:
    """The modules of :data:`EXTRAS` that cannot be imported here."""
    return [name for name in EXTRAS if importlib.util.find_spec(name) is None]


def require(prog: str) -> None:
    """Exit with status 2 and one line on stderr, ``<prog>: error: ... run <INSTALL>``, when
    any of :data:`EXTRAS` is missing; return otherwise."""
    absent = missing()
    if absent:
        print(
            f"{prog}: error: {', '.join(absent)} not installed (the experiment extras); "
            f"run {INSTALL}",
            file=sys.stderr,
        )
        raise SystemExit(2)


__all__ = ["EXTRAS", "INSTALL", "missing", "require"]
