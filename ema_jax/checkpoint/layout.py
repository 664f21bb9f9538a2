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

#: One step directory of a training checkpoint or of post-hoc snapshots.
STEP = "step"
#: A directory that is none of ema_jax's kinds (and not empty).
FOREIGN = "foreign"

#: What reads each kind of directory (see :func:`kind`); ``{d}`` is the directory.
READERS = {
    EXPORT: "an export (written by export_ema_params or export_params): read it with "
    "ema_jax.checkpoint.load_exported({d})",
    STATE: "a training checkpoint: read it with ema_jax.checkpoint.restore(manager({d}), "
    "target), or its EMA weights with ema_jax.checkpoint.load_ema_params({d})",
    SNAPSHOT: "a post-hoc snapshot directory: synthesize from it with "
    "ema_jax.posthoc.synthesize_from({d}, sigma_rel) or python -m ema_jax.posthoc {d} "
    "--sigma-rel S --out PATH",
    FOREIGN: "not an ema_jax directory: it holds no export, no training "
    "checkpoint and no post-hoc snapshots (numbered step directories); check the path",
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
    snapshots), :data:`STEP` (one step directory of either), :data:`FOREIGN` (files of
    something else), or ``None`` when ``directory`` holds no file yet (hidden files,
    unfinished saves and subdirectories aside: a parent of runs gets the reader's own
    "nothing here" error)."""
    if os.path.isfile(os.path.join(directory, "_METADATA")):
        return EXPORT
    found = steps(directory)
    if found:
        held = set(os.listdir(found[-1][1]))
        for name in (STATE, SNAPSHOT):
            if name in held:
                return name
    entries = [
        e
        for e in (os.listdir(directory) if os.path.isdir(directory) else [])
        if not e.startswith(".") and ".orbax-checkpoint-tmp" not in e
    ]
    if not entries:
        return None
    parent, name = os.path.split(os.path.abspath(directory))
    if name.isdigit() and kind(parent) in (STATE, SNAPSHOT):
        return STEP
    if any(os.path.isfile(os.path.join(directory, e)) for e in entries):
        return FOREIGN
    return None


def describe(directory: str, found: str) -> str:
    """What ``directory`` (of kind ``found``, see :func:`kind`) is and what reads it."""
    if found != STEP:
        return READERS[found].format(d=repr(directory))
    parent, step = os.path.split(directory)
    of = READERS[kind(parent) or FOREIGN].format(d=repr(parent))
    return f"step {step} of {parent}, which is {of} (step={step} picks this step)"


def expect(directory: str | os.PathLike[str], expected: str, missing: str) -> str:
    """``directory`` as an absolute path, when it is a directory holding the ``expected``
    kind (or nothing yet: the reader then says what it misses).

    Raises:
      FileNotFoundError: ``directory`` is no directory (``f"{missing} {directory}"``), or
        no ema_jax directory (then that is said too).
      ValueError: it holds another kind: what it is, and what reads it.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{missing} {directory}")
    found = kind(directory)
    if found == FOREIGN:
        raise FileNotFoundError(f"{missing} {directory}: it is {describe(directory, found)}")
    if found is not None and found != expected:
        raise ValueError(
            f"{directory} is {describe(directory, found)}; it is not "
            f"{READERS[expected].split(':')[0]}"
        )
    return directory
