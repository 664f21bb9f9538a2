"""The checkpoint manager: Orbax's ``CheckpointManager``, held (not subclassed), with the
writer lock, the step list re-read after a failed save, and the best-metric policy kept by
ema_jax (:class:`BestMetric`), which :func:`best_step` applies to any directory."""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from ema_jax import _checks
from ema_jax.checkpoint import items as item_io
from ema_jax.checkpoint import layout
from ema_jax.checkpoint.lock import WriterLock

#: The item Orbax writes a step's metrics into (``<step>/metrics/metrics``, JSON).
METRICS = "metrics"


class BestMetric:
    """Which steps are best: ``metrics[name]``, lowest (``mode="min"``) or highest
    (``"max"``) first; a NaN ranks worst. Also Orbax's ``best_fn`` for pruning."""

    def __init__(self, name: str, mode: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"best_metric must be a metric name (a str), got {name!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {mode!r}")
        self.name, self.mode = name, mode

    def __call__(self, metrics: Mapping[str, Any]) -> float:
        value = float(metrics[self.name])
        if math.isnan(value):
            return math.inf if self.mode == "min" else -math.inf
        return value

    def rank(self, metrics: Mapping[str, Any]) -> float:
        """Larger is better, whatever the mode."""
        value = self(metrics)
        return value if self.mode == "max" else -value

    def checked(self, metrics: Any) -> dict[str, float] | None:
        """``metrics`` as ``{name: float}``, refused when it lacks this metric."""
        if metrics is None:
            raise ValueError(
                f"this manager keeps the best steps by {self.name!r}: "
                f"save(..., metrics={{{self.name!r}: value}})"
            )
        checked = checked_metrics(metrics)
        if self.name not in checked:
            raise ValueError(
                f"metrics has no {self.name!r}, the manager's best_metric; got {sorted(checked)}"
            )
        return checked

    def recorded(self) -> dict[str, str]:
        """What a step records of this policy (in its ``ema_params`` metadata), so that
        :func:`best_step` ranks a directory without the manager that wrote it."""
        return {"best_metric": self.name, "mode": self.mode}


def checked_metrics(metrics: Any) -> dict[str, float]:
    """``metrics`` as ``{name: float}``; a ``TypeError`` naming what is not a number."""
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"metrics must be a dict of str to numbers, got {metrics!r}")
    checked = {}
    for name, value in metrics.items():
        try:
            checked[name] = float(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metrics[{name!r}] must be a number, got {value!r}") from e
    return checked


class Manager:
    """An Orbax ``CheckpointManager`` (:attr:`orbax`) with ema_jax's guarantees.

    * a writer holds the directory's :class:`~ema_jax.checkpoint.lock.WriterLock` until
      :meth:`close`, or until the manager is garbage-collected (a manager lost to an
      exception in a notebook does not hold the directory until the kernel exits);
      ``read_only`` managers and processes other than 0 take none;
    * :meth:`save_items` is the one save: nothing is deleted or written before every
      argument is checked, a step at or below the saved ones is refused unless
      ``overwrite`` (see there), a closed manager refuses;
    * a save that fails (at once or in the background) re-reads the steps on disk, so the
      intact ones stay listed and restorable;
    * a ``read_only`` manager re-reads the steps on disk in :meth:`all_steps` and
      :meth:`latest_step` (a reader polling a training run sees its new steps);
    * :attr:`best` is the best-metric policy, kept here rather than read back from Orbax.

    Every other attribute is the Orbax manager's (``metrics``, ``delete``, ``reload``,
    ``directory``, ...). A context manager.
    """

    def __init__(
        self,
        orbax: ocp.CheckpointManager,
        *,
        lock: WriterLock | None = None,
        best: BestMetric | None = None,
        read_only: bool = False,
        save_interval_steps: int = 1,
        compress: bool = True,
    ) -> None:
        self.orbax = orbax
        self.best = best
        self.read_only = read_only
        self.save_interval_steps = save_interval_steps
        #: Whether its items' arrays are written compressed: the ``compress`` of the
        #: :func:`~ema_jax.checkpoint.items.save_args` it takes (a plain Orbax manager held
        #: as one: Orbax's standard, compressed).
        self.compress = compress
        #: The step this manager last saved or restored: saving it again is a no-op.
        self.position: int | None = None
        self.closed = False
        # Runs when the manager is closed, or garbage-collected unclosed (not at exit: the
        # kernel drops the lock of an exiting process anyway).
        self._finalizer = weakref.finalize(self, _finish, orbax, lock)
        self._finalizer.atexit = False

    def __getattr__(self, name: str) -> Any:  # only for names not found on Manager
        if name == "orbax":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.orbax, name)

    def all_steps(self) -> list[int]:
        """The saved steps, ascending (re-read from disk by a ``read_only`` manager)."""
        if self.read_only:
            self.orbax.reload()
        return sorted(int(s) for s in self.orbax.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, ``None`` when there is none (re-read from disk by a
        ``read_only`` manager, so a polling reader sees the writer's new steps)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save_items(
        self,
        step: int,
        items: Mapping[str, ocp.args.CheckpointArgs],
        *,
        force: bool = False,
        overwrite: bool = False,
        metrics: Any = None,
    ) -> bool:
        """Orbax's save of ``items`` as step ``step``: whether a save was started.

        Everything is checked before anything is deleted or written: the manager is open
        and writable, ``force``/``overwrite`` are bools, ``metrics`` are numbers and hold
        :attr:`best`'s metric (a manager without one refuses ``metrics``: it would not
        record them). A step not due under ``save_interval_steps`` (and not
        ``force``) returns ``False``; so does the step this manager last saved or restored
        (:attr:`position`), already on disk.

        Raises:
          ValueError: steps ``>= step`` are saved already (a run that went back with
            ``restore(..., step=)``, or another run in this directory): they would stay on
            disk as if current. ``overwrite=True`` deletes them first.
        """
        self.check_writable()
        _checks.flag("force", force)
        _checks.flag("overwrite", overwrite)
        if self.best is not None:
            checked = self.best.checked(metrics)
        elif metrics is not None:  # Orbax writes a step's metrics only when it ranks by them
            checked_metrics(metrics)
            raise ValueError(
                f"metrics={metrics!r} would not be recorded: {self.directory} is managed "
                "without best_metric, and only a manager with one stores a step's metrics. "
                "Make the manager with best_metric=<one of these names> (and best_mode), or "
                "save without metrics"
            )
        else:
            checked = None
        saved = self.all_steps()
        later = [s for s in saved if s >= step]
        if later == [step] and step == self.position:
            return False  # this run's step, saved already
        if later and not overwrite:
            raise ValueError(
                f"cannot save step {step} in {self.directory}: steps {later} are saved "
                "already, from a run this one went back on (restore(..., step=)) or another "
                "run; they would stay on disk as if current. Pass overwrite=True to delete "
                f"steps >= {step} first, or save into a new directory"
            )
        initial = not [s for s in saved if s < step]
        if not (force or initial or step % self.save_interval_steps == 0):
            return False  # not due: nothing deleted
        if later:
            self.wait_until_finished()
            for abandoned in later:
                self.orbax.delete(abandoned)
        args = ocp.args.Composite(**items)
        try:
            started = bool(self.orbax.save(step, args=args, force=force, metrics=checked))
        except BaseException:
            self.orbax.reload()  # Orbax may have dropped intact steps from its list
            raise
        if started:
            self.position = step
        return started

    def check_writable(self) -> None:
        """A ``ValueError`` when this manager is closed or was opened ``read_only``."""
        if self.closed:
            raise ValueError(
                f"the manager of {self.directory} is closed: open a new one, "
                f"manager({str(self.directory)!r}), to save or restore"
            )
        if self.read_only:
            raise ValueError(f"the manager of {self.directory} is read-only (read_only=True)")

    def wait_until_finished(self) -> None:
        """Waits for the save in progress; when it failed, re-reads the steps on disk."""
        try:
            self.orbax.wait_until_finished()
        except BaseException:
            self.orbax.reload()
            raise

    def close(self) -> None:
        """Finishes the saves in progress and releases the directory."""
        self.closed = True
        self._finalizer()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finish(orbax: ocp.CheckpointManager, lock: WriterLock | None) -> None:
    """Closes ``orbax`` (its saves in progress finish), then releases ``lock``."""
    try:
        orbax.close()
    finally:
        if lock is not None:
            lock.release()


def open_manager(
    directory: str | os.PathLike[str],
    items: tuple[str, ...],
    *,
    max_to_keep: int | None = None,
    save_interval_steps: int = 1,
    async_save: bool = True,
    read_only: bool = False,
    best: BestMetric | None = None,
    compress: bool = True,
) -> Manager:
    """A :class:`Manager` of ``directory`` whose steps hold ``items``, written by
    :func:`ema_jax.checkpoint.items.handler` (of ``compress``: save them with
    ``items.save_args(..., compress=compress)``).

    With ``best``, the ``max_to_keep`` best steps are kept, and the latest (the one a
    crashed run resumes from) with them. A directory holding steps saved without the
    best metric is refused before anything is deleted (see :func:`check_ranked`).
    """
    _checks.integer("max_to_keep", max_to_keep, 1, allow_none=True)
    _checks.integer("save_interval_steps", save_interval_steps, 1)
    _checks.flag("async_save", async_save)
    _checks.flag("read_only", read_only)
    _checks.flag("compress", compress)
    policies = ocp.checkpoint_managers
    ranking: dict[str, Any] = {}  # Orbax writes a step's metrics only with a best_fn
    if best is None:
        kept: Any = policies.LatestN(n=max_to_keep)
    else:
        ranking = {"best_fn": best, "best_mode": best.mode}
        check_ranked(os.path.abspath(directory), best)
        ranked = policies.BestN(
            get_metric_fn=best,
            reverse=best.mode == "min",
            n=max_to_keep,
            keep_checkpoints_without_metrics=False,
        )
        kept = policies.AnyPreservationPolicy([policies.LatestN(n=1), ranked])
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        preservation_policy=kept,
        **ranking,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    directory = os.path.abspath(directory)
    # Taken before Orbax starts: its clean-up of temporary directories would delete the
    # holder's save in progress.
    lock = None if read_only or jax.process_index() != 0 else WriterLock(directory)
    handlers = {item: item_io.handler(compress=compress) for item in items}
    try:
        orbax = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Manager(
        orbax,
        lock=lock,
        best=best,
        read_only=read_only,
        save_interval_steps=save_interval_steps,
        compress=compress,
    )


def check_ranked(directory: str, best: BestMetric) -> None:
    """A ``ValueError`` when a step of ``directory`` has no ``best.name`` metric: a best-metric
    manager would delete it at its first save (the step a reopened run just restored
    included), and could not rank it."""
    unranked = {}
    for step, path in layout.steps(directory):
        metrics = read_metrics(path)
        if not isinstance(metrics, dict) or best.name not in metrics:
            unranked[step] = sorted(metrics) if isinstance(metrics, dict) else "none"
    if unranked:
        raise ValueError(
            f"{directory} holds steps saved without the metric {best.name!r} (step: its "
            f"metrics) {unranked}: a manager with best_metric={best.name!r} cannot rank them "
            "and would delete them at its first save. Open the directory the way its run "
            "wrote it (the same best_metric, or none), or save the new run into a new "
            "directory"
        )


def read_metrics(step_path: str) -> Any:
    """The metrics Orbax wrote with a step (``<step>/metrics/metrics``), ``None`` if none."""
    try:
        with open(os.path.join(step_path, METRICS, METRICS)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def as_manager(mngr: Any) -> Manager:
    """``mngr`` as a :class:`Manager`: itself, or a plain Orbax manager held as one (no
    lock, no best metric); a ``TypeError`` for anything else."""
    if isinstance(mngr, Manager):
        return mngr
    if isinstance(mngr, ocp.CheckpointManager):
        return Manager(mngr)
    raise TypeError(
        "mngr must be the CheckpointManager made by ema_jax.checkpoint.manager(directory), "
        f"got {type(mngr).__name__}"
        + (
            " (a path: open it with manager(path) first)"
            if isinstance(mngr, (str, os.PathLike))
            else ""
        )
    )


def best_step(directory: str, recorded: Mapping[str, Any] | None) -> int:
    """The best step of ``directory`` by the policy a step ``recorded``
    (:meth:`BestMetric.recorded`), from the metrics Orbax wrote with each step; of equal
    values the latest. Reads only those small JSON files: no manager is opened."""
    if not recorded or "best_metric" not in recorded:
        raise ValueError(f'step="best": {directory} was not written by a manager with best_metric')
    policy = BestMetric(recorded["best_metric"], recorded["mode"])
    ranked = []
    for step, path in layout.steps(directory):
        metrics = read_metrics(path)
        if isinstance(metrics, dict) and policy.name in metrics:
            ranked.append((policy.rank(metrics), step))
    if not ranked:
        raise FileNotFoundError(f"no checkpoint with metrics in {directory}")
    return max(ranked)[1]
