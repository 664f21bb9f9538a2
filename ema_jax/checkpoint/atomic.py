"""Replacing a directory without a moment where neither the old nor the new one is there:
:func:`replace` (what an export with ``force=True`` commits with)."""

from __future__ import annotations

import ctypes
import os
import shutil

#: ``renameat2`` flag: swap two existing paths in one step (Linux >= 3.15).
_RENAME_EXCHANGE = 2
#: ``renameat2`` directory argument: paths relative to the working directory.
_AT_FDCWD = -100


def staged(path: str, role: str) -> str:
    """The hidden sibling ``.<name>.ema_jax-<role>`` of ``path``: same directory, so the
    same filesystem, so a rename onto ``path`` is atomic."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.ema_jax-{role}")


def clear(path: str) -> None:
    """Deletes what an interrupted :func:`replace` of ``path`` left beside it (its hidden
    staged siblings, Orbax's temporary directories of them included)."""
    parent, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith(f".{name}.ema_jax-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def replace(new: str, path: str) -> None:
    """Puts the complete directory ``new`` at ``path``; an existing ``path`` stays until
    then and is deleted after.

    Where the kernel swaps two directories in one step (Linux ``renameat2``), a kill at any
    moment leaves either the old or the new directory at ``path``. Elsewhere the old one
    is first renamed to ``staged(path, "old")``: a kill between the two renames leaves it
    there and the new one at ``new``, nothing at ``path``.
    """
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new)  # now the old artefact
        return
    old = staged(path, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old)


def _exchange(a: str, b: str) -> bool:
    """Swaps ``a`` and ``b`` atomically; ``False`` where the platform cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0
