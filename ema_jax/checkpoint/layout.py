"""What ema_jax writes where, and what a directory holds.

A training step is one Orbax composite ``<directory>/<step>`` with the items
:data:`STATE` and :data:`EMA_PARAMS`; a post-hoc snapshot is ``<directory>/<step>`` with the
item :data:`SNAPSHOT`; an export is one standalone item. :func:`expect` names which of them
a directory is and what reads it, for the errors of a reader given another kind.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

#: The item of a training step holding the whole training state.
STATE = "state"
#: The item of a training step holding the shadow alone (what :func:`load_ema_params` reads).
EMA_PARAMS = "ema_params"
#: The item of a post-hoc step holding the recorded averages.
SNAPSHOT = "snapshot"
#: The kind of a directory holding one standalone item (:func:`export_params`).
EXPORT = "export"

#: What reads each kind of directory (see :func:`kind`); ``{d}`` is the directory.
READERS = {
    EXPORT: "an export (written by export_ema_params or export_params): read it with "
    "ema_jax.checkpoint.load_exported({d})",
    STATE: "a training checkpoint: read it with ema_jax.checkpoint.restore(manager({d}), "
    "target), or its EMA weights with ema_jax.checkpoint.load_ema_params({d})",
    SNAPSHOT: "a post-hoc snapshot directory: synthesize from it with "
    "ema_jax.posthoc.synthesize_from({d}, sigma_rel) or python -m ema_jax.posthoc {d} "
    "--sigma-rel S --out PATH",
}


def steps(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every finished step directory of ``directory``, by step (Orbax's
    step naming; temporary directories of unfinished saves are not steps)."""
    if not os.path.isdir(directory):
        return []
    found = ocp.path.step.standard_name_format().find_all(directory)
    return sorted((int(m.step), os.fspath(m.path)) for m in found)


def step_path(directory: str, step: int) -> str:
    """The directory of step ``step`` (a ``ValueError`` when it is not saved)."""
    return os.fspath(ocp.path.step.standard_name_format().find_step(directory, step).path)


def kind(directory: str) -> str | None:
    """:data:`EXPORT`, :data:`STATE` (a training checkpoint), :data:`SNAPSHOT` (post-hoc
    snapshots), or ``None`` when ``directory`` holds none of them."""
    if os.path.isfile(os.path.join(directory, "_METADATA")):
        return EXPORT
    found = steps(directory)
    if found:
        items = set(os.listdir(found[-1][1]))
        for name in (STATE, SNAPSHOT):
            if name in items:
                return name
    return None


def expect(directory: str | os.PathLike[str], expected: str, missing: str) -> str:
    """``directory`` as an absolute path, when it is a directory holding the ``expected``
    kind (or nothing ema_jax knows: the reader then says what it misses).

    Raises:
      FileNotFoundError: ``directory`` is no directory (``f"{missing} {directory}"``).
      ValueError: it holds another kind: what it is, and what reads it.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{missing} {directory}")
    found = kind(directory)
    if found is not None and found != expected:
        raise ValueError(
            f"{directory} is {READERS[found].format(d=repr(directory))}; it is not "
            f"{READERS[expected].split(':')[0]}"
        )
    return directory
