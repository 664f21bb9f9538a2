"""Training checkpoints: :func:`manager`, :func:`save`, :func:`restore`, :func:`load_ema_params`."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from ema_jax import _checks
from ema_jax.checkpoint import adapters, integrity, items, layout
from ema_jax.checkpoint.layout import EMA_PARAMS, STATE
from ema_jax.checkpoint.managers import BestMetric, Manager, as_manager, best_step, open_manager
from ema_jax.transform import Params


def manager(
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
    read_only: bool = False,
    best_metric: str | None = None,
    best_mode: str = "min",
) -> Manager:
    """A checkpoint manager (Orbax's ``CheckpointManager``, see :class:`Manager`) for
    :func:`save` / :func:`restore`.

    Args:
      directory: root directory (created if missing); step ``s`` lives in ``directory/s``.
      max_to_keep: keep the newest ``max_to_keep`` steps (``None``: keep all).
      save_interval_steps: :func:`save` writes only steps that are multiples of this.
      async_save: write in a background thread; :func:`save` returns once the arrays are
        copied off the devices. Call ``mngr.wait_until_finished()`` (or ``mngr.close()``)
        before exiting. Left-over temporary directories of interrupted saves are removed
        when the manager is created.
      read_only: open for :func:`restore` only (an evaluator polling a training run's
        directory): no lock is taken and :func:`save` raises. Its ``latest_step()``,
        ``all_steps()`` and :func:`restore` re-read the directory, so they see the steps the
        writer saved since; a step the writer pruned while it was being read raises
        ``FileNotFoundError`` saying so.
      best_metric: keep the best ``max_to_keep`` steps by this metric of
        :func:`save`'s ``metrics``, and the latest step (what a crashed run resumes from:
        :func:`restore` without ``step`` restores it), instead of the newest
        ``max_to_keep``; every save must then give it. A NaN metric ranks worst.
        ``load_ema_params(d, step="best")`` loads the best step. A directory holding steps
        saved without that metric raises ``ValueError`` (they could not be ranked and
        would be deleted).
      best_mode: ``"min"`` (a loss) or ``"max"``: which end of ``best_metric`` is best.

    One writing run per directory: a manager that can write holds a lock on the directory
    until ``close()`` (or its process ends, ``kill -9`` included); a second one, in this or
    another process, raises ``RuntimeError`` naming the holder. In a multi-process run only
    process 0 takes it. Readers (``read_only=True``, :func:`load_ema_params`) never wait.

    The manager is a context manager (``with ckpt.manager(d) as mngr: ...`` closes it). A
    manager garbage-collected unclosed (e.g. lost to an exception) finishes its saves and
    releases the directory; a closed manager refuses to save.
    """
    best = None if best_metric is None else BestMetric(best_metric, best_mode)
    return open_manager(
        directory,
        (STATE, EMA_PARAMS),
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        async_save=async_save,
        read_only=read_only,
        best=best,
    )


def save(
    mngr: Manager,
    step: int,
    state: Any,
    *,
    force: bool = False,
    overwrite: bool = False,
    checksum_state: bool = False,
    metrics: dict[str, float] | None = None,
) -> bool:
    """Saves ``state`` as step ``step``: items ``"state"`` and ``"ema_params"``. ``state`` is an
    :class:`EmaTrainState`, or an NNX object holding the model, the optimizer and one
    ``ema_jax.nnx.EMA`` (e.g. ``nnx.Dict(model=..., optimizer=..., ema=...)``): its
    ``nnx.state`` is the ``"state"`` item, the EMA's shadow (pure dicts) ``"ema_params"``.

    ``metrics`` (``{name: number}``, e.g. ``{"val_loss_ema": 0.12}``) are stored with the
    step (Orbax's step metrics) by a manager made with ``best_metric``, which needs that
    metric and ranks the steps by it; a manager without one refuses them (Orbax would not
    record them).

    Returns whether a save was started (``False`` when ``step`` is not due under
    ``save_interval_steps``, or is the step this manager last saved or restored, already
    on disk; ``force=True`` saves a step that is not due). Every argument is checked
    before anything is deleted or written. With ``async_save`` the write continues in the
    background: the arrays are already copied, so ``state`` may be donated to the next
    train step right away. In multi-process training every process calls this.

    The ``ema_params`` item carries a checksum of its arrays, verified by
    :func:`load_ema_params`; ``checksum_state=True`` adds one for the ``"state"`` item too,
    verified by :func:`restore` (each costs one read of those arrays at save and at load).

    Raises:
      ValueError: ``step`` or later steps are saved already, by a run this one went back
        on (``restore(..., step=)``) or by another run: saving would leave them on disk as
        if current. ``overwrite=True`` deletes the saved steps ``>= step`` first.
      ValueError: the manager is closed or read-only.
      ValueError: a leaf of ``state`` was deleted (donated to a jitted step).
    """
    mngr = as_manager(mngr)
    step = _checks.integer("step", step, 0)  # type: ignore[assignment]
    mngr.check_writable()
    adapter = adapters.adapt(state)
    integrity.check_alive(adapter.arrays, "state")
    _checks.flag("checksum_state", checksum_state)
    ranking = {} if mngr.best is None else mngr.best.recorded()
    meta = {integrity.META_KEY: adapters.static_metadata(adapter)}
    saves = {
        STATE: items.save_args(adapter.arrays, meta, checksum=checksum_state),
        EMA_PARAMS: items.save_args(adapters.ema_params(adapter), {integrity.META_KEY: ranking}),
    }
    return mngr.save_items(step, saves, force=force, overwrite=overwrite, metrics=metrics)


def restore(mngr: Manager, target: Any, step: int | None = None) -> Any:
    """The ``EmaTrainState`` saved at ``step`` (the latest when ``None``), bit for bit.

    ``target`` gives the tree, the static fields and where each leaf goes: a concrete
    state, or an abstract one, e.g. ``jax.eval_shape(make_state)`` with
    ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves (then nothing is allocated
    before the read, and each leaf lands with the target's sharding, on any mesh). Leaves
    without a sharding (plain ``jax.eval_shape``) go to the devices they were saved from, or
    to this process's first device when the checkpoint came from other devices. Leaves take
    the target's types: a fresh target's Python-int ``step`` comes back as a Python int.

    For NNX (see :func:`save`) ``target`` is the training object, concrete or abstract from
    ``nnx.eval_shape``; a new object holding the saved state is returned
    (``nnx.merge(graphdef, restored)``), ``target`` is not changed.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the manager's directory.
      ValueError: the checkpoint and the target differ (first differing path named).
    """
    mngr = as_manager(mngr)
    adapter = adapters.adapt(target)
    mngr.wait_until_finished()
    step = _resolve_step(mngr, step)
    step_directory = layout.step_path(os.fspath(mngr.directory), step)
    adapter.check_saved(step_directory, f"step {step} in {mngr.directory}")
    restored = items.read(
        os.path.join(step_directory, STATE),
        adapter.arrays,
        STATE,
        where=f"step {step} in {mngr.directory}",
        earlier=[s for s in mngr.all_steps() if s < step],
        static=adapters.static_metadata(adapter),
    )
    mngr.position = step
    return adapter.rebuild(restored)


def _resolve_step(mngr: Manager, step: int | None) -> int:
    if step is None:
        latest = mngr.latest_step()
        if latest is None:
            directory = os.fspath(mngr.directory)
            found = layout.kind(directory)
            what = "" if found is None else f": it is {layout.describe(directory, found)}"
            raise FileNotFoundError(f"no checkpoint in {directory}{what}")
        return int(latest)
    step = _checks.integer("step", step, 0)  # type: ignore[assignment]
    if step not in mngr.all_steps():
        raise FileNotFoundError(
            f"step {step} is not in {mngr.directory}; available: {sorted(mngr.all_steps())}"
        )
    return step  # type: ignore[return-value]


def load_ema_params(
    directory: str | os.PathLike[str],
    target: Params | None = None,
    step: int | str | None = None,
) -> Params:
    """The ``ema_params`` saved at ``step`` (latest when ``None``; ``"best"``: the best step
    of a :func:`manager` made with ``best_metric``), for evaluation or deploy.

    Opens only ``directory/<step>/ema_params`` (about a fifth of an Adam checkpoint): the
    ``"state"`` item (optimizer state, accumulators) is never read. ``target`` (a
    params-like tree of arrays or ``jax.ShapeDtypeStruct`` with shardings) gives the tree
    type and placement, and is checked first (paths, shapes, floating dtypes); without it
    the saved tree (dicts; tuples come back as lists) lands on this process's first device.

    The arguments are in the order of :func:`load_exported` and :func:`restore` (where,
    target, step); the order of earlier versions, ``load_ema_params(directory, step,
    target)`` with a step (an int or ``"best"``) second, still works with a
    ``DeprecationWarning``.
    """
    if _is_step(target) and not _is_step(step):
        warnings.warn(
            "load_ema_params(directory, step, target) is deprecated: pass the target second "
            "or by name, load_ema_params(directory, target, step=...), the order of "
            "load_exported and restore",
            DeprecationWarning,
            stacklevel=2,
        )
        target, step = step, target
    directory = layout.expect(directory, STATE, "no checkpoint in")
    saved = dict(layout.steps(directory))
    if step is None or step == "best":
        if not saved:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        found = max(saved)
        if step == "best":
            latest = items.metadata(
                os.path.join(saved[found], EMA_PARAMS), f"step {found} in {directory}", EMA_PARAMS
            )
            found = best_step(directory, items.custom(latest))
    else:
        found = _checks.integer("step", step, 0)  # type: ignore[assignment]
        if found not in saved:
            raise FileNotFoundError(f"step {step} is not in {directory}")
    return items.read_params(  # type: ignore[no-any-return]
        os.path.join(saved[found], EMA_PARAMS),
        target,
        EMA_PARAMS,
        where=f"step {found} in {directory}",
        earlier=[s for s in saved if s < found],
    )


def _is_step(value: Any) -> bool:
    """Whether ``value`` can only be a step (an int or ``"best"``), never a target."""
    return isinstance(value, (int, np.integer, str)) and not isinstance(value, bool)
